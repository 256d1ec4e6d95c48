"""Sequence dimension of the alignment: which pivot tokens and which source tokens cover the same text,
and the source's top-k distributions carried over to the pivot's scored positions.

Two aligners yield the same `Alignment`:
- ``offsets`` (default, exact): cut both tokenizations at the byte positions where both have a token
  boundary, from the fast tokenizers' character offsets refined to bytes (byte-level BPE and byte-fallback
  pieces that split a multi-byte character share its character offsets).
- ``dtw``: FuseChat-1.0's dynamic time warping over token strings (edit-distance cost, 0.1 discount when
  one string contains the other) on canonical token bytes (whitespace markers and byte-level encoding
  normalised), banded and computed by anti-diagonal wavefront in numpy, for parity with published results.
- ``dtw2``: FuseChat-2.0's variant: the same DTW over each token decoded on its own
  (``tokenizer.decode([id])``, compared per character), with no containment discount.

Groups are named source-to-pivot as in FuseChat: ``1-1``; ``1-n`` one source token covering n pivot
tokens; ``n-1`` n source tokens covering one pivot token; ``n-m`` when neither side has a boundary inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fusion._edit import edit_distance, pad_bytes
from fusion._sparse import SparseDist, coo_topk, topk_probs
from fusion.vocab import MappingStatistics, TokenTable, VocabMap

KIND_NAMES = ("1-1", "1-n", "n-1", "n-m")
CLIP_START = 1  # Alignment.pivot_clipped / source_clipped flags
CLIP_END = 2
ALIGN_METHODS = ("offsets", "dtw", "dtw2")
DTW_TIES = ("pivot", "source")


class AlignmentError(ValueError):
    """A sample cannot be aligned (no text, tokens that do not reproduce its input_ids, ...)."""


@dataclass
class Alignment:
    """Groups of consecutive pivot tokens and source tokens that cover the same text.

    Group ``g`` is pivot tokens ``[pivot_start[g], pivot_end[g])`` and source tokens
    ``[source_start[g], source_end[g])`` (indices into each sample's ``input_ids``), groups ascending and
    disjoint. Tokens in no group (template and zero-width special tokens, text outside the aligned
    segments, a truncated tail) are simply not covered. Four int32 arrays of G entries: a 2048-token
    sample costs ~32 KB.

    Attributes:
        anchor_pivot / anchor_source: int32 token indices whose contexts end at the same text point
            outside any group: the token just before each aligned segment (e.g. the last template token
            before an assistant turn), so the position predicting a turn's first token is covered too.
        coverage: characters of the aligned text, and how many fall in groups / in n-m groups.
    """

    pivot_start: np.ndarray
    pivot_end: np.ndarray
    source_start: np.ndarray
    source_end: np.ndarray
    num_pivot_tokens: int
    num_source_tokens: int
    method: str = "offsets"
    anchor_pivot: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    anchor_source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    coverage: dict = field(default_factory=dict)
    byte_start: np.ndarray | None = None  # offsets aligner: group extents in the segments' common bytes
    byte_end: np.ndarray | None = None
    # uint8 [num tokens] per side: CLIP_START / CLIP_END when the token's text reaches before / past the
    # aligned segment it was clipped to (a BPE merge across the template boundary: ``.`` + ``<|im_end|>``
    # -> ``.<`` when the end marker is not special); None when nothing was clipped
    pivot_clipped: np.ndarray | None = None
    source_clipped: np.ndarray | None = None

    @property
    def num_groups(self) -> int:
        return int(self.pivot_start.size)

    def kinds(self) -> np.ndarray:
        """int8 ``[G]``: 0 ``1-1``, 1 ``1-n`` (1 source, n pivot), 2 ``n-1`` (n source, 1 pivot), 3 ``n-m``."""
        np_ = self.pivot_end - self.pivot_start
        ns = self.source_end - self.source_start
        return np.select([(np_ == 1) & (ns == 1), ns == 1, np_ == 1], [0, 1, 2], 3).astype(np.int8)

    def kind_counts(self) -> dict[str, int]:
        counts = np.bincount(self.kinds(), minlength=4)
        return {name: int(c) for name, c in zip(KIND_NAMES, counts, strict=True)}

    def group_tuples(self) -> set[tuple[int, int, int, int]]:
        return set(
            zip(
                self.pivot_start.tolist(),
                self.pivot_end.tolist(),
                self.source_start.tolist(),
                self.source_end.tolist(),
                strict=True,
            )
        )

    def token_pairs(self, *, many_to_many: bool = False, with_first: bool = False):
        """Every (pivot token index, source token index) pair inside a group: what mapping statistics count.

        Returns int64 ``[P]`` pivot and source token indices; with ``with_first`` also bool ``[P]``, True for
        the pair of the first tokens of each group (both start at the same text point)."""
        keep = np.ones(self.num_groups, bool) if many_to_many else self.kinds() != 3
        ps, ss = self.pivot_start[keep].astype(np.int64), self.source_start[keep].astype(np.int64)
        npv = self.pivot_end[keep] - ps
        nsr = self.source_end[keep] - ss
        sizes = npv * nsr
        gid = np.repeat(np.arange(sizes.size), sizes)
        local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        pi, si = ps[gid] + local // nsr[gid], ss[gid] + local % nsr[gid]
        if with_first:
            return pi, si, local == 0
        return pi, si

    def open_end(self) -> np.ndarray:
        """bool ``[G]``: groups whose last pivot or source token reaches past the segment's end (clipped):
        its context then holds text beyond the group, so the group end is no common text point."""
        out = np.zeros(self.num_groups, dtype=bool)
        if self.pivot_clipped is not None:
            out |= (self.pivot_clipped[self.pivot_end - 1] & CLIP_END) > 0
        if self.source_clipped is not None:
            out |= (self.source_clipped[self.source_end - 1] & CLIP_END) > 0
        return out

    def open_start(self) -> np.ndarray:
        """bool ``[G]``: groups whose first pivot or source token starts before the segment (clipped)."""
        out = np.zeros(self.num_groups, dtype=bool)
        if self.pivot_clipped is not None:
            out |= (self.pivot_clipped[self.pivot_start] & CLIP_START) > 0
        if self.source_clipped is not None:
            out |= (self.source_clipped[self.source_start] & CLIP_START) > 0
        return out

    def context_map(self) -> np.ndarray:
        """int32 ``[num_pivot_tokens]``: for pivot token t, the source token s whose prefix ends at the same
        text point (last tokens of a group; anchors), else -1. Pivot position t (predicting token t + 1)
        takes the source distribution at position s. A group whose last token on either side was clipped
        at the segment's end (`open_end`) gives no pair: ``Paris.`` + ``<|im_end|>`` tokenised ``.<`` by a
        source without that special token must not give the source's distribution after ``<`` to the
        pivot position that predicts ``<|im_end|>`` (nor the converse)."""
        out = np.full(self.num_pivot_tokens, -1, dtype=np.int32)
        out[self.anchor_pivot] = self.anchor_source
        ok = ~self.open_end()
        out[self.pivot_end[ok] - 1] = self.source_end[ok] - 1
        return out

    @staticmethod
    def identity(num_tokens: int, start: int = 0) -> Alignment:
        idx = np.arange(start, num_tokens, dtype=np.int32)
        return Alignment(idx, idx + 1, idx, idx + 1, num_tokens, num_tokens, "identity")


# ---------------------------------------------------------------------------------------------------
# offsets


def token_offsets(tokenizer, input_ids: np.ndarray, text: str) -> np.ndarray:
    """int64 ``[T, 2]`` character offsets of ``input_ids`` in ``text``, by re-encoding ``text``.

    The stored record keeps ids, not offsets; a fast tokenizer reproduces the ids (a prefix of them when
    the sample was truncated), with or without the special tokens it adds itself (then zero-width).
    """
    ids = np.asarray(input_ids)
    # the Rust tokenizer directly when there is one: the transformers wrapper costs as much again
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for add_special in (False, True):
        if backend is not None:
            enc = backend.encode(text, add_special_tokens=add_special)
            got, offsets = enc.ids, enc.offsets
        else:
            enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
            got, offsets = enc["input_ids"], enc["offset_mapping"]
        got = np.asarray(got)
        if got.size >= ids.size and np.array_equal(got[: ids.size], ids):
            return np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[: ids.size]
    raise AlignmentError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} does not reproduce the sample's input_ids "
        "from its text: was it scored with this tokenizer?"
    )


def char_to_byte(text: str) -> np.ndarray:
    """int64 ``[len(text) + 1]``: UTF-8 byte offset of each character boundary."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width, dtype=np.int64)])


def byte_spans(text: str, char_offsets: np.ndarray, token_nbytes: np.ndarray) -> np.ndarray:
    """int64 ``[T, 2]`` byte spans of the tokens in ``text``.

    Character offsets are exact except where consecutive tokens split one multi-byte character (byte-level
    BPE, SentencePiece byte fallback): those report the same character. Inside such a run each token gets
    its own byte length, from the run's first byte; the last token of the run ends where its character
    does.
    """
    off = np.asarray(char_offsets, dtype=np.int64)
    c2b = char_to_byte(text)
    a, b = c2b[off[:, 0]], c2b[off[:, 1]]
    if off.shape[0] < 2:
        return np.stack([a, b], axis=1)
    wide = off[:, 1] > off[:, 0]
    ov = np.zeros(off.shape[0], dtype=bool)
    ov[1:] = wide[1:] & wide[:-1] & (off[1:, 0] < off[:-1, 1])
    if not ov.any():
        return np.stack([a, b], axis=1)
    nb = np.asarray(token_nbytes, dtype=np.int64)
    first = np.flatnonzero(~ov)
    run = np.cumsum(~ov) - 1
    cs = np.cumsum(nb)
    excl = cs - nb - (cs[first] - nb[first])[run]
    a2 = a[first][run] + excl
    is_last = np.r_[~ov[1:], True]
    b2 = np.where(is_last, b, a2 + nb)
    b2 = np.minimum(b2, b[np.r_[first[1:] - 1, off.shape[0] - 1]][run])  # never past the run's end
    a2 = np.minimum(a2, b2)
    return np.stack([np.where(ov | ~is_last, a2, a), np.where(ov | ~is_last, b2, b)], axis=1)


def _place(spans: np.ndarray, segments: np.ndarray, offsets: np.ndarray):
    """Kept token indices, their [start, end) in the common coordinate (segments concatenated), their
    segment, and uint8 ``[T]`` clip flags (CLIP_START / CLIP_END: the token's text reaches outside its
    segment)."""
    s, e = spans[:, 0], spans[:, 1]
    seg_a = np.searchsorted(segments[:, 0], s, side="right") - 1
    seg_b = np.searchsorted(segments[:, 0], np.maximum(e - 1, s), side="right") - 1
    ok_a = (seg_a >= 0) & (s < segments[np.maximum(seg_a, 0), 1])
    seg = np.where(ok_a, seg_a, seg_b)
    segc = np.maximum(seg, 0)
    lo = np.maximum(s, segments[segc, 0])
    hi = np.minimum(e, segments[segc, 1])
    keep = np.flatnonzero((seg >= 0) & (hi > lo))
    seg, lo, hi = seg[keep], lo[keep], hi[keep]
    clipped = np.zeros(spans.shape[0], dtype=np.uint8)
    clipped[keep] = np.where(s[keep] < segments[seg, 0], CLIP_START, 0) | np.where(
        e[keep] > segments[seg, 1], CLIP_END, 0
    )
    shift = offsets[seg] - segments[seg, 0]
    lo, hi = lo + shift, hi + shift
    # uncovered bytes (SentencePiece may leave a space out of '▁word') belong to the following token
    new_seg = np.r_[True, seg[1:] != seg[:-1]] if seg.size else np.zeros(0, bool)
    prev_end = np.r_[0, hi[:-1]] if seg.size else hi
    lo = np.where(new_seg, offsets[seg], np.minimum(lo, prev_end))
    hi = np.maximum.accumulate(hi) if hi.size else hi
    return keep, lo, hi, seg, clipped


def _cuts(lo: np.ndarray, hi: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Clean boundaries of one side: ends of tokens that the next token does not overlap."""
    if hi.size == 0:
        return hi
    clean = np.r_[(lo[1:] >= hi[:-1]) | (seg[1:] != seg[:-1]), True]
    return hi[clean]


def align_spans(
    pivot_spans: np.ndarray,
    source_spans: np.ndarray,
    pivot_segments: np.ndarray | None = None,
    source_segments: np.ndarray | None = None,
) -> Alignment:
    """Exact alignment from byte spans ``[T, 2]`` of both tokenizations.

    Only the parts of each text inside its segments (``[S, 2]`` byte ranges, the same S byte strings on
    both sides, in order) are aligned; by default each side's whole extent. Tokens of zero width, or
    outside every segment, are left out; tokens straddling a segment edge are clipped to it.
    """
    pivot_spans = np.asarray(pivot_spans, dtype=np.int64).reshape(-1, 2)
    source_spans = np.asarray(source_spans, dtype=np.int64).reshape(-1, 2)
    if pivot_segments is None:
        pivot_segments = np.array([[0, int(pivot_spans[:, 1].max(initial=0))]])
    if source_segments is None:
        source_segments = np.array([[0, int(source_spans[:, 1].max(initial=0))]])
    pseg = np.asarray(pivot_segments, dtype=np.int64).reshape(-1, 2)
    sseg = np.asarray(source_segments, dtype=np.int64).reshape(-1, 2)
    if pseg.shape != sseg.shape:
        raise AlignmentError(f"{len(pseg)} pivot segments but {len(sseg)} source segments")
    lengths = np.minimum(pseg[:, 1] - pseg[:, 0], sseg[:, 1] - sseg[:, 0])
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    pseg = np.stack([pseg[:, 0], pseg[:, 0] + lengths], axis=1)
    sseg = np.stack([sseg[:, 0], sseg[:, 0] + lengths], axis=1)

    pk, plo, phi, pseg_id, pclip = _place(pivot_spans, pseg, offsets)
    sk, slo, shi, sseg_id, sclip = _place(source_spans, sseg, offsets)
    common = np.intersect1d(_cuts(plo, phi, pseg_id), _cuts(slo, shi, sseg_id))
    pg = np.searchsorted(common, phi, side="left")
    sg = np.searchsorted(common, shi, side="left")
    both = np.intersect1d(pg[pg < common.size], sg[sg < common.size])
    pin, sin = np.isin(pg, both), np.isin(sg, both)
    pk, pg, plo = pk[pin], pg[pin], plo[pin]
    sk, sg, slo = sk[sin], sg[sin], slo[sin]
    pfirst = np.flatnonzero(np.r_[True, pg[1:] != pg[:-1]]) if pg.size else pg
    sfirst = np.flatnonzero(np.r_[True, sg[1:] != sg[:-1]]) if sg.size else sg
    plast = np.r_[pfirst[1:] - 1, pg.size - 1] if pg.size else pg
    slast = np.r_[sfirst[1:] - 1, sg.size - 1] if sg.size else sg
    aln = Alignment(
        pk[pfirst].astype(np.int32),
        (pk[plast] + 1).astype(np.int32),
        sk[sfirst].astype(np.int32),
        (sk[slast] + 1).astype(np.int32),
        int(pivot_spans.shape[0]),
        int(source_spans.shape[0]),
        "offsets",
    )
    if pclip.any():
        aln.pivot_clipped = pclip
    if sclip.any():
        aln.source_clipped = sclip
    # anchors: the token right before each segment's first group, when that group starts the segment and
    # neither first token reaches before it (a clipped one has template text in its prefix)
    gstart = np.minimum(plo[pfirst], slo[sfirst]) if pg.size else pg
    at_seg = np.isin(gstart, offsets) & ~aln.open_start()
    ap, as_ = aln.pivot_start[at_seg] - 1, aln.source_start[at_seg] - 1
    ok = (ap >= 0) & (as_ >= 0)
    aln.anchor_pivot, aln.anchor_source = ap[ok], as_[ok]
    aln.byte_start, aln.byte_end = gstart, (common[both] if pg.size else pg)
    return aln


def _segments(pivot, source, ptext_bytes_map, stext_bytes_map):
    """Byte segments to align: whole texts when identical, else the assistant spans matched in order."""
    if pivot.text == source.text:
        n = int(ptext_bytes_map[-1])
        return np.array([[0, n]]), np.array([[0, n]]), 0
    pspans = np.asarray(pivot.assistant_spans, dtype=np.int64).reshape(-1, 2)
    sspans = np.asarray(source.assistant_spans, dtype=np.int64).reshape(-1, 2)
    if pspans.shape[0] == 0 or sspans.shape[0] == 0:
        raise AlignmentError(
            f"sample {pivot.sample_id!r}: pivot and source texts differ and no assistant spans say which "
            "parts are the same: score both with the same template, or store assistant_spans"
        )
    n = min(len(pspans), len(sspans))
    keep = [i for i in range(n) if pivot.text[slice(*pspans[i])] == source.text[slice(*sspans[i])]]
    skipped = len(pspans) + len(sspans) - 2 * len(keep)
    return ptext_bytes_map[pspans[keep]], stext_bytes_map[sspans[keep]], skipped


def align_sample(
    pivot,
    source,
    pivot_tokenizer,
    source_tokenizer,
    method: str = "offsets",
    *,
    band: int | None = 32,
    strip_whitespace: bool = False,
) -> Alignment:
    """Align one sample's source tokenization (a `ScoredSample`) to the pivot's.

    Texts identical: the whole text is aligned. Texts different (templates differ): only the assistant
    spans, paired in order and kept when their text is identical (``coverage['skipped_spans']`` counts the
    rest). ``method`` is ``offsets``, ``dtw`` or ``dtw2`` (``band``: DTW slack in characters, None for the
    full matrix; ``strip_whitespace``: see `dtw_pieces`, ``dtw`` only).
    """
    if method not in ALIGN_METHODS:
        raise ValueError(f"unknown alignment {method!r}: expected one of {', '.join(ALIGN_METHODS)}")
    if pivot.text is None or source.text is None:
        raise AlignmentError(f"sample {pivot.sample_id!r}: alignment needs the rendered text of both samples")
    ptab = TokenTable.from_tokenizer(pivot_tokenizer)
    stab = TokenTable.from_tokenizer(source_tokenizer)
    pc2b, sc2b = char_to_byte(pivot.text), char_to_byte(source.text)
    pseg, sseg, skipped = _segments(pivot, source, pc2b, sc2b)
    pids, sids = np.asarray(pivot.input_ids), np.asarray(source.input_ids)
    pspans = byte_spans(pivot.text, token_offsets(pivot_tokenizer, pids, pivot.text), ptab.nbytes(pids))
    sspans = byte_spans(source.text, token_offsets(source_tokenizer, sids, source.text), stab.nbytes(sids))
    aln = align_spans(pspans, sspans, pseg, sseg)
    seg_bytes = b"".join(pivot.text.encode()[a:b] for a, b in pseg)
    aln.coverage = _coverage(aln, seg_bytes)
    if method == "dtw":
        sides = [lambda ids, t=t: dtw_pieces(t, ids, strip_whitespace=strip_whitespace) for t in (ptab, stab)]
        aln = _align_dtw_segments(pspans, sspans, pseg, sseg, pids, sids, band, aln, *sides, 0.1)
    elif method == "dtw2":
        sides = [lambda ids, t=t: decoded_pieces(t, ids) for t in (pivot_tokenizer, source_tokenizer)]
        lengths = (ptab.nbytes, stab.nbytes)  # the band on the text's bytes, not the decoded strings
        aln = _align_dtw_segments(pspans, sspans, pseg, sseg, pids, sids, band, aln, *sides, 1.0, lengths)
    aln.coverage["skipped_spans"] = skipped
    return aln


def _coverage(aln: Alignment, seg_bytes: bytes) -> dict:
    gstart, gend = aln.byte_start, aln.byte_end
    total = len(seg_bytes)
    in_group = np.zeros(total + 1, dtype=np.int64)
    coarse = np.zeros(total + 1, dtype=np.int64)
    nm = aln.kinds() == 3
    np.add.at(in_group, gstart, 1)
    np.add.at(in_group, gend, -1)
    np.add.at(coarse, gstart[nm], 1)
    np.add.at(coarse, gend[nm], -1)
    in_group, coarse = np.cumsum(in_group)[:total] > 0, np.cumsum(coarse)[:total] > 0
    b = np.frombuffer(seg_bytes, dtype=np.uint8)
    char_start = np.flatnonzero((b & 0xC0) != 0x80)
    if char_start.size == 0:
        return {"chars": 0, "chars_aligned": 0, "chars_in_n_m": 0}
    aligned = np.logical_and.reduceat(in_group, char_start)
    in_nm = np.logical_or.reduceat(coarse, char_start)
    return {
        "chars": int(char_start.size),
        "chars_aligned": int(aligned.sum()),
        "chars_in_n_m": int(in_nm.sum()),
    }


# ---------------------------------------------------------------------------------------------------
# DTW


def dtw_pieces(table: TokenTable, ids: np.ndarray, *, strip_whitespace: bool = False) -> list[bytes]:
    """Token strings for DTW: canonical text bytes, so ``▁``, ``Ġ`` and byte-level encoding all read as the
    same space. ``strip_whitespace=True`` removes the spaces as the reference code removes the markers;
    that leaves SentencePiece's lone ``▁`` tokens empty, free to join either neighbour, and lowers the
    agreement with the exact alignment on non-Latin text (88% -> 75% of groups in the tests)."""
    if strip_whitespace:
        return [table.pieces[i].replace(b" ", b"") for i in np.asarray(ids).tolist()]
    return [table.pieces[i] for i in np.asarray(ids).tolist()]


def decoded_pieces(tokenizer, ids: np.ndarray) -> list[str]:
    """Each token decoded on its own (``tokenizer.decode([id])``): FuseChat-2.0's DTW strings. A byte-level
    piece of a multi-byte character decodes to U+FFFD; SentencePiece drops a token's leading space."""
    return tokenizer.batch_decode([[int(i)] for i in np.asarray(ids).tolist()])


def align_dtw(
    pivot_pieces: list[bytes] | list[str],
    source_pieces: list[bytes] | list[str],
    *,
    band: int | None = 32,
    discount: float = 0.1,
    ties: str = "pivot",
    text_lengths: tuple[np.ndarray, np.ndarray] | None = None,
) -> Alignment:
    """DTW alignment of two token-string sequences (indices local to the lists).

    Cost of a cell: Levenshtein distance of the two strings (over bytes for ``bytes``, characters for
    ``str``), times ``discount`` when one contains the other (FuseChat-1.0: 0.1; FuseChat-2.0: 1.0, none).
    With ``band``, only cells whose strings lie within ``band`` characters of each other in the running
    text are evaluated (the optimal path of two tokenizations of one text never leaves that band); None
    evaluates the full matrix. Path ties prefer the diagonal, then ``ties``: ``pivot`` a pivot step before
    a source step (FuseChat-2.0's order), ``source`` the converse (FuseChat-1.0's and FuseLLM's).
    ``text_lengths``: (pivot, source) int arrays, each token's length in the running text, on which the
    band is measured (default: the strings' own lengths; decoded SentencePiece strings drop their leading
    space, so `decoded_pieces` need the tokens' byte lengths here).
    """
    if ties not in DTW_TIES:
        raise ValueError(f"unknown DTW tie order {ties!r}: expected one of {', '.join(DTW_TIES)}")
    n, m = len(pivot_pieces), len(source_pieces)
    if n == 0 or m == 0:
        z = np.zeros(0, np.int32)
        return Alignment(z, z, z, z, n, m, "dtw")
    pi, sj = _band_cells(pivot_pieces, source_pieces, band, text_lengths)
    cost = _cell_costs(pivot_pieces, source_pieces, pi, sj, discount)
    path_i, path_j = _dtw_path(n, m, pi, sj, cost, ties)
    new = np.r_[True, (np.diff(path_i) == 1) & (np.diff(path_j) == 1)]
    first = np.flatnonzero(new)
    last = np.r_[first[1:] - 1, path_i.size - 1]
    return Alignment(
        path_i[first].astype(np.int32),
        (path_i[last] + 1).astype(np.int32),
        path_j[first].astype(np.int32),
        (path_j[last] + 1).astype(np.int32),
        n,
        m,
        "dtw",
    )


def _band_cells(pp: list, sp: list, band: int | None, text_lengths=None):
    n, m = len(pp), len(sp)
    if band is None:
        lo, hi = np.zeros(n, np.int64), np.full(n, m, np.int64)
    else:
        if text_lengths is None:
            pl = np.fromiter(map(len, pp), np.int64, n)
            sl = np.fromiter(map(len, sp), np.int64, m)
        else:
            pl, sl = (np.asarray(x, dtype=np.int64) for x in text_lengths)
        pe, se = np.cumsum(pl), np.cumsum(sl)
        ps, ss = pe - pl, se - sl
        lo = np.searchsorted(se, ps - band, side="right")
        hi = np.searchsorted(ss, pe + band, side="left")
        lo = np.minimum(np.maximum.accumulate(lo), m - 1)
        hi = np.maximum(np.maximum.accumulate(hi), lo + 1)
        lo[0], hi[-1] = 0, m
        lo[1:] = np.minimum(lo[1:], hi[:-1])  # each row reachable from the previous one
        hi = np.minimum(hi, m)
    sizes = hi - lo
    rows = np.repeat(np.arange(n), sizes)
    cols = lo[rows] + np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return rows, cols


def _pad_pieces(pieces: list) -> tuple[np.ndarray, np.ndarray]:
    """`pad_bytes` for bytes; for str, each distinct character gets its own uint16 symbol (above the
    padding symbols), so that distances count characters."""
    if not pieces or isinstance(pieces[0], bytes):
        return pad_bytes(pieces)
    codes: dict[str, int] = {}
    as_codes = [[codes.setdefault(ch, 258 + len(codes)) for ch in p] for p in pieces]
    if len(codes) > 65535 - 258:
        raise ValueError("too many distinct characters for the DTW string cost")
    lengths = np.fromiter(map(len, as_codes), dtype=np.int64, count=len(as_codes))
    out = np.full((len(as_codes), max(int(lengths.max(initial=0)), 1)), 256, dtype=np.uint16)
    for r, c in enumerate(as_codes):
        out[r, : len(c)] = c
    return out, lengths


def _cell_costs(pp: list, sp: list, rows: np.ndarray, cols: np.ndarray, discount: float = 0.1) -> np.ndarray:
    # distances are computed once per distinct (pivot string, source string) pair
    pu: dict = {}
    su: dict = {}
    pcode = np.fromiter((pu.setdefault(p, len(pu)) for p in pp), np.int64, len(pp))
    scode = np.fromiter((su.setdefault(s, len(su)) for s in sp), np.int64, len(sp))
    keys = pcode[rows] * len(su) + scode[cols]
    ukeys, inv = np.unique(keys, return_inverse=True)
    if isinstance(pp[0], str):  # one symbol table for both sides
        mat, lengths = _pad_pieces(list(pu) + list(su))
        pmat, plen, smat, slen = mat[: len(pu)], lengths[: len(pu)], mat[len(pu) :], lengths[len(pu) :]
    else:
        pmat, plen = pad_bytes(list(pu))
        smat, slen = pad_bytes(list(su))
    a, b = ukeys // len(su), ukeys % len(su)
    dist, contains = edit_distance(pmat[a], plen[a], smat[b], slen[b], contains=discount != 1.0)
    if discount == 1.0:
        return dist[inv].astype(np.float64)
    return (dist * np.where(contains, discount, 1.0))[inv]


def _dtw_path(n: int, m: int, rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, ties: str = "pivot"):
    w = m + 1
    acc = np.full((n + 1) * w, np.inf)
    acc[0] = 0.0
    diag = rows + cols
    order = np.argsort(diag, kind="stable")
    flat = (rows[order] + 1) * w + cols[order] + 1
    c = cost[order]
    bounds = np.searchsorted(diag[order], np.arange(n + m))
    bounds = np.r_[bounds, flat.size]
    for d in range(n + m - 1):
        s, e = bounds[d], bounds[d + 1]
        if s == e:
            continue
        f = flat[s:e]
        acc[f] = c[s:e] + np.minimum(np.minimum(acc[f - w - 1], acc[f - w]), acc[f - 1])
    # moves, preferring on ties the diagonal, then (ties="pivot") a pivot step (1), then a source step (2)
    dg, up, left = acc[flat - w - 1], acc[flat - w], acc[flat - 1]
    if ties == "pivot":
        move = np.where((dg <= up) & (dg <= left), 0, np.where(up <= left, 1, 2))
    else:
        move = np.where((dg <= up) & (dg <= left), 0, np.where(left <= up, 2, 1))
    move = move.astype(np.uint8)
    moves = np.full((n + 1) * w, 3, dtype=np.uint8)
    moves[flat] = move
    moves = moves.tobytes()
    i, j = n, m
    pi, pj = [], []
    while True:
        pi.append(i - 1)
        pj.append(j - 1)
        if i == 1 and j == 1:
            break
        mv = moves[i * w + j]
        if mv == 0:
            i, j = i - 1, j - 1
        elif mv == 1:
            i -= 1
        else:
            j -= 1
        if i == 0 or j == 0 or mv == 3:  # only when the band cut the path off
            raise AlignmentError("DTW band too narrow for this sample: increase band or use band=None")
    return np.array(pi[::-1], dtype=np.int64), np.array(pj[::-1], dtype=np.int64)


def _align_dtw_segments(
    pspans,
    sspans,
    pseg,
    sseg,
    pids,
    sids,
    band,
    offsets_aln,
    pivot_pieces,
    source_pieces,
    discount,
    nbytes=None,
) -> Alignment:
    """DTW inside each aligned segment, over the tokens the offsets aligner kept there; ``pivot_pieces(ids)``
    / ``source_pieces(ids)`` give the token strings, ``discount`` the containment discount, ``nbytes``
    (pivot, source) functions of ids giving the tokens' text lengths for the band (default: the strings')."""
    lengths = pseg[:, 1] - pseg[:, 0]
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    pk, _, _, pseg_id, _ = _place(pspans, pseg, offsets)
    sk, _, _, sseg_id, _ = _place(sspans, sseg, offsets)
    parts = []
    for g in range(len(pseg)):
        pidx, sidx = pk[pseg_id == g], sk[sseg_id == g]
        if pidx.size == 0 or sidx.size == 0:
            continue
        pp, sp = pivot_pieces(pids[pidx]), source_pieces(sids[sidx])
        tl = (nbytes[0](pids[pidx]), nbytes[1](sids[sidx])) if nbytes else None
        a = align_dtw(pp, sp, band=band, discount=discount, text_lengths=tl)
        parts.append(
            (pidx[a.pivot_start], pidx[a.pivot_end - 1] + 1, sidx[a.source_start], sidx[a.source_end - 1] + 1)
        )
    cat = [
        np.concatenate([p[i] for p in parts]).astype(np.int32) if parts else np.zeros(0, np.int32)
        for i in range(4)
    ]
    aln = Alignment(*cat, len(pids), len(sids), "dtw" if discount != 1.0 else "dtw2")
    aln.anchor_pivot, aln.anchor_source = offsets_aln.anchor_pivot, offsets_aln.anchor_source
    aln.pivot_clipped, aln.source_clipped = offsets_aln.pivot_clipped, offsets_aln.source_clipped
    aln.coverage = dict(offsets_aln.coverage)
    return aln


# ---------------------------------------------------------------------------------------------------
# distributions


@dataclass
class AlignedDistributions:
    """A source's distributions at the pivot's scored positions, over the pivot vocabulary.

    Attributes:
        dist: `SparseDist` ``[N, k]`` (N = pivot scored positions).
        from_source: bool ``[N]``: True where the source supplied the distribution; False where it could not
            (no context-equivalent source position, nothing mapped) and the pivot's own was used.
        unmapped_mass: float32 ``[N]``: source probability whose tokens have no pivot token (not in dist).
        source_mass: float32 ``[N]``: source top-k probability carried to each position (0 where it fell
            back). ``source_mass - unmapped_mass - dist.probs.sum(1)`` is what the top-k cut dropped after
            merges (0 unless more than k distinct pivot ids were hit).
        gold_nll: float64 ``[N]``: the source's negative log-likelihood (nats) of the pivot's gold tokens,
            per pivot position (see `align_gold_nll`); what MinCE / AvgCE rank the source by.
        gold_from_source: bool ``[N]``: positions whose ``gold_nll`` comes from the source (else the pivot's).
    """

    dist: SparseDist
    from_source: np.ndarray
    unmapped_mass: np.ndarray
    source_mass: np.ndarray | None = None
    gold_nll: np.ndarray | None = None
    gold_from_source: np.ndarray | None = None

    @property
    def num_fallback(self) -> int:
        return int((~self.from_source).sum())


def align_distributions(
    pivot,
    source,
    alignment: Alignment,
    vocab_map: VocabMap,
    *,
    k: int | None = None,
    n_to_one: str | None = None,
) -> AlignedDistributions:
    """Carry the source's top-k (`ScoredSample`) over to each scored position of the pivot (`ScoredSample`).

    Pivot position t takes the source position s whose prefix ends at the same text point
    (`Alignment.context_map`): the ends of groups, and the token before each segment. Pivot tokens
    inside a ``1-n`` group have no such source position and fall back to the pivot's own distribution,
    as do positions the source did not score and rows whose entries all map to no pivot token. Source
    ids map through ``vocab_map``; several source ids landing on one pivot id add up; unmapped mass is
    reported, never renormalised away.

    ``n_to_one``: for a pivot token made of n source tokens (``n-1``), ``last`` uses only the source
    position after the last piece (the same context: exact); ``weighted`` averages the n positions with
    weights proportional to the mapping statistics' co-alignment counts of each piece with the pivot
    token (FuseChat). Default: ``weighted`` when ``vocab_map`` carries statistics, else ``last``.
    """
    stats: MappingStatistics | None = getattr(vocab_map, "stats", None)
    if n_to_one is None:
        n_to_one = "weighted" if stats is not None else "last"
    if n_to_one not in ("last", "weighted"):
        raise ValueError(f"unknown n_to_one {n_to_one!r}: expected last or weighted")
    ppos = np.asarray(pivot.positions, dtype=np.int64)
    spos = np.asarray(source.positions, dtype=np.int64)
    k = int(k or max(pivot.k, source.k))
    n = ppos.size

    s_of = alignment.context_map()[ppos].astype(np.int64)
    row = np.searchsorted(spos, s_of)
    row_c = np.minimum(row, max(spos.size - 1, 0))
    covered = (s_of >= 0) & (spos.size > 0) & (spos[row_c] == s_of) if spos.size else np.zeros(n, bool)

    # (pivot row, source row, weight) triplets; n-1 groups may contribute several source rows
    prow, srow, weight = np.flatnonzero(covered), row_c[covered], np.ones(int(covered.sum()))
    if n_to_one == "weighted" and stats is not None and prow.size:
        prow, srow, weight = _n_to_one_weights(pivot, source, alignment, stats, ppos, spos, prow, srow)

    mapped = vocab_map(np.asarray(source.topk_ids)[srow]).astype(np.int64)
    probs = topk_probs(np.asarray(source.topk_logprobs)[srow]) * weight[:, None]
    unmapped, carried = np.zeros(n), np.zeros(n)
    np.add.at(unmapped, prow, np.where(mapped < 0, probs, 0.0).sum(axis=1))
    np.add.at(carried, prow, probs.sum(axis=1))
    dist = coo_topk(np.repeat(prow, mapped.shape[1]), mapped, probs, n, k)
    from_source = covered & (dist.probs.sum(axis=1) > 0)

    own = SparseDist.from_topk(pivot.topk_ids, pivot.topk_logprobs)
    fb = np.flatnonzero(~from_source)
    kk = min(k, own.ids.shape[1])
    dist.ids[fb] = -1
    dist.probs[fb] = 0.0
    dist.ids[fb, :kk] = own.ids[fb, :kk]
    dist.probs[fb, :kk] = own.probs[fb, :kk]
    unmapped[fb] = 0.0
    carried[fb] = 0.0
    nll, nll_from_source = align_gold_nll(pivot, source, alignment)
    return AlignedDistributions(
        dist, from_source, unmapped.astype(np.float32), carried.astype(np.float32), nll, nll_from_source
    )


def pivot_gold_nll(pivot) -> np.ndarray:
    """float64 ``[N]``: ``-gold_logprob`` of a `ScoredSample`, the negative log-likelihood (nats) of the actual
    next token under the full-vocabulary distribution (stored by extraction, not limited to the top-k)."""
    return -np.asarray(pivot.gold_logprob, dtype=np.float64)


def align_gold_nll(pivot, source, alignment: Alignment) -> tuple[np.ndarray, np.ndarray]:
    """The source's negative log-likelihood of the pivot's gold tokens, at the pivot's scored positions.

    Returns float64 ``[N]`` (nats) and bool ``[N]`` (True where the value comes from the source). The
    source scores its own tokens, so the values are carried over per alignment group, by the chain rule:
    a group's text has probability ``Π p_src(source tokens)`` under the source and ``Π p_pivot(pivot
    tokens)`` under the pivot. For a group of pivot tokens ``[ps, pe)`` and source tokens ``[ss, se)``:

    - the pivot position ``ps - 1`` (predicting the group's first pivot token, same context as the source
      position ``ss - 1``) gets ``Σ_{j=ss}^{se-1} -source.gold_logprob`` at source position ``j - 1``: the
      source NLL of the whole group text; the other pivot positions of the group (``ps .. pe - 2``) get 0.
      So ``1-1`` is position to position; ``1-n`` (one source token over n pivot tokens) puts the source's
      NLL of that token on the first of the n positions; ``n-1`` (n source tokens in one pivot token) sums
      the n source NLLs on the one pivot position; ``n-m`` likewise sums.
    - A group is used only when every pivot position ``ps - 1 .. pe - 2`` and every source position
      ``ss - 1 .. se - 2`` was scored, its pivot tokens are all response tokens or all not (``loss_mask``),
      and neither side's tokens reach outside the aligned segment (`Alignment.open_start` / `open_end`).
    - Every other position (template tokens outside the aligned text, groups not used) takes the pivot's
      own NLL, so it adds the same amount to both candidates' CE and the ranking is decided by the text
      both scored.

    Summed over a sample this is the source's NLL of the same text as the pivot's, divided by the same
    number of pivot positions: unlike the reference code's per-model mean over its own tokens, a tokenizer
    with longer tokens is not penalised (nor favoured) by its token count.
    """
    ppos = np.asarray(pivot.positions, dtype=np.int64)
    spos = np.asarray(source.positions, dtype=np.int64)
    nll = pivot_gold_nll(pivot).copy()
    from_source = np.zeros(ppos.size, dtype=bool)
    if alignment.num_groups == 0 or ppos.size == 0 or spos.size == 0:
        return nll, from_source
    tp, ts = alignment.num_pivot_tokens, alignment.num_source_tokens
    # token j is "predicted" by position j - 1: token-level scored flags and NLL, as prefix sums
    p_row = np.full(tp + 1, -1, dtype=np.int64)
    p_row[ppos + 1] = np.arange(ppos.size)
    s_scored = np.zeros(ts + 1, dtype=np.int64)
    s_nll = np.zeros(ts + 1, dtype=np.float64)
    s_scored[spos + 1] = 1
    s_nll[spos + 1] = -np.asarray(source.gold_logprob, dtype=np.float64)
    p_scored_cum = np.r_[0, np.cumsum(p_row >= 0)]
    s_scored_cum = np.r_[0, np.cumsum(s_scored)]
    s_nll_cum = np.r_[0.0, np.cumsum(s_nll)]
    mask = np.asarray(pivot.loss_mask, dtype=bool)
    mask_cum = np.r_[0, np.cumsum(mask)]

    ps, pe = alignment.pivot_start.astype(np.int64), alignment.pivot_end.astype(np.int64)
    ss, se = alignment.source_start.astype(np.int64), alignment.source_end.astype(np.int64)
    n_mask = mask_cum[pe] - mask_cum[ps]
    ok = (
        (ps >= 1)
        & (ss >= 1)
        & (p_scored_cum[pe] - p_scored_cum[ps] == pe - ps)
        & (s_scored_cum[se] - s_scored_cum[ss] == se - ss)
        & ((n_mask == 0) | (n_mask == pe - ps))
        & ~alignment.open_start()
        & ~alignment.open_end()
    )
    if not ok.any():
        return nll, from_source
    ps, pe, ss, se = ps[ok], pe[ok], ss[ok], se[ok]
    group_nll = s_nll_cum[se] - s_nll_cum[ss]
    sizes = pe - ps
    tok = np.repeat(ps, sizes) + np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    rows = p_row[tok]
    first = tok == np.repeat(ps, sizes)
    nll[rows] = np.where(first, np.repeat(group_nll, sizes), 0.0)
    from_source[rows] = True
    return nll, from_source


def _n_to_one_weights(pivot, source, aln, stats, ppos, spos, prow, srow):
    """Expand pivot positions at the end of an ``n-1`` group into the group's n source positions."""
    kinds = aln.kinds()
    g_of = np.full(aln.num_pivot_tokens, -1, np.int64)
    g_of[aln.pivot_end - 1] = np.arange(aln.num_groups)
    g = g_of[ppos[prow]]
    multi = (g >= 0) & (kinds[np.maximum(g, 0)] == 2)
    out_p, out_s, out_w = [prow[~multi]], [srow[~multi]], [np.ones(int((~multi).sum()))]
    if multi.any():
        gm = g[multi]
        ss, se = aln.source_start[gm].astype(np.int64), aln.source_end[gm].astype(np.int64)
        sizes = se - ss
        rep = np.repeat(np.arange(gm.size), sizes)
        tok = ss[rep] + np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        r = np.searchsorted(spos, tok)
        rc = np.minimum(r, spos.size - 1)
        scored = spos[rc] == tok
        pivot_tok = np.asarray(pivot.input_ids)[ppos[prow[multi]]][rep]
        w = stats.count(pivot_tok, np.asarray(source.input_ids)[tok]).astype(np.float64) * scored
        total = np.bincount(rep, weights=w, minlength=gm.size)
        is_last = tok == se[rep] - 1
        w = np.where(total[rep] > 0, w / np.maximum(total[rep], 1e-300), is_last.astype(np.float64))
        keep = w > 0
        out_p.append(prow[multi][rep][keep])
        out_s.append(rc[keep])
        out_w.append(w[keep])
    return np.concatenate(out_p), np.concatenate(out_s), np.concatenate(out_w)
