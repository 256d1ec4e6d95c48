"""Pieces shared by several methods: sign election and the weighted mix of fusion vectors."""

from __future__ import annotations

import torch


def agrees_with_majority(deltas: torch.Tensor) -> torch.Tensor:
    """(N, n) bool: the element's sign equals the sign of the sum over targets (a zero sum counts as +).

    Zeros never agree, so they drop out of the mix and of its divisor.
    """
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == majority


def mix(deltas: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """sum_j w_j keep_j delta_j, divided by sum_j w_j keep_j per element when `normalize` (0 -> 1)."""
    w = weights.to(deltas.dtype)[:, None]
    if keep is not None:
        w = w * keep
    mixed = (deltas * w).sum(0)
    if normalize:
        divisor = w.sum(0) if keep is not None else w.sum(0).expand_as(mixed)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


def as_weights(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype)
