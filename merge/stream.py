"""One parameter matrix of the pivot and of every target, streamed in chunks of contiguous elements.

A merge method sees a parameter only through `ParameterStream`: it may ask for whole-matrix statistics
(`total`, `select_top`), each one pass over the chunks, and it returns a function that merges one `Chunk`.
Reading, chunking and the compute dtype live here and in `safetensors_io`, nowhere in the methods; the
in-memory way is the same code with one chunk per matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

Reader = Callable[[int, int], torch.Tensor]  # (start, end) -> stored elements [start, end) of a flat tensor
_COUNT_BLOCK = 1 << 22


@dataclass
class Chunk:
    """Elements [start, start + n) of one flattened parameter matrix, in the compute dtype."""

    name: str
    start: int
    pivot: torch.Tensor  # (n,)
    _targets: torch.Tensor  # (N, n), one row per target model; becomes the fusion vectors in place

    @property
    def targets(self) -> torch.Tensor:
        if "deltas" in self.__dict__:
            raise RuntimeError("a method read chunk.targets after chunk.deltas, which reuses their memory")
        return self._targets

    @cached_property
    def deltas(self) -> torch.Tensor:
        """The fusion vectors, target - pivot, (N, n), computed in place over the targets to save a copy."""
        return self._targets.sub_(self.pivot)

    @property
    def size(self) -> int:
        return self.pivot.shape[0]


Score = Callable[[Chunk], torch.Tensor]  # a chunk -> one non-negative score per element, (n,)


@dataclass
class Selection:
    """Exactly k elements of a matrix with the highest score; ties at the threshold go to the lowest indices.

    `mask(chunk)` recomputes the chunk's scores (cheaper than keeping a mask the size of the matrix) and
    compares them with the threshold found once by `ParameterStream.select_top`.
    """

    score: Score
    k: int
    threshold: float = np.inf  # the k-th largest score (as float32)
    everything_positive: bool = False  # k covers every candidate: select all scores > 0 (or all elements)
    among_nonzero: bool = False
    ties_wanted: int | None = None  # elements equal to threshold to take; None: all of them
    ties_before: dict[int, int] = field(default_factory=dict)  # chunk start -> ties in earlier chunks

    def mask(self, chunk: Chunk) -> torch.Tensor:
        if self.k == 0:
            return torch.zeros(chunk.size, dtype=torch.bool)
        s = self.score(chunk).to(torch.float32)
        if self.everything_positive:
            return s > 0 if self.among_nonzero else torch.ones(chunk.size, dtype=torch.bool)
        t = torch.tensor(self.threshold, dtype=torch.float32)
        if self.ties_wanted is None:
            return s >= t
        tie = s == t
        rank = torch.cumsum(tie, 0) + self.ties_before[chunk.start]
        return (s > t) | (tie & (rank <= self.ties_wanted))


def _count(values: np.ndarray, predicate: Callable[[np.ndarray], np.ndarray]) -> int:
    """np.count_nonzero(predicate(values)) without a boolean temporary the size of `values`."""
    return sum(
        int(np.count_nonzero(predicate(values[i : i + _COUNT_BLOCK]))) for i in range(0, len(values), _COUNT_BLOCK)
    )


class ParameterStream:
    """The pivot's and every target's copy of one parameter, read chunk by chunk on each pass."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        pivot: Reader,
        targets: list[Reader],
        compute_dtype: torch.dtype,
        chunk_elements: int,
        block: int = 1024,
    ):
        self.name, self.shape = name, tuple(shape)
        self.numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        self.n_targets = len(targets)
        self.compute_dtype = compute_dtype
        self._pivot, self._targets = pivot, targets
        # Chunks start at multiples of `block`, and `total` sums whole blocks first, so every statistic, and
        # hence the output, is bitwise the same whatever the chunk size (and in memory: one chunk).
        self._block = block
        self._step = -(-max(1, chunk_elements) // block) * block

    def chunks(self) -> Iterator[Chunk]:
        """One pass over the matrix, in ascending element order."""
        for start in range(0, self.numel, self._step):
            end = min(self.numel, start + self._step)
            pivot = self._pivot(start, end).to(self.compute_dtype)
            targets = torch.empty((self.n_targets, end - start), dtype=self.compute_dtype)
            for j, read in enumerate(self._targets):
                targets[j].copy_(read(start, end))
            yield Chunk(self.name, start, pivot, targets)

    def total(self, per_element: Callable[[Chunk], torch.Tensor]) -> torch.Tensor:
        """Sum over the whole matrix of `per_element(chunk)` (shape (..., n)) along its last axis.

        Summed per block of `block` elements at fixed positions (in the compute dtype), then once over all
        block sums in float64, so the result does not depend on the chunk size.
        """
        parts = []
        b = self._block
        for chunk in self.chunks():
            v = per_element(chunk)
            full = v.shape[-1] // b * b
            parts.append(v[..., :full].reshape(*v.shape[:-1], -1, b).sum(-1).to(torch.float64))
            if full < v.shape[-1]:
                parts.append(v[..., full:].sum(-1, keepdim=True).to(torch.float64))
        return torch.cat(parts, dim=-1).sum(-1)

    def select_top(
        self, score: Score, fraction: float, *, among: Literal["all", "nonzero"] = "all"
    ) -> Selection:
        """The top `fraction` of elements by `score`: k = int(fraction * n), n = all elements or those with a
        non-zero score.

        Memory: one float32 buffer the size of the matrix (scores), partitioned in place to find the k-th
        largest; a second pass over the chunks only when ties at the threshold must be broken.
        """
        buf = np.empty(self.numel, dtype=np.float32)
        for chunk in self.chunks():
            buf[chunk.start : chunk.start + chunk.size] = score(chunk).to(torch.float32).numpy()
        candidates = _count(buf, lambda b: b != 0) if among == "nonzero" else self.numel
        k = int(fraction * candidates)
        sel = Selection(score, k, among_nonzero=among == "nonzero")
        if k == 0:
            return sel
        if k >= candidates:
            sel.everything_positive = True
            return sel
        pos = self.numel - k
        buf.partition(pos)  # in place: buf[pos] is the k-th largest, buf[pos:] >= it, buf[:pos] <= it
        t = buf[pos]
        above = _count(buf[pos + 1 :], lambda b: b > t)
        ties = (k - 1 - above) + 1 + _count(buf[:pos], lambda b: b == t)
        del buf
        sel.threshold = float(t)
        wanted = k - above
        if wanted < ties:
            sel.ties_wanted = wanted
            seen = 0
            for chunk in self.chunks():
                sel.ties_before[chunk.start] = seen
                seen += int((score(chunk).to(torch.float32) == t).sum())
        return sel
