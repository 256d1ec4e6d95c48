"""Static-model entropy coding of integer streams with `constriction`'s rANS coder (a maintained Rust
library: https://bamler-lab.github.io/constriction/), for the top-k codec (`datastore.codec`).

The encoder groups symbols into *classes* (one categorical model each, e.g. "logprob gap at rank 3 after
a small gap"), counts each class's histogram over the whole shard, stores the histograms (log-quantised,
~one byte per symbol) beside the data, and codes every class's symbols with its model into one ANS stack.
The decoder rebuilds the same models from the same bytes, so both sides agree bit for bit.

Integers of any size (< 2**32) go through `IntClass`: values below `limit` are a symbol each; larger ones
are the symbol ``limit + b - 1`` (``b`` = bit length of ``v - limit + 1``) followed by the ``b - 1`` low
bits, coded uniformly in chunks of at most 16 bits (Elias-gamma with a learned prefix).

Order: an ANS coder is a stack. `Encoder` queues (values, class) groups in decode order and writes them in
reverse at `finish()`; the decoder calls `Decoder.read` in that same order.
"""

from __future__ import annotations

import constriction
import numpy as np

_MAX_BITS = 32  # values < 2**32 - 1 + limit
_CHUNK = 16


def _bitlen(u: np.ndarray) -> np.ndarray:
    """Bit length of positive int64 values (exact, no floating point)."""
    u = np.asarray(u, dtype=np.int64)
    out = np.zeros(u.shape, dtype=np.int64)
    x = u.copy()
    for shift in (32, 16, 8, 4, 2, 1):
        big = x >= (1 << shift)
        out[big] += shift
        x[big] >>= shift
    return out + (x > 0)


def quantise_counts(counts: np.ndarray) -> np.ndarray:
    """Histogram counts -> uint16 ``rint(16 * log2(1 + count))`` (0 stays 0; a seen symbol gets >= 16;
    one byte while counts stay below ~62k, as `datastore.codec._pack_arrays` stores the planes in use)."""
    return np.rint(16 * np.log2(1.0 + np.asarray(counts, np.float64))).astype(np.uint16)


def _probs(qcounts: np.ndarray) -> np.ndarray:
    """Model probabilities (unnormalised) from quantised counts; constriction normalises them, and gives
    every symbol of the alphabet at least its smallest representable probability."""
    q = np.asarray(qcounts, dtype=np.float64)
    return np.where(q > 0, np.exp2(q / 16) - 1.0, 0.0)


