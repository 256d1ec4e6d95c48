"""Vocabulary dimension of the alignment: which pivot token stands for a source token.

Owns the canonical byte form of every token of a tokenizer (`TokenTable`) and the three mappings of the
papers: EM (exact match of canonical bytes), MinED (minimum edit distance) and MS (mapping statistics:
pivot/source co-alignment counts over the dataset, sparse, saveable). Every mapping answers
``map(source_ids) -> pivot_ids`` with -1 for "no pivot token"; the caller counts that mass as unmapped.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusion._edit import WORD, distances_to_table, pad_bytes

SPECIAL_PREFIX = b"\x00"  # canonical form of added/special tokens: they only ever match each other
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _byte_decoder() -> dict[str, int]:
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + n).
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@dataclass
class TokenTable:
    """Canonical bytes of every token id of one tokenizer.

    Byte-level BPE pieces (``Ġ``...) are decoded to their bytes; SentencePiece's ``▁`` becomes a space and
    its ``<0xNN>`` byte-fallback pieces the byte; added/special tokens are ``b"\\x00" + content`` so that
    ``</s>`` never equals the text "</s>". Two tables of the same tokenizer have the same `fingerprint`.
    """

    pieces: list[bytes]
    is_special: np.ndarray  # bool [V]
    is_byte_fallback: np.ndarray  # bool [V]
    byte_level: bool
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    _padded: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _by_length: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.pieces:
            h.update(len(p).to_bytes(4, "little") + p)
        return h.hexdigest()[:16]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenTable:
        """Build (and cache per tokenizer object) the table of a fast Hugging Face tokenizer."""
        try:
            return _TABLES[tokenizer]
        except (KeyError, TypeError):
            pass
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        byte_level = "ByteLevel" in json.dumps(backend.get("decoder")) or "ByteLevel" in json.dumps(
            backend.get("pre_tokenizer")
        )
        vocab_size = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        added = {int(i) for i in tokenizer.added_tokens_decoder}
        added |= {int(i) for i in tokenizer.all_special_ids if i is not None}
        decoder = _byte_decoder()
        pieces: list[bytes] = []
        is_bf = np.zeros(vocab_size, dtype=bool)
        for i, tok in enumerate(tokens):
            tok = tok or ""
            if i in added:
                pieces.append(SPECIAL_PREFIX + tok.encode())
            elif byte_level:
                try:
                    pieces.append(bytes(decoder[c] for c in tok))
                except KeyError:
                    pieces.append(tok.encode())
            else:
                m = _SP_BYTE.match(tok)
                if m:
                    pieces.append(bytes([int(m.group(1), 16)]))
                    is_bf[i] = True
                else:
                    pieces.append(tok.replace("▁", " ").encode())
        is_special = np.zeros(vocab_size, dtype=bool)
        is_special[[i for i in added if i < vocab_size]] = True
        special_ids = {
            role: int(getattr(tokenizer, f"{role}_token_id"))
            for role in ("bos", "eos", "unk", "pad")
            if getattr(tokenizer, f"{role}_token_id", None) is not None
        }
        table = cls(pieces, is_special, is_bf, byte_level, special_ids)
        try:
            _TABLES[tokenizer] = table
        except TypeError:
            pass
        return table

    def nbytes(self, ids: np.ndarray) -> np.ndarray:
        """Byte length of each token's text (0 for special tokens)."""
        lengths = self.lengths()
        return np.where(self.is_special[ids], 0, lengths[ids])

    def lengths(self) -> np.ndarray:
        return self.padded()[1]

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """uint16 ``[V, 64]`` canonical bytes (truncated to 64) and their full lengths, built once."""
        if self._padded is None:
            self._padded = pad_bytes(self.pieces, WORD)
        return self._padded

    def by_length(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The regular (non-special, non-empty) tokens sorted by descending byte length, for
        `distances_to_table`: (ids, transposed padded bytes ``[64, R]``, lengths), built once."""
        if self._by_length is None:
            mat, lengths = self.padded()
            ids = np.flatnonzero(~self.is_special & (lengths > 0))
            ids = ids[np.argsort(-lengths[ids], kind="stable")]
            self._by_length = (ids, np.ascontiguousarray(mat[ids].T), lengths[ids])
        return self._by_length


class VocabMap(ABC):
    """Source id -> pivot id (-1 when there is none). ``name`` is the CLI's ``--vocab-map`` value.

    The identity (same tokenizer) is handled here once; each mapping implements `_map` for the rest."""

    name = "base"

    def __init__(self, pivot: TokenTable, source: TokenTable):
        self.pivot = pivot
        self.source = source
        self.identity = pivot.fingerprint == source.fingerprint
        # bos/eos/unk/pad correspond by role even when their strings differ (</s> vs <|im_end|>)
        self.special_pairs = {
            sid: pivot.special_ids[role]
            for role, sid in source.special_ids.items()
            if role in pivot.special_ids
        }

    def __call__(self, source_ids: np.ndarray) -> np.ndarray:
        """int32 pivot ids, shaped like ``source_ids``; -1 where there is none, including source ids outside
        the source tokenizer (``< 0``, or at or past its length: padded output heads such as Qwen's 152,064
        rows over a 151,665-token tokenizer), whose mass the caller counts as unmapped."""
        source_ids = np.asarray(source_ids, dtype=np.int64)
        known = (source_ids >= 0) & (source_ids < self.source.vocab_size)
        if self.identity:
            return np.where(known & (source_ids < self.pivot.vocab_size), source_ids, -1).astype(np.int32)
        out = np.full(source_ids.shape, -1, dtype=np.int32)
        if known.all():
            return self._map(source_ids).astype(np.int32)
        out[known] = self._map(source_ids[known])
        return out

    @abstractmethod
    def _map(self, source_ids: np.ndarray) -> np.ndarray:
        """Pivot ids for `source_ids` when the tokenizers differ."""


class ExactMatch(VocabMap):
    """EM: the pivot token whose canonical bytes equal the source token's (whitespace markers and byte-level
    encoding normalised away). Among equal pivot pieces, a regular token wins over a byte-fallback one, then
    the lower id. Precomputed for the whole source vocabulary on first use (a dict lookup per token)."""

    name = "em"

    def __init__(self, pivot: TokenTable, source: TokenTable):
        super().__init__(pivot, source)
        self._em: np.ndarray | None = None

    def _map(self, source_ids: np.ndarray) -> np.ndarray:
        return self._table()[source_ids]

    def _table(self) -> np.ndarray:
        if self._em is None:
            index: dict[bytes, int] = {}
            order = np.lexsort((np.arange(self.pivot.vocab_size), self.pivot.is_byte_fallback))
            for pid in order[::-1]:  # reverse so that the preferred id is written last
                index[self.pivot.pieces[pid]] = int(pid)
            m = np.fromiter(
                (index.get(p, -1) for p in self.source.pieces), dtype=np.int32, count=self.source.vocab_size
            )
            for sid, pid in self.special_pairs.items():
                m[sid] = pid
            self._em = m
        return self._em


class MinEditDistance(ExactMatch):
    """MinED: the pivot token at minimum edit distance (over canonical bytes) from the source token.

    Ties: a regular token before a byte-fallback one (``00`` -> ``0``, not ``<0x30>``), then the smaller
    length difference, then the lower pivot id. Special tokens map only by EM / role.
    Exact matches are taken from EM; the rest are computed lazily for the ids actually seen and cached,
    each one vectorised against the whole pivot vocabulary (bit-parallel Levenshtein).
    """

    name = "mined"

    def __init__(self, pivot: TokenTable, source: TokenTable):
        super().__init__(pivot, source)
        self._done: np.ndarray | None = None

    def _map(self, source_ids: np.ndarray) -> np.ndarray:
        table = self._table()
        todo = np.unique(source_ids[~self._done[source_ids]])
        for sid in todo:
            table[sid] = self._nearest(int(sid))
            self._done[sid] = True
        return table[source_ids]

    def _table(self) -> np.ndarray:
        table = super()._table()
        if self._done is None:
            self._done = (table >= 0) | self.source.is_special
        return table

    def _nearest(self, sid: int) -> int:
        piece = self.source.pieces[sid]
        if not piece:
            return -1
        ids, table_t, lengths = self.pivot.by_length()
        if ids.size == 0:
            return -1
        dist = distances_to_table(piece, table_t, lengths)
        best = np.flatnonzero(dist == dist.min())
        # ties: a regular token before a byte-fallback one (SentencePiece's <0xNN> pieces only stand for
        # bytes it has no piece for, so a model rarely predicts them), then the smaller length difference,
        # then the lower id
        order = np.lexsort(
            (ids[best], np.abs(lengths[best] - len(piece)), self.pivot.is_byte_fallback[ids[best]])
        )
        return int(ids[best[order[0]]])


class MappingStatistics:
    """MS: how often each (source token, pivot token) pair is aligned, over a whole dataset.

    Stored sparse as sorted keys ``source_id * pivot_vocab + pivot_id`` (uint32 when the product of the
    vocabularies fits, as for 131k x 32k, else int64) with two uint32 counts per key: ``counts``, how often
    the pair lies in one group, and ``start_counts``, how often both tokens *start* their group (the pivot
    token is then what the pivot predicts at the position where the source predicts the source token).
    12 bytes per distinct pair that was ever co-aligned, nothing for the 4e9 that never were. Add
    alignments with `add`, then `save`/`load`.
    """

    def __init__(self, pivot_vocab: int, source_vocab: int, meta: dict | None = None):
        self.pivot_vocab = int(pivot_vocab)
        self.source_vocab = int(source_vocab)
        self.meta = dict(meta or {})
        self.key_dtype = np.uint32 if self.pivot_vocab * self.source_vocab <= 2**32 else np.int64
        self.keys = np.zeros(0, dtype=self.key_dtype)
        self.counts = np.zeros(0, dtype=np.uint32)
        self.start_counts = np.zeros(0, dtype=np.uint32)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0
        self._best: np.ndarray | None = None

    def add(
        self, alignment, pivot_input_ids: np.ndarray, source_input_ids: np.ndarray, *, many_to_many=False
    ):
        """Count every (pivot token, source token) pair inside each group of ``alignment`` (n-m groups are
        skipped unless ``many_to_many``, their pairs being mostly noise), and separately the pair of the
        first tokens of each counted group."""
        pi, si, first = alignment.token_pairs(many_to_many=many_to_many, with_first=True)
        keys = source_input_ids[si].astype(np.int64) * self.pivot_vocab + pivot_input_ids[pi].astype(np.int64)
        self._pending.append((keys, first))
        self._pending_size += keys.size
        self._best = None
        if self._pending_size > 4_000_000:
            self.compact()

    def compact(self) -> None:
        """Fold pending pairs into the sorted arrays (called automatically; cheap to call again)."""
        if not self._pending:
            return
        keys = np.concatenate([self.keys.astype(np.int64)] + [k for k, _ in self._pending])
        counts = np.concatenate(
            [self.counts.astype(np.int64)] + [np.ones(k.size, np.int64) for k, _ in self._pending]
        )
        starts = np.concatenate(
            [self.start_counts.astype(np.int64)] + [f.astype(np.int64) for _, f in self._pending]
        )
        self._pending, self._pending_size = [], 0
        ukeys, inv = np.unique(keys, return_inverse=True)
        self.keys = ukeys.astype(self.key_dtype)
        self.counts = np.bincount(inv, weights=counts, minlength=ukeys.size).astype(np.uint32)
        self.start_counts = np.bincount(inv, weights=starts, minlength=ukeys.size).astype(np.uint32)

    @property
    def nbytes(self) -> int:
        self.compact()
        best = 0 if self._best is None else self._best.nbytes
        return int(self.keys.nbytes + self.counts.nbytes + self.start_counts.nbytes + best)

    @property
    def num_pairs(self) -> int:
        self.compact()
        return int(self.keys.size)

    def count(self, pivot_ids: np.ndarray, source_ids: np.ndarray) -> np.ndarray:
        """Co-alignment counts of the pairs ``(pivot_ids[i], source_ids[i])`` (0 when never seen)."""
        self.compact()
        q = np.asarray(source_ids, dtype=np.int64) * self.pivot_vocab + np.asarray(pivot_ids, dtype=np.int64)
        if self.keys.size == 0:
            return np.zeros(q.shape, dtype=np.int64)
        q = q.astype(self.key_dtype)
        pos = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        return np.where(self.keys[pos] == q, self.counts[pos], 0).astype(np.int64)

    def best_pivot(self) -> np.ndarray:
        """int32 ``[source_vocab]``: most frequent pivot partner of each source id, -1 for source ids never
        aligned. Ties on the count (typically the n pieces of one source token that spans n pivot tokens,
        ``Ġconcise`` = ``▁conc`` + ``ise``, every one counted once per occurrence) go to the partner that
        most often starts the group with it, i.e. the piece the pivot predicts next where the source
        predicts that token (``▁conc``), then to the lower pivot id."""
        self.compact()
        if self._best is None:
            keys = self.keys.astype(np.int64)
            src, piv = keys // self.pivot_vocab, keys % self.pivot_vocab
            order = np.lexsort((piv, -self.start_counts.astype(np.int64), -self.counts.astype(np.int64), src))
            src, piv = src[order], piv[order]
            first = np.flatnonzero(np.r_[True, src[1:] != src[:-1]]) if src.size else np.zeros(0, np.int64)
            best = np.full(self.source_vocab, -1, dtype=np.int32)
            best[src[first]] = piv[first]
            self._best = best
        return self._best

    def to_bytes(self) -> bytes:
        """The statistics as a compressed ``.npz`` (keys, counts, meta): what is saved next to the targets."""
        self.compact()
        meta = json.dumps({**self.meta, "pivot_vocab": self.pivot_vocab, "source_vocab": self.source_vocab})
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            keys=self.keys,
            counts=self.counts,
            start_counts=self.start_counts,
            meta=np.frombuffer(meta.encode(), np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> MappingStatistics:
        with np.load(io.BytesIO(data)) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            stats = cls(meta.pop("pivot_vocab"), meta.pop("source_vocab"), meta)
            stats.keys = z["keys"].astype(stats.key_dtype)
            stats.counts = z["counts"].astype(np.uint32)
            # statistics saved before start counts existed: ties then fall back to the lower pivot id
            stats.start_counts = (
                z["start_counts"].astype(np.uint32) if "start_counts" in z else np.zeros_like(stats.counts)
            )
        return stats

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> MappingStatistics:
        return cls.from_bytes(Path(path).read_bytes())


class StatisticsMap(VocabMap):
    """MS: each source id maps to its most frequent co-aligned pivot token; ids the statistics never saw
    fall back to ``fallback`` (EM by default, MinED, or None for unmapped)."""

    name = "ms"

    def __init__(
        self, pivot: TokenTable, source: TokenTable, stats: MappingStatistics, fallback: str | None = "em"
    ):
        super().__init__(pivot, source)
        if (stats.pivot_vocab, stats.source_vocab) != (pivot.vocab_size, source.vocab_size):
            raise ValueError(
                f"mapping statistics are for vocabularies {stats.pivot_vocab}x{stats.source_vocab}, "
                f"not {pivot.vocab_size}x{source.vocab_size}: rebuild them for this pivot and source"
            )
        self.stats = stats
        self.fallback = {"em": ExactMatch, "mined": MinEditDistance, None: None}[fallback]
        self.fallback = self.fallback(pivot, source) if self.fallback else None

    def _map(self, source_ids: np.ndarray) -> np.ndarray:
        out = self.stats.best_pivot()[source_ids].copy()
        for sid, pid in self.special_pairs.items():
            out[source_ids == sid] = pid
        if self.fallback is not None and (out < 0).any():
            miss = out < 0
            out[miss] = self.fallback(source_ids[miss])
        return out


def build_vocab_map(
    method: str, pivot: TokenTable, source: TokenTable, stats: MappingStatistics | None = None
) -> VocabMap:
    """The `VocabMap` named by ``--vocab-map`` (``em``, ``mined`` or ``ms``; ``ms`` needs ``stats``)."""
    if method == "em":
        return ExactMatch(pivot, source)
    if method == "mined":
        return MinEditDistance(pivot, source)
    if method == "ms":
        if stats is None:
            raise ValueError("--vocab-map ms needs mapping statistics: build them with MappingStatistics.add")
        return StatisticsMap(pivot, source, stats)
    raise ValueError(f"unknown vocabulary mapping {method!r}: expected em, mined or ms")
