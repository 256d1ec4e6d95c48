"""Fusion of the pivot's own distributions with aligned source distributions, per sample.

- ``mince`` (FuseLLM/FuseChat MinCE): keep the one distribution whose teacher has the lowest
  cross-entropy on the gold response tokens.
- ``avgce``: average all distributions with per-sample weights from the CEs. Two formulas:
  ``softmax-ce`` (default): ``w_i = exp(-CE_i) / Σ_j exp(-CE_j)``; ``exp(-CE)`` is a candidate's
  geometric-mean probability of the gold tokens (1 / perplexity), so the weights are each candidate's
  share of per-token likelihood. ``fusellm``: FuseLLM's ``w = softmax(exp(-CE))`` (its trainer's
  ``1 / exp(metric_ce)`` rewards, then a softmax): the rewards lie in (0, 1], so the weights stay within a
  factor e of each other, close to uniform.

Pairwise fusion (FuseChat) passes the pivot and one source; multi (FuseLLM) the pivot and every source.
Candidate 0 is always the pivot's own distribution; on equal CE the earlier candidate wins.

CE of a candidate on a sample: mean over the response positions of its negative log-likelihood of the
gold token under its *full-vocabulary* distribution (the ``gold_logprob`` extraction stores; a source's
carried to the pivot's positions through the alignment, `fusion.align.align_gold_nll`), as the papers
define it. A gold token outside the stored top-k therefore costs what the model really gave it, not a
fixed floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion._sparse import SparseDist, coo_topk
from fusion.align import pivot_gold_nll

FUSION_METHODS = ("mince", "avgce")
AVGCE_WEIGHTS = ("softmax-ce", "fusellm")


@dataclass
class FusionResult:
    """The fused target of one sample and how it was chosen.

    Attributes:
        dist: the fused `SparseDist` at the pivot's scored positions.
        ces: float64 ``[M]`` cross-entropy (nats per response position) of each candidate (0 = pivot, then
            the sources in order).
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


def cross_entropy(nll: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of the per-position negative log-likelihoods ``nll`` (float ``[N]``, nats) over the positions in
    ``mask`` (all when None), in float64; 0.0 when there are none."""
    v = np.asarray(nll, dtype=np.float64)
    if mask is not None:
        v = v[np.asarray(mask, dtype=bool)]
    return float(v.mean()) if v.size else 0.0


def candidate_weights(
    ces: np.ndarray, method: str = "mince", avgce_weights: str = "softmax-ce"
) -> np.ndarray:
    """float64 ``[M]`` weights of the candidates from their CEs (nats): one-hot on the lowest CE for
    ``mince`` (the first on ties), else ``softmax(-CE)`` or FuseLLM's ``softmax(exp(-CE))``."""
    ces = np.asarray(ces, dtype=np.float64)
    if method == "mince":
        w = np.zeros(ces.size)
        w[int(np.argmin(ces))] = 1.0
        return w
    if avgce_weights == "softmax-ce":
        z = -ces
    elif avgce_weights == "fusellm":
        z = np.exp(-ces)
    else:
        raise ValueError(
            f"unknown AvgCE weights {avgce_weights!r}: expected one of {', '.join(AVGCE_WEIGHTS)}"
        )
    w = np.exp(z - z.max())
    return w / w.sum()


def fuse(
    candidates: list[SparseDist],
    nll: list[np.ndarray],
    mask: np.ndarray | None = None,
    method: str = "mince",
    *,
    k: int | None = None,
    avgce_weights: str = "softmax-ce",
) -> FusionResult:
    """Fuse ``candidates`` (pivot first) at the same N positions.

    Args:
        candidates: one `SparseDist` ``[N, K_i]`` per candidate, pivot first.
        nll: per candidate, float ``[N]`` negative log-likelihood (nats) of the gold token at each position
            under the candidate's full distribution (`pivot_gold_nll`, `AlignedDistributions.gold_nll`).
        mask: bool ``[N]``, the response positions the CE averages over (all when None).
        method: ``mince`` or ``avgce``; ``avgce_weights``: ``softmax-ce`` or ``fusellm`` (module docstring).
        k: entries per fused row for AvgCE (default: the largest candidate K).

    Raises:
        ValueError: unknown method or weights, no candidate, or ``nll`` not one per candidate.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion {method!r}: expected one of {', '.join(FUSION_METHODS)}")
    if not candidates:
        raise ValueError("fusion needs at least the pivot's own distribution")
    if len(nll) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(nll)} gold NLL arrays")
    ces = np.array([cross_entropy(v, mask) for v in nll], dtype=np.float64)
    winner = int(np.argmin(ces))  # argmin returns the first minimum: the pivot wins ties
    weights = candidate_weights(ces, method, avgce_weights)
    if method == "mince":
        c = candidates[winner]
        return FusionResult(SparseDist(c.ids.copy(), c.probs.copy()), ces, weights, winner)
    n = candidates[0].num_positions
    k = int(k or max(c.ids.shape[1] for c in candidates))
    rows = np.concatenate([np.repeat(np.arange(n), c.ids.shape[1]) for c in candidates])
    ids = np.concatenate([c.ids.ravel() for c in candidates])
    probs = np.concatenate(
        [c.probs.astype(np.float64).ravel() * w for c, w in zip(candidates, weights, strict=True)]
    )
    return FusionResult(coo_topk(rows, ids, probs, n, k), ces, weights, winner)


def fuse_sample(pivot, aligned: list, method: str = "mince", **kwargs) -> FusionResult:
    """Fuse one pivot `ScoredSample` with its aligned sources (`AlignedDistributions`, from
    `fusion.align.align_distributions`): one source is pairwise fusion, several are multi fusion."""
    own = SparseDist.from_topk(pivot.topk_ids, pivot.topk_logprobs)
    dists = [own] + [a.dist for a in aligned]
    nll = [pivot_gold_nll(pivot)] + [a.gold_nll for a in aligned]
    return fuse(dists, nll, response_mask(pivot), method, **kwargs)
