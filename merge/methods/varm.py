"""VaRM (FuseChat v1): per matrix, each target's weight is its share of the mean squared variation.

w_j = mean((theta_j - theta_pivot)^2) / sum_k mean((theta_k - theta_pivot)^2) for each parameter matrix,
merged = sum_j w_j theta_j = pivot + sum_j w_j delta_j; a matrix that no target changed gets equal weights.
"""

import torch

from merge.registry import Combine, ParameterStream, merge_method


@merge_method("varm", paper="https://arxiv.org/abs/2402.16107")
def varm(param: ParameterStream) -> Combine:
    variation = param.total(lambda c: c.deltas**2)
    total = variation.sum()
    weights = variation / total if total > 0 else torch.full_like(variation, 1 / param.n_targets)

    def combine(chunk):
        w = weights.to(chunk.pivot.dtype)
        return chunk.pivot + (chunk.deltas * w[:, None]).sum(0)

    return combine
