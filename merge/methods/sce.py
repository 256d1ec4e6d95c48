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
"""

from typing import Literal

import torch

from merge.methods.common import agrees_with_majority, mix, variance
from merge.registry import Combine, Fraction, ParameterStream, merge_method


@merge_method("sce", paper="https://arxiv.org/abs/2408.07990")
def sce(
    param: ParameterStream,
    *,
    select_topk: Fraction = 1.0,
    variant: Literal["fusechat", "mergekit"] = "fusechat",
    normalize: bool = True,
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
    eta = energy / energy.sum() if energy.sum() > 0 else torch.full_like(energy, 1 / param.n_targets)

    def combine(chunk):
        deltas = selected(chunk) if variant == "mergekit" else chunk.deltas
        return chunk.pivot + mix(deltas, eta, agrees_with_majority(deltas), normalize)

    return combine
