"""Fusion of the pivot's own distributions with aligned source distributions, per sample.

- ``mince`` (FuseLLM/FuseChat MinCE): keep the one distribution with the lowest cross-entropy on the gold
  response tokens.
- ``avgce``: average all distributions with weights ``softmax(-CE)``: ``exp(-CE)`` is a candidate's
  geometric-mean probability of the gold tokens (1 / perplexity), so the weights are each candidate's
  share of per-token likelihood; unlike ``1 / CE`` they do not flatten as CEs grow, nor explode as one
  nears 0.

Pairwise fusion (FuseChat) passes the pivot and one source; multi (FuseLLM) the pivot and every source.
Candidate 0 is always the pivot's own distribution; on equal CE the earlier candidate wins.

CE of a sparse distribution: mean over the response positions of ``-log max(p(gold), floor)``, where
``p(gold)`` is 0 when the gold token is outside the top-k. ``floor`` = 1e-6 (a gold token outside the
top-k costs 13.8 nats), the same for every candidate so that none is favoured by how much it lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion._sparse import SparseDist, coo_topk

FUSION_METHODS = ("mince", "avgce")
GOLD_FLOOR = 1e-6


@dataclass
class FusionResult:
    """The fused target of one sample and how it was chosen.

    Attributes:
        dist: the fused `SparseDist` at the pivot's scored positions.
        ces: float64 ``[M]`` cross-entropy of each candidate (0 = pivot, then the sources in order).
        weights: float64 ``[M]`` weight of each candidate in ``dist`` (one-hot for MinCE).
        winner: index of the lowest-CE candidate (MinCE's choice; AvgCE's largest weight).
    """

    dist: SparseDist
    ces: np.ndarray
    weights: np.ndarray
    winner: int


def gold_ids(pivot) -> np.ndarray:
    """int64 ``[N]``: the token each of the pivot's scored positions predicts (``input_ids[t + 1]``)."""
    return np.asarray(pivot.input_ids, dtype=np.int64)[np.asarray(pivot.positions, dtype=np.int64) + 1]


def response_mask(pivot) -> np.ndarray:
    """bool ``[N]``: scored positions whose next token is a training target (the gold response)."""
    return np.asarray(pivot.loss_mask, dtype=bool)[np.asarray(pivot.positions, dtype=np.int64) + 1]


def cross_entropy(
    dist: SparseDist, gold: np.ndarray, mask: np.ndarray | None = None, floor: float = GOLD_FLOOR
):
    """Mean ``-log max(p(gold), floor)`` over the positions in ``mask`` (0.0 when there are none)."""
    p = dist.prob_of(gold)
    if mask is not None:
        p = p[np.asarray(mask, dtype=bool)]
    if p.size == 0:
        return 0.0
    return float(np.mean(-np.log(np.maximum(p, floor))))


def fuse(
    candidates: list[SparseDist],
    gold: np.ndarray,
    mask: np.ndarray | None = None,
    method: str = "mince",
    *,
    k: int | None = None,
    floor: float = GOLD_FLOOR,
) -> FusionResult:
    """Fuse ``candidates`` (pivot first) at the same positions; ``method`` is ``mince`` or ``avgce``."""
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion {method!r}: expected one of {', '.join(FUSION_METHODS)}")
    if not candidates:
        raise ValueError("fusion needs at least the pivot's own distribution")
    ces = np.array([cross_entropy(c, gold, mask, floor) for c in candidates], dtype=np.float64)
    winner = int(np.argmin(ces))  # argmin returns the first minimum: the pivot wins ties
    if method == "mince":
        weights = np.zeros(len(candidates))
        weights[winner] = 1.0
        c = candidates[winner]
        return FusionResult(SparseDist(c.ids.copy(), c.probs.copy()), ces, weights, winner)
    weights = np.exp(-(ces - ces.min()))
    weights /= weights.sum()
    n = candidates[0].num_positions
    k = int(k or max(c.ids.shape[1] for c in candidates))
    rows = np.concatenate([np.repeat(np.arange(n), c.ids.shape[1]) for c in candidates])
    ids = np.concatenate([c.ids.ravel() for c in candidates])
    probs = np.concatenate(
        [c.probs.astype(np.float64).ravel() * w for c, w in zip(candidates, weights, strict=True)]
    )
    return FusionResult(coo_topk(rows, ids, probs, n, k), ces, weights, winner)


def fuse_sample(pivot, aligned: list, method: str = "mince", **kwargs) -> FusionResult:
    """Fuse one pivot `ScoredSample` with its aligned sources (`AlignedDistributions` or `SparseDist`):
    one source is pairwise fusion, several are multi fusion."""
    own = SparseDist.from_topk(pivot.topk_ids, pivot.topk_logprobs)
    dists = [getattr(a, "dist", a) for a in aligned]
    return fuse([own, *dists], gold_ids(pivot), response_mask(pivot), method, **kwargs)
