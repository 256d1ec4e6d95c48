"""Task arithmetic: the pivot plus a weighted sum of the fusion vectors (task vectors)."""

from merge.methods.common import as_weights, mix
from merge.registry import Combine, ParameterStream, PerModel, Weight, merge_method


@merge_method("task_arithmetic", paper="https://arxiv.org/abs/2212.04089")
def task_arithmetic(param: ParameterStream, *, weight: PerModel[Weight] = 1.0, normalize: bool = False) -> Combine:
    def combine(chunk):
        return chunk.pivot + mix(chunk.deltas, as_weights(weight, chunk.pivot), None, normalize)

    return combine
