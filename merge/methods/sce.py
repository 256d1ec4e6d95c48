"""SCE (FuseChat, Algorithm 1): Select, Calculate, Erase over the fusion vectors of each parameter matrix.

Select: the top `select_topk` fraction of elements by variance across the fusion vectors (k counts the
elements of non-zero variance, ties go to the lowest index). Calculate: matrix-level coefficients
eta_j = sum(selected delta_j^2) / sum_k sum(selected delta_k^2) (equal ones if all are zero). Erase: per
element, drop the fusion vectors whose sign disagrees with the sign of their sum. Merge: pivot plus the
eta-weighted mean of the surviving elements (`normalize: false`: the plain eta-weighted sum).

`variant` picks between the two public codes, which differ only when select_topk < 1:
  fusechat  (default) the selection only decides the coefficients; every element is erased and merged,
            as in the FuseChat authors' release (FuseChat/mergekit/.../sce_merging.py);
  mergekit  unselected elements of the fusion vectors are zeroed before erasing and merging, so they keep
            the pivot's value (mergekit/merge_methods/sce.py).

`mergekit_fallback: true` (off by default) adds mergekit 0.1.5's two guards, so that a merge reproduces
mergekit's on small fusion vectors too: equal coefficients whenever sum_j mean(selected delta_j^2) < 1e-6
(ours: only when it is exactly 0), and the divisor of step Merge clamped to at least 1e-6 (ours: 0 -> 1).
"""

from typing import Literal

import torch

from merge.methods.common import agrees_with_majority, mix, variance
from merge.registry import Combine, Fraction, ParameterStream, merge_method

_MERGEKIT_EPS = 1e-6


@merge_method("sce", paper="https://arxiv.org/abs/2408.07990")
def sce(
    param: ParameterStream,
    *,
    select_topk: Fraction = 1.0,
    variant: Literal["fusechat", "mergekit"] = "fusechat",
    normalize: bool = True,
    mergekit_fallback: bool = False,
) -> Combine:
    selection = None
    if select_topk < 1:
        selection = param.select_top(lambda c: variance(c.deltas), select_topk, among="nonzero")

    def selected(chunk) -> torch.Tensor:
        return chunk.deltas if selection is None else chunk.deltas * selection.mask(chunk)

    def squares(chunk) -> torch.Tensor:
        d = selected(chunk)
        return d.square() if selection is None else d.square_()  # the masked copy is ours to overwrite

    energy = param.total(squares)
    uniform = (energy / param.numel).sum() < _MERGEKIT_EPS if mergekit_fallback else energy.sum() == 0
    eta = torch.full_like(energy, 1 / param.n_targets) if uniform else energy / energy.sum()
    min_divisor = _MERGEKIT_EPS if mergekit_fallback else None

    def combine(chunk):
        deltas = selected(chunk) if variant == "mergekit" else chunk.deltas
        return chunk.pivot + mix(deltas, eta, agrees_with_majority(deltas), normalize, min_divisor)

    return combine
