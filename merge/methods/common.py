"""Pieces shared by several methods: sign election, variance and the weighted mix of fusion vectors.

They loop over the targets with elementwise operations rather than reducing over dim 0: temporaries stay
the size of one row, and the order of every sum is fixed.
"""

from __future__ import annotations

import torch


def agrees_with_majority(deltas: torch.Tensor) -> torch.Tensor:
    """(N, n) bool: the element's sign equals the sign of the sum over targets (a zero sum counts as +).

    Zeros never agree, so they drop out of the mix and of its divisor.
    """
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return torch.where(total >= 0, deltas > 0, deltas < 0)


def variance(deltas: torch.Tensor) -> torch.Tensor:
    """(n,) population variance of each element across the fusion vectors."""
    mean = deltas[0].clone()
    for d in deltas[1:]:
        mean += d
    mean /= deltas.shape[0]
    acc = torch.zeros_like(mean)
    for d in deltas:
        acc += (d - mean).square_()
    return acc.div_(deltas.shape[0])


def mix(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor | None,
    normalize: bool,
    min_divisor: float | None = None,
) -> torch.Tensor:
    """sum_j w_j keep_j delta_j, divided by sum_j w_j keep_j per element when `normalize` (0 -> 1, or with
    `min_divisor` the divisor clamped to at least that value, as mergekit's sce does)."""
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if keep is not None else weights.sum().to(deltas.dtype)
    for j, d in enumerate(deltas):
        w = weights[j].to(d.dtype)
        if keep is None:
            mixed += d * w
        else:
            wk = keep[j] * w
            mixed += d * wk
            divisor += wk
    if normalize and min_divisor is not None:
        mixed /= divisor.clamp(min=min_divisor)
    elif normalize:
        mixed /= torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


def as_weights(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype)
