"""Vectorised Levenshtein distance over many string pairs at once (Myers/Hyyrö bit-parallel algorithm).

Strings are byte arrays padded into a matrix. The shorter string of each pair is the bit-vector "pattern"
and is truncated to 64 bytes (one uint64 word); tokens longer than that are rare and the distance is then
computed on their first 64 bytes. One pass over the longer string's bytes updates every pair at once, so
the Python loop runs over byte positions (a few dozen), never over pairs or cells.
"""

from __future__ import annotations

import numpy as np

WORD = 64
_PAD_A = 256  # padding symbols that never equal a byte, nor each other
_PAD_B = 257
_POW2 = np.left_shift(np.uint64(1), np.arange(WORD, dtype=np.uint64))


def pad_bytes(
    pieces: list[bytes], width: int | None = None, pad: int = _PAD_A
) -> tuple[np.ndarray, np.ndarray]:
    """``pieces`` as a uint16 matrix ``[P, width]`` padded with ``pad``, and their (untruncated) lengths."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    w = int(lengths.max(initial=0)) if width is None else width
    out = np.full((len(pieces), max(w, 1)), pad, dtype=np.uint16)
    if len(pieces) and w:
        flat = np.frombuffer(b"".join(p[:w] for p in pieces), dtype=np.uint8)
        clipped = np.minimum(lengths, w)
        rows = np.repeat(np.arange(len(pieces)), clipped)
        cols = np.arange(flat.size) - np.repeat(np.cumsum(clipped) - clipped, clipped)
        out[rows, cols] = flat
    return out, lengths


def edit_distance(
    a: np.ndarray, a_len: np.ndarray, b: np.ndarray, b_len: np.ndarray, *, contains: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Levenshtein distance of pairs ``(a[p, :a_len[p]], b[p, :b_len[p]])``.

    ``a`` / ``b`` are padded uint16 matrices (see `pad_bytes`); rows are swapped internally so that the
    shorter string is the pattern. With ``contains=True`` also returns whether the shorter string is a
    substring of the longer one (semi-global run of the same recurrence), the papers' 0.1 cost discount.
    """
    a_len = np.asarray(a_len, dtype=np.int64)
    b_len = np.asarray(b_len, dtype=np.int64)
    swap = a_len > b_len
    width = max(a.shape[1], b.shape[1])
    a = _widen(a, width, _PAD_A)
    b = _widen(b, width, _PAD_B)
    pat = np.where(swap[:, None], b, a)[:, :WORD]
    txt = np.where(swap[:, None], a, b)
    # the pattern must not match padding of the text and vice versa: re-pad with distinct symbols
    m = np.minimum(np.where(swap, b_len, a_len), WORD)
    n = np.where(swap, a_len, b_len)
    cols = np.arange(pat.shape[1])
    pat = np.where(cols[None, :] < m[:, None], pat, _PAD_A)
    txt = np.where(np.arange(txt.shape[1])[None, :] < n[:, None], txt, _PAD_B)

    mu = m.astype(np.uint64)
    full = np.where(m >= WORD, ~np.uint64(0), np.left_shift(np.uint64(1), np.minimum(mu, 63)) - np.uint64(1))
    high = np.where(m > 0, np.left_shift(np.uint64(1), np.maximum(mu, 1) - np.uint64(1)), np.uint64(0))
    one = np.uint64(1)
    pv, mv = full.copy(), np.zeros_like(full)
    score = m.copy()
    if contains:
        pv2, mv2 = full.copy(), np.zeros_like(full)
        score2, best2 = m.copy(), m.copy()
    pow2 = _POW2[: pat.shape[1]]
    for j in range(int(n.max(initial=0))):
        active = j < n
        eq = ((pat == txt[:, j : j + 1]) * pow2).sum(axis=1, dtype=np.uint64)
        pv, mv, d = _step(eq, pv, mv, full, high, one)
        score = score + np.where(active, d, 0)
        if contains:
            pv2, mv2, d2 = _step(eq, pv2, mv2, full, high, np.uint64(0))
            score2 = score2 + d2
            best2 = np.where(active, np.minimum(best2, score2), best2)
    dist = np.where(m == 0, n, score)
    return dist, (best2 == 0) if contains else None


def _step(eq, pv, mv, full, high, shift_in):
    xv = eq | mv
    xh = (((eq & pv) + pv) ^ pv) | eq
    ph = mv | ~(xh | pv)
    mh = pv & xh
    d = ((ph & high) != 0).astype(np.int64) - ((mh & high) != 0).astype(np.int64)
    ph = (ph << np.uint64(1)) | shift_in
    mh = mh << np.uint64(1)
    return (mh | ~(xv | ph)) & full, (ph & xv) & full, d


def distances_to_table(query: bytes, table_t: np.ndarray, table_len: np.ndarray) -> np.ndarray:
    """Levenshtein distance of one byte string to every row of a table, in one pass over the table's columns.

    ``table_t`` is the table transposed (``[width, R]``, uint16, rows sorted by descending length, see
    `TokenTable.by_length`) and ``table_len`` the rows' lengths (same order). The query (its first 64
    bytes) is the bit-vector pattern; step j reads byte j of every row still longer than j, so the work
    is the table's total length, not rows x width. Rows longer than the table's width (64 bytes: 8 of
    the 131k byte-level BPE tokens) count their extra bytes as insertions, an upper bound.
    """
    q = np.frombuffer(query[:WORD], dtype=np.uint8)
    m = q.size
    lengths = np.asarray(table_len, dtype=np.int64)
    if m == 0:
        return lengths.copy()
    peq = np.zeros(258, dtype=np.uint64)
    np.bitwise_or.at(peq, q, _POW2[:m])
    full = ~np.uint64(0) if m == WORD else np.uint64((1 << m) - 1)
    high = np.uint64(1 << (m - 1))
    one = np.uint64(1)
    r = lengths.size
    pv = np.full(r, full, dtype=np.uint64)
    mv = np.zeros(r, dtype=np.uint64)
    score = np.full(r, m, dtype=np.int64)
    width = min(table_t.shape[0], int(lengths.max(initial=0)))
    # rows are sorted by descending length: the rows longer than j are a prefix
    active = np.searchsorted(-np.minimum(lengths, width), -np.arange(width), side="left")
    for j in range(width):
        a = int(active[j])
        eq = peq[table_t[j, :a]]
        pv[:a], mv[:a], d = _step(eq, pv[:a], mv[:a], full, high, one)
        score[:a] += d
    return score + np.maximum(lengths - width, 0)


def _widen(x: np.ndarray, width: int, pad: int) -> np.ndarray:
    if x.shape[1] >= width:
        return x
    out = np.full((x.shape[0], width), pad, dtype=np.uint16)
    out[:, : x.shape[1]] = x
    return out