class IntClass:
    """The symbol alphabet of one class: ``0..limit-1`` literal, then one symbol per escape bit length."""

    def __init__(self, limit: int):
        self.limit = int(limit)

    def symbols(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """values -> (symbols int32, raw low bits int64, their bit counts) for the escaped values."""
        v = np.asarray(values, dtype=np.int64)
        esc = v >= self.limit
        u = v[esc] - self.limit + 1
        if u.size and int(u.max()) >= 2**_MAX_BITS:
            raise ValueError(f"value {int(v.max())} too large for the entropy coder")
        nb = _bitlen(u)
        sym = v.copy()
        sym[esc] = self.limit + nb - 1
        return sym.astype(np.int32), u - (np.int64(1) << (nb - 1)), nb - 1


def _chunks(raw: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw low bits -> uniform symbols and their alphabet sizes (chunks of <= 16 bits, 0-bit values none)."""
    lo_bits = np.minimum(bits, _CHUNK)
    hi_bits = bits - lo_bits
    sel_lo, sel_hi = lo_bits > 0, hi_bits > 0
    lo = raw & ((np.int64(1) << lo_bits) - 1)
    hi = raw >> lo_bits
    # interleave per value: low chunk then high chunk
    n = len(raw)
    sym = np.stack([lo, hi], axis=1).reshape(-1)
    size = np.stack([np.int64(1) << lo_bits, np.int64(1) << hi_bits], axis=1).reshape(-1)
    keep = np.stack([sel_lo, sel_hi], axis=1).reshape(-1) if n else np.zeros(0, bool)
    return sym[keep].astype(np.int32), size[keep].astype(np.int32)


class Encoder:
    """Collects classes of symbols in decode order; `finish()` returns (ANS words, quantised histograms)."""

    def __init__(self):
        self._groups: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]] = []
        self._hist: dict[str, np.ndarray] = {}
        self._limits: dict[str, IntClass] = {}

    def write(self, name: str, values: np.ndarray, limit: int) -> None:
        """Queue `values` (non-negative ints) under the class `name` (its alphabet: `IntClass(limit)`)."""
        cls = self._limits.setdefault(name, IntClass(limit))
        if cls.limit != limit:
            raise ValueError(f"class {name} written with two limits")
        sym, raw, bits = cls.symbols(values)
        if sym.size:
            h = np.bincount(sym, minlength=1)
            old = self._hist.get(name, np.zeros(0, np.int64))
            size = max(len(h), len(old))
            self._hist[name] = np.pad(old, (0, size - len(old))) + np.pad(h, (0, size - len(h)))
        self._groups.append((sym, raw, bits, name))

    def write_bits(self, name: str, values: np.ndarray, bits: np.ndarray) -> None:
        """Queue `values` as raw uniform bits, ``bits[i]`` of them for ``values[i]`` (0 to 32 each)."""
        v = np.asarray(values, dtype=np.int64)
        self._groups.append((np.zeros(0, np.int32), v, np.asarray(bits, dtype=np.int64), name))

    def finish(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        hists = {name: quantise_counts(h) for name, h in self._hist.items()}
        models = {name: _model(q) for name, q in hists.items()}
        coder = constriction.stream.stack.AnsCoder()
        uniform = constriction.stream.model.Uniform()
        for sym, raw, bits, name in reversed(self._groups):
            if raw.size:
                chunk, size = _chunks(raw, bits)
                if chunk.size:
                    coder.encode_reverse(chunk, uniform, size)
            if sym.size:
                coder.encode_reverse(sym, models[name])
        self._final = hists
        return np.asarray(coder.get_compressed(), dtype=np.uint32), hists

    def costs(self) -> dict[str, float]:
        """Bytes each class family (the class name up to its first '.') costs under its model, raw escape
        bits included: an estimate within a few bytes of the ANS stream's share (after `finish`)."""
        out: dict[str, float] = {}
        logp = {}
        for name, q in self._final.items():
            p = _probs(q)
            logp[name] = -np.log2(np.maximum(p / p.sum(), 2.0**-24))
        for sym, _raw, bits, name in self._groups:
            key = name.split(".")[0]
            if sym.size:
                out[key] = out.get(key, 0.0) + (logp[name][sym].sum() + bits.sum()) / 8
            elif bits is not None and bits.size:
                out[key] = out.get(key, 0.0) + bits.sum() / 8
        return out


def _model(qcounts: np.ndarray):
    p = _probs(qcounts)
    if len(p) == 1:  # constriction needs two symbols; a second one that is never used costs ~nothing
        p = np.array([p[0], 0.0])
    return constriction.stream.model.Categorical(p, perfect=False)


class Decoder:
    """Reads classes back in the order the encoder wrote them."""

    def __init__(self, words: np.ndarray, hists: dict[str, np.ndarray], limits: dict[str, int]):
        self._coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        self._models = {name: _model(q) for name, q in hists.items()}
        self._limits = limits
        self._uniform = constriction.stream.model.Uniform()

    def read_bits(self, bits: np.ndarray) -> np.ndarray:
        """The next raw values written by `Encoder.write_bits`, ``bits[i]`` bits each (int64)."""
        bits = np.asarray(bits, dtype=np.int64)
        return self._raw(bits) if bits.size else np.zeros(0, dtype=np.int64)

    def _raw(self, bits: np.ndarray) -> np.ndarray:
        lo_bits = np.minimum(bits, _CHUNK)
        hi_bits = bits - lo_bits
        sizes = np.stack([np.int64(1) << lo_bits, np.int64(1) << hi_bits], axis=1).reshape(-1)
        keep = sizes > 1
        raw = np.zeros(2 * len(bits), dtype=np.int64)
        if keep.any():
            raw[keep] = self._coder.decode(self._uniform, sizes[keep].astype(np.int32))
        raw = raw.reshape(-1, 2)
        return raw[:, 0] + (raw[:, 1] << lo_bits)

    def read(self, name: str, count: int) -> np.ndarray:
        """The next `count` values of class `name` (int64)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        if name not in self._models:
            raise ValueError(f"corrupt shard: no model for the {count} values of {name}")
        limit = self._limits[name]
        sym = np.asarray(self._coder.decode(self._models[name], count), dtype=np.int64)
        esc = sym >= limit
        if esc.any():
            bits = sym[esc] - limit
            sym[esc] = (np.int64(1) << bits) + self._raw(bits) + limit - 1
        return sym
