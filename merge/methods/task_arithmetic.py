"""Task arithmetic: the pivot plus a weighted sum of the fusion vectors (task vectors), times `lambda`."""

from merge.methods.common import as_weights, mix
from merge.registry import Combine, ParameterStream, PerModel, Weight, merge_method


@merge_method("task_arithmetic", paper="https://arxiv.org/abs/2212.04089")
def task_arithmetic(
    param: ParameterStream, *, weight: PerModel[Weight] = 1.0, normalize: bool = False, lambda_: Weight = 1.0
) -> Combine:
    def combine(chunk):
        mixed = mix(chunk.deltas, as_weights(weight, chunk.pivot), None, normalize)
        return chunk.pivot + (mixed * lambda_ if lambda_ != 1 else mixed)

    return combine
