"""Sparse per-position distributions: ``ids [N, K]`` (pivot vocabulary, -1 = padding) with ``probs [N, K]``.

One representation for the pivot's own top-k, an aligned source and a fused target, plus the one
vectorised kernel they all need: combine weighted (row, id, prob) entries, sum duplicates, keep top-K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseDist:
    """Top-K distribution per position over the pivot vocabulary.

    Attributes:
        ids: int32 ``[N, K]`` pivot token ids by descending probability; -1 pads rows with fewer entries.
        probs: float32 ``[N, K]`` probabilities (0 on padding); each row sums to at most 1.
    """

    ids: np.ndarray
    probs: np.ndarray

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_topk(cls, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> SparseDist:
        """A stored top-k (int ``[N, K]`` ids, float ``[N, K]`` log-probabilities in nats) as probabilities.

        Rows are not renormalised, except that a row summing to more than 1 (a decoded top-k can: the
        codec rounds each log-probability to its grid, so a confident top-1 of -0.004 nat may come back
        as 0) is scaled down to sum to 1 (`topk_probs`)."""
        return cls(np.asarray(topk_ids, dtype=np.int32), topk_probs(topk_logprobs).astype(np.float32))

    def prob_of(self, token_ids: np.ndarray) -> np.ndarray:
        """float64 ``[N]``: probability of ``token_ids[n]`` at position n (0 when outside the top-K)."""
        hit = self.ids == np.asarray(token_ids)[:, None]
        return np.where(hit, self.probs.astype(np.float64), 0.0).sum(axis=1)


def topk_probs(topk_logprobs: np.ndarray) -> np.ndarray:
    """float64 ``[N, K]`` probabilities of stored top-k log-probabilities (nats), each row scaled down to
    sum to 1 when it sums to more (quantisation of the stored log-probabilities; never an error).

    Rows summing to at most 1 are returned as ``exp(logprob)`` unchanged: the missing mass is the tail
    outside the top-k. The excess of a decoded row is bounded by the codec's error bound (``e^bound - 1``),
    so the scaling moves each probability by at most that relative amount."""
    probs = np.exp(np.asarray(topk_logprobs, dtype=np.float64))
    if probs.ndim == 2 and probs.size:
        total = probs.sum(axis=1)
        over = total > 1.0
        if over.any():
            probs[over] /= total[over, None]
    return probs


def coo_topk(rows: np.ndarray, ids: np.ndarray, probs: np.ndarray, num_rows: int, k: int) -> SparseDist:
    """Sum ``probs`` of equal (row, id) entries, drop ids < 0 and zero mass, keep the ``k`` largest per row.

    Ties are broken by the lower id, so the result is deterministic.
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    ids = np.asarray(ids, dtype=np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    keep = (ids >= 0) & (probs > 0)
    rows, ids, probs = rows[keep], ids[keep], probs[keep]
    out_ids = np.full((num_rows, k), -1, dtype=np.int32)
    out_probs = np.zeros((num_rows, k), dtype=np.float32)
    if rows.size == 0:
        return SparseDist(out_ids, out_probs)
    order = np.lexsort((ids, rows))
    rows, ids, probs = rows[order], ids[order], probs[order]
    starts = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])])
    sums = np.add.reduceat(probs, starts)
    urows, uids = rows[starts], ids[starts]
    order = np.lexsort((uids, -sums, urows))
    urows, uids, sums = urows[order], uids[order], sums[order]
    first = np.flatnonzero(np.r_[True, urows[1:] != urows[:-1]])
    rank = np.arange(urows.size) - np.repeat(first, np.diff(np.r_[first, urows.size]))
    sel = rank < k
    out_ids[urows[sel], rank[sel]] = uids[sel]
    out_probs[urows[sel], rank[sel]] = sums[sel]
    return SparseDist(out_ids, out_probs)
