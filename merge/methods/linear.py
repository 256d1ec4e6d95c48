"""Linear merge: a weighted average of the models' parameters (model soups)."""

from merge.methods.common import as_weights
from merge.registry import Combine, ParameterStream, PerModel, Weight, merge_method


@merge_method("linear", paper="https://arxiv.org/abs/2203.05482", uses_pivot=False)
def linear(param: ParameterStream, *, weight: PerModel[Weight] = 1.0, normalize: bool = True) -> Combine:
    def combine(chunk):
        w = as_weights(weight, chunk.targets)
        merged = (chunk.targets * w[:, None]).sum(0)
        return merged / w.sum() if normalize else merged

    return combine
