"""The compact encoding of top-k distributions: `ScoredSample`s <-> one Parquet shard's bytes.

Log-probabilities. ``q = rint(-max(logprob, LOGPROB_FLOOR) / step)`` with ``step = 5/128 = 0.0390625`` nat
by default: every stored logprob at or above the floor (-2**16 nat) is within ``step / 2 = 5/256 =
0.01953125`` nat of its fp32 input (round to nearest; the quotient is computed in float64, which can add
at most 1e-11 nat; the decoded value ``-5q/128`` is exact in fp32). There is no coarser step for the
tail: -80 is as exact as -0.1. Below the floor (``-inf`` included, which vLLM returns for masked tokens)
a logprob is stored as the floor: its probability is exactly 0 in float64 either way. NaN is rejected.
`CodecConfig(step_units=1, step_log2=5)` gives 1/32 nat (bound 1/64).

Encoding v3 (`logitfuse-topk-v3`, written since 2026-11-30). Per position: the number of entries ``kt``
(k unless the extraction truncated the row, `truncate_topk`), the gold next token's rank among them (its
id and logprob are then not stored again) or "absent" plus its distance below the last entry, the
top-1's ``q`` and the ``kt - 1`` gaps between consecutive ranks, and the ids. An id is, in this order of
preference: 1 + its index in the shard's context list of the current token ``input_ids[t]`` (ids seen
after that token at least twice in the shard's top-k, most frequent first), counted among the entries that
the row's gold token and earlier list-coded ids do not hold (exclusion, `_exclude`); a copy of an entry of one of
the sample's previous `COPY_ROWS` rows (the symbol says how many rows back, the rank there is a symbol of
its own class); how far back it last occurred in the sample's tokens (bit length, then the low bits); or
0 and its rank in the shard vocabulary (ids by frequency). Every one of these integers is coded by
`datastore._ans` (constriction's rANS) under a static model per *class*, counted over the shard: a gap's
class is the previous gap and the previous entry's level in nats (for the first gap the top-1's ``q``),
an id's its rank and the length of its context list. One ANS stream per shard sits in the Parquet
key-value metadata (`TOPK_KEY`) beside the vocabulary, context table and class histograms
(`TABLE_KEY`); the rows hold the sample itself (input ids as a zstd byte stream, text, spans). Decoding
is vectorised numpy plus one constriction call per class; copies (chains of them: an id kept for many
positions) resolve by pointer doubling.

Encoding v2 (`logitfuse-topk-v2`, shards written 2026-11-29 on; still read, and written on when a v2
dataset is resumed): the same without copies, gaps classed by rank and previous gap.

Encoding v1 (`logitfuse-topk-v1`, shards written before 2026-11-29) is still read: the same numbers as
per-row byte streams with escapes, entropy-coded by Parquet's zstd (`datastore.schema.SHARD_SCHEMA_V1`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from datastore import _ans
from datastore.sample import ScoredSample
from datastore.schema import (
    CODEC_KEY,
    SHARD_SCHEMA,
    SHARD_SCHEMA_V1,
    STAT_COLUMNS,
    STREAM_COLUMNS,
    TABLE_KEY,
    TOPK_COLUMNS,
    TOPK_KEY,
    V2_STREAM_COLUMNS,
)

CODEC_NAME = "logitfuse-topk-v3"
CODEC_V2 = "logitfuse-topk-v2"
CODEC_V1 = "logitfuse-topk-v1"
CODECS = {CODEC_V1: 1, CODEC_V2: 2, CODEC_NAME: 3}  # codec name -> CodecConfig.version
ESCAPE = 255
MAX_ABS_LOGPROB = float(2**16)  # keeps step_units * q < 2**24: the decoded value is exact in fp32
# Log-probabilities below this (-inf included: vLLM returns it for masked tokens) are stored as it.
LOGPROB_FLOOR = -MAX_ABS_LOGPROB
PAD_ID = -1  # a truncated row's missing entries: id -1, logprob -inf (probability 0)


@dataclass(frozen=True)
class CodecConfig:
    """How shards are encoded. The defaults bound every logprob error by 5/256 = 0.0195 nat (goal: 0.02)."""

    step_units: int = 5  # quantisation step = step_units / 2**step_log2 nat; the bound is half a step
    step_log2: int = 7
    zstd_level: int = 17  # zstd level of the Parquet columns (text, input ids) and of the tables
    min_pair_count: int = 2  # a (context, id) pair enters the context table when seen this often
    version: int = 3  # 2: the former rANS layout; 1: per-row zstd streams (no truncated rows)

    def __post_init__(self):
        if self.version not in (1, 2, 3):
            raise ValueError("version must be 1, 2 or 3")
        if not (1 <= self.step_units <= 7 and 0 <= self.step_log2 <= 8):
            raise ValueError("step_units must be in [1, 7] and step_log2 in [0, 8]")
        if self.min_pair_count < 1:
            raise ValueError("min_pair_count must be >= 1")

    @property
    def step(self) -> float:
        return self.step_units / 2.0**self.step_log2

    @property
    def max_abs_error(self) -> float:
        return self.step / 2

    def describe(self) -> dict:
        return {
            "codec": {v: name for name, v in CODECS.items()}[self.version],
            "step_units": self.step_units,
            "step_log2": self.step_log2,
            "logprob_step": self.step,
            "logprob_max_abs_error": self.max_abs_error,
            "logprob_floor": LOGPROB_FLOOR,
            "rounding": "round-to-nearest on -max(logprob, floor)/step; decoded -q*step exact in fp32; "
            "below the floor (-inf included) stored as the floor",
            "ids": "lossless",
            "zstd_level": self.zstd_level,
        }
# ---------------------------------------------------------------- small vectorised helpers


ESCAPE16 = 65535


def _escape(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative ints -> one byte each (255 = escape), a uint16 of ``v - 255`` per escape (65535 =
    escape again) and a uint32 of ``v - 255 - 65535`` per second escape."""
    v = np.asarray(values, dtype=np.int64).ravel()
    wide = v[v >= ESCAPE] - ESCAPE
    huge = wide[wide >= ESCAPE16] - ESCAPE16
    if huge.size and huge.max() >= 2**32:
        raise ValueError("value too large for the escape code")
    return (
        np.minimum(v, ESCAPE).astype(np.uint8),
        np.minimum(wide, ESCAPE16).astype("<u2"),
        huge.astype("<u4"),
    )


def _unescape(small: np.ndarray, wide: np.ndarray, huge: np.ndarray) -> np.ndarray:
    out = small.astype(np.int64)
    big = small == ESCAPE
    if int(big.sum()) != len(wide):
        raise ValueError(f"corrupt stream: {int(big.sum())} escapes but {len(wide)} uint16 values")
    w = wide.astype(np.int64)
    bigger = wide == ESCAPE16
    if int(bigger.sum()) != len(huge):
        raise ValueError(f"corrupt stream: {int(bigger.sum())} escapes but {len(huge)} uint32 values")
    w[bigger] += huge
    out[big] += w
    return out


def _runs(mask: np.ndarray) -> np.ndarray:
    """Bool mask -> flat [start, end) runs of True."""
    m = np.concatenate([[False], mask.astype(bool), [False]])
    return np.flatnonzero(np.diff(m.astype(np.int8))).astype(np.int32)


def _positions_runs(positions: np.ndarray) -> np.ndarray:
    if len(positions) == 0:
        return np.zeros(0, dtype=np.int32)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.concatenate([[0], breaks])]
    ends = positions[np.concatenate([breaks - 1, [len(positions) - 1]])] + 1
    return np.stack([starts, ends], axis=1).ravel().astype(np.int32)


def _expand_runs(runs: np.ndarray) -> np.ndarray:
    """Flat [start, end) runs -> the ascending indices they cover."""
    starts, ends = runs[0::2].astype(np.int64), runs[1::2].astype(np.int64)
    lens = ends - starts
    return (np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())).astype(np.int32)


def _segment_index(lengths: np.ndarray) -> np.ndarray:
    """[2, 3] -> [0, 1, 0, 1, 2]: each element's index inside its segment."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total) - np.repeat(starts, lengths)


def _pack_arrays(arrays: dict[str, np.ndarray], level: int) -> bytes:
    """Non-negative int arrays -> one zstd blob: a JSON header, then each array as byte planes."""
    header, parts = {}, []
    for name, a in arrays.items():
        a = np.asarray(a, dtype=np.int64)
        width = 1 if a.size == 0 else max(1, (int(a.max()).bit_length() + 7) // 8)
        planes = a.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width]
        header[name] = [int(a.size), width]
        parts.append(np.ascontiguousarray(planes.T).tobytes())
    head = json.dumps(header).encode()
    raw = len(head).to_bytes(4, "little") + head + b"".join(parts)
    return zstandard.ZstdCompressor(level=level).compress(raw)


def _unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    raw = zstandard.ZstdDecompressor().decompress(blob)
    n = int.from_bytes(raw[:4], "little")
    header = json.loads(raw[4 : 4 + n])
    out, at = {}, 4 + n
    for name, (size, width) in header.items():
        planes = np.frombuffer(raw, dtype=np.uint8, count=size * width, offset=at).reshape(width, size)
        full = np.zeros((size, 8), dtype=np.uint8)
        full[:, :width] = planes.T
        out[name] = full.view("<u8").ravel().astype(np.int64)
        at += size * width
    return out


# ---------------------------------------------------------------- validation


def validate(sample: ScoredSample, k: int) -> None:
    """Raise ValueError when a sample breaks the ScoredSample contract (shapes, order, ranges).

    A row may end in padding (id -1, from `truncate_topk`) after at least one entry; logprobs must be
    <= 0 and not NaN (-inf and values below `LOGPROB_FLOOR` are stored as the floor)."""
    sid = sample.sample_id
    t, n = len(sample.input_ids), len(sample.positions)
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"sample_id must be a non-empty string, got {sid!r}")
    if sample.loss_mask.shape != (t,):
        raise ValueError(f"{sid}: loss_mask shape {sample.loss_mask.shape} != input_ids ({t},)")
    if sample.topk_ids.shape != (n, k) or sample.topk_logprobs.shape != (n, k):
        raise ValueError(
            f"{sid}: topk shapes {sample.topk_ids.shape}/{sample.topk_logprobs.shape}, expected ({n}, {k})"
        )
    if sample.gold_logprob.shape != (n,):
        raise ValueError(f"{sid}: gold_logprob shape {sample.gold_logprob.shape}, expected ({n},)")
    pos = np.asarray(sample.positions, dtype=np.int64)
    if n and (pos[0] < 0 or pos[-1] >= t - 1 or np.any(np.diff(pos) <= 0)):
        raise ValueError(f"{sid}: positions must be strictly ascending in [0, {t - 1})")
    ids = np.asarray(sample.topk_ids)
    if sample.input_ids.size and (sample.input_ids.min() < 0 or sample.input_ids.max() >= 2**31):
        raise ValueError(f"{sid}: input_ids out of range [0, 2**31)")
    valid = ids != PAD_ID
    if ids.size and (ids[valid].min(initial=0) < 0 or ids.max() >= 2**31):
        raise ValueError(f"{sid}: topk_ids out of range [0, 2**31) (or -1 for a truncated row's padding)")
    if n and not (valid[:, 0].all() and np.all(valid[:, 1:] <= valid[:, :-1])):
        raise ValueError(f"{sid}: padding ids (-1) must only end a row, after at least one entry")
    lp = np.where(valid, np.asarray(sample.topk_logprobs, dtype=np.float32), -np.inf)
    gold = np.asarray(sample.gold_logprob, dtype=np.float32)
    for name, a in (("topk_logprobs", lp), ("gold_logprob", gold)):
        if a.size and (np.isnan(a).any() or a.max() > 0.0):
            raise ValueError(f"{sid}: {name} must be log-probabilities <= 0 (no NaN, no +inf)")
    floored = np.maximum(lp, LOGPROB_FLOOR) if lp.size else lp
    if k > 1 and n and np.any((floored[:, 1:] > floored[:, :-1]) & valid[:, 1:]):
        raise ValueError(f"{sid}: topk_logprobs must be sorted by descending log-probability")
    spans = np.asarray(sample.assistant_spans)
    if spans.size and spans.reshape(-1, 2).shape[1] != 2:
        raise ValueError(f"{sid}: assistant_spans must be [S, 2]")
    if spans.size:
        s = spans.reshape(-1, 2)
        end = len(sample.text) if sample.text is not None else np.iinfo(np.int64).max
        if (s[:, 0] < 0).any() or (s[:, 1] < s[:, 0]).any() or int(s[:, 1].max()) > end:
            raise ValueError(f"{sid}: assistant_spans must be character spans [start, end) with 0 <= start <= "
                             f"end <= len(text) = {end}")


# ---------------------------------------------------------------- quantisation and truncation


def quantise(logprobs: np.ndarray, units: int, step_log2: int) -> np.ndarray:
    """fp32 logprobs -> int64 ``q = rint(-max(logprob, LOGPROB_FLOOR) / step)``, step = units / 2**step_log2.

    Values below the floor (-inf included) are stored as the floor: both have probability exactly 0 in
    float64 (exp underflows below -745 nat), so nothing a consumer computes from them changes."""
    lp = np.maximum(np.asarray(logprobs, dtype=np.float64), LOGPROB_FLOOR)
    return np.rint(-lp * (1 << step_log2) / units).astype(np.int64)


def dequantise(q: np.ndarray, units: int, step_log2: int) -> np.ndarray:
    """int q -> fp32 ``-q * step``, exact (units * q < 2**24 and the division is by a power of two)."""
    return (-(np.asarray(q, dtype=np.float64) * units) / (1 << step_log2)).astype(np.float32)


def truncate_topk(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, top_p: float | None = None, within_nats: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per position, only the leading entries a consumer needs; pad the rest with id -1, logprob -inf.

    Args:
        topk_ids: int32 ``[N, k]`` ids by descending logprob.
        topk_logprobs: float32 ``[N, k]`` their log-probabilities (nats).
        top_p: keep the fewest leading entries whose probabilities sum to >= top_p (nucleus, as in
            Megatron-LM's offline knowledge distillation), all k when they never reach it; in (0, 1].
        within_nats: keep the entries within this many nats of the top-1's logprob; >= 0.

    Returns:
        (ids, logprobs) of the same shapes; every row keeps at least its top-1. With both options a row
        keeps the entries both would keep. Raises ValueError on an option out of range.
    """
    ids = np.array(topk_ids, dtype=np.int32, copy=True)
    lp = np.array(topk_logprobs, dtype=np.float32, copy=True)
    if ids.size == 0:
        return ids, lp
    n, k = ids.shape
    keep = np.ones((n, k), dtype=bool)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}: must be in (0, 1]")
        mass_before = np.cumsum(np.exp(lp.astype(np.float64)), axis=1) - np.exp(lp.astype(np.float64))
        keep &= mass_before < top_p  # an entry is needed while the mass before it is short of p
    if within_nats is not None:
        if not within_nats >= 0.0:
            raise ValueError(f"within_nats={within_nats}: must be >= 0")
        keep &= lp.astype(np.float64) >= lp[:, :1].astype(np.float64) - within_nats
    keep[:, 0] = True
    keep &= np.cumsum(~keep, axis=1) == 0  # a prefix: nothing kept after the first dropped entry
    ids[~keep] = PAD_ID
    lp[~keep] = -np.inf
    return ids, lp
# ---------------------------------------------------------------- v2: classes


# Class alphabets (`_ans.IntClass` limits): values at or above escape to bit-length symbols + raw bits.
_LIMITS = {"top1": 128, "below": 64, "gap": 64, "escape": 512}
# rank buckets (a class per bucket): ranks 1, 2, 3, 4, 5-7, 8-15, 16+
_RANK_EDGES = np.array([0, 1, 2, 3, 4, 5, 8, 16])
# the previous gap's bucket (the gap before rank j conditions the gap after it), and the top-1's q
# bucket for the first gap (a peaked row has a large first gap)
_GAP_EDGES = np.array([0, 1, 2, 3, 5, 9, 17, 33])
_TOP1_EDGES = np.array([0, 1, 2, 4, 8, 16, 32, 64])


CTX_MAX = 32  # context lists keep their 32 most frequent ids
CTX_FIRST = 32  # a listed id at index <= this is coded by its index even when recency could code it
COPY_ROWS = 16  # v3: an id may copy an entry of one of the sample's previous COPY_ROWS rows


class _IdLayout:
    """The id alphabet: 0 escape, 1..CTX_MAX context-list index, (v3) COPY_ROWS symbols "a copy of an entry
    of the row d = 1..COPY_ROWS rows back" (its rank there in class ``copy``), then one symbol per recency
    bit length (1..32; 33 escapes). v2's is the same without the copy symbols."""

    def __init__(self, version: int):
        self.copy = CTX_MAX + 1  # copy + d - 1
        self.recent = self.copy + (COPY_ROWS if version >= 3 else 0)  # recent + bit length - 1
        self.size = self.recent + 32  # v2's alphabet (bit length 33 escapes in `_ans.IntClass`)


def _copy_source(ids: np.ndarray, valid: np.ndarray, tok_start_of_pos: np.ndarray):
    """int64 ``[N, k]`` twice: for each entry, the nearest earlier row d = 1..COPY_ROWS back in its sample
    holding the same id, and the first rank there; (0, -1) when none does. One sort of the entries by
    (sample, id, row, rank)."""
    k = ids.shape[1]
    dist = np.zeros(ids.shape, dtype=np.int64)
    src = np.full(ids.shape, -1, dtype=np.int64)
    flat = np.flatnonzero(valid.ravel())
    if not len(flat):
        return dist, src
    row, rank = flat // k, flat % k
    # flat is ascending (row, rank): a stable sort by (sample, id) keeps that order inside each group
    order = np.argsort(tok_start_of_pos[row].astype(np.int64) * 2**31 + ids.ravel()[flat], kind="stable")
    row, rank, flat = row[order], rank[order], flat[order]
    same = np.zeros(len(flat), dtype=bool)  # the previous entry in this order has the same id and sample
    key_id, key_sample = ids.ravel()[flat], tok_start_of_pos[row]
    same[1:] = (key_id[1:] == key_id[:-1]) & (key_sample[1:] == key_sample[:-1])
    # the first entry of each (sample, id, row) group; earlier rows of the same id sit just before it
    first = ~same
    first[1:] |= row[1:] != row[:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(len(flat)), 0))  # each entry's group head
    prev = head - 1  # the last entry of the previous group: its row is the nearest earlier one
    ok = (prev >= 0) & same[head]
    prev_head = head[np.maximum(prev, 0)]  # that row's first (lowest) rank
    d = row - row[prev_head]
    ok &= (d >= 1) & (d <= COPY_ROWS)
    dist.ravel()[flat[ok]] = d[ok]
    src.ravel()[flat[ok]] = rank[prev_head[ok]]
    return dist, src


def _recency(inp_rank: np.ndarray, start: np.ndarray, at: np.ndarray, id_rank: np.ndarray, mask: np.ndarray):
    """int64 ``[N, k]``: for each masked entry, how far before token index ``at[i]`` (inclusive, not before
    the sample's first token ``start[i]``) its id last occurs in the shard's tokens; -1 when it does not
    (and for unmasked entries). Tokens and ids are vocabulary ranks."""
    n_tok = max(len(inp_rank), 1)
    keys = inp_rank * n_tok + np.arange(len(inp_rank))
    keys.sort()
    out = np.full(id_rank.shape, -1, dtype=np.int64)
    rows, cols = np.nonzero(mask)
    if rows.size == 0 or keys.size == 0:
        return out
    v = id_rank[rows, cols]
    i = np.searchsorted(keys, v * n_tok + at[rows], side="right") - 1
    ok = i >= 0
    hit = keys[np.maximum(i, 0)]
    ok &= (hit // n_tok == v) & (hit % n_tok >= start[rows])
    out[rows[ok], cols[ok]] = at[rows[ok]] - hit[ok] % n_tok
    return out


# the length of the current token's context list (0: no list) conditions its ids' codes
_LIST_EDGES = np.array([0, 1, 3, 6, 12, 24])


_LEVEL_NATS = np.array([0.0, 1.0, 2.0, 3.0, 4.5, 6.0, 8.0, 11.0])  # v3: the previous entry's -logprob


def _gap_classes(
    j: int, top1: np.ndarray, prev_gap: np.ndarray | None, prev_q: np.ndarray, config: CodecConfig
) -> tuple[list[str], np.ndarray]:
    """The classes of the gaps before rank j (rows given by their top-1 ``q``, the gap before rank j - 1
    and the previous entry's ``q``): (class names, class index per row). v2: rank bucket x previous gap
    (the top-1 for j = 1); v3: previous gap x the previous entry's level in nats (the top-1 for j = 1)."""
    if j == 1:
        b = _bucket(top1, _TOP1_EDGES)
        names = [f"gap.{_bucket(1, _RANK_EDGES)}.{i}" for i in range(len(_TOP1_EDGES))]
        return names, b
    pg = _bucket(prev_gap, _GAP_EDGES)
    if config.version < 3:
        rb = _bucket(j, _RANK_EDGES)
        return [f"gap.{rb}.{i}" for i in range(len(_GAP_EDGES))], pg
    lv = _bucket(prev_q * config.step, _LEVEL_NATS)
    names = [f"gap.l{a}.{b}" for a in range(len(_LEVEL_NATS)) for b in range(len(_GAP_EDGES))]
    return names, lv * len(_GAP_EDGES) + pg


def _gold_list_index(ctx_keys: np.ndarray, ctx_sizes: np.ndarray, pair_ranks: np.ndarray, cur_rank: np.ndarray,
                     gold_rank: np.ndarray, nv: int) -> np.ndarray:
    """v3: per row, 1 + the index of the gold token (vocab rank) in the context list of the current
    token, 0 when it is not listed."""
    out = np.zeros(len(cur_rank), dtype=np.int64)
    if not len(pair_ranks) or not len(cur_rank):
        return out
    key = np.repeat(ctx_keys, ctx_sizes) * nv + pair_ranks
    order = np.argsort(key, kind="stable")
    sk = key[order]
    want = cur_rank * nv + gold_rank
    i = np.minimum(np.searchsorted(sk, want), len(sk) - 1)
    found = sk[i] == want
    out[found] = (_segment_index(ctx_sizes) + 1)[order[i[found]]]
    return out


def _exclude(lidx: np.ndarray, gold_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v3 exclusion: a row's ids are distinct, so a listed id's index is coded among the list entries
    that the gold token (known before the ids) and the row's earlier list-coded entries do not hold.
    `lidx`: int64 ``[N, k]`` list index (1-based, 0: not list-coded); `gold_index`: `_gold_list_index`.
    Returns (the symbols, which entries stay list-coded): an entry whose index is already excluded (a
    repeated id in a row) is coded otherwise."""
    n, k = lidx.shape
    taken = np.zeros((n, k + 1), dtype=np.int64)
    taken[:, 0] = gold_index
    out = np.zeros((n, k), dtype=np.int64)
    ok = lidx > 0
    for j in range(k):
        c, e = lidx[:, j], taken[:, : j + 1]
        ok[:, j] &= ~(e == c[:, None]).any(axis=1)
        out[:, j] = np.where(ok[:, j], c - ((e > 0) & (e < c[:, None])).sum(axis=1), 0)
        taken[:, j + 1] = np.where(ok[:, j], c, 0)
    return out, ok


def _unexclude(sym: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """The list indices `_exclude` turned into `sym` (1-based), given each row's excluded indices
    ``taken`` (0: none): the sym-th index that is not taken. One pass over each row's taken indices in
    ascending order (each one at or below the running answer moves it up by one)."""
    c = sym.copy()
    for t in np.sort(np.where(taken > 0, taken, np.iinfo(np.int64).max), axis=1).T:
        c += t <= c
    return c


def _id_groups(keep: np.ndarray, list_bucket: np.ndarray, version: int) -> tuple[np.ndarray, list, np.ndarray]:
    """The flat indices of the ``[N, k]`` entries whose id symbols are coded, in stream order, with
    the (class name, count) of each run and (v3) the rank of each run. v2: by class (rank bucket, then
    list-length bucket), row-major inside; v3: by rank, then list-length bucket (a rank's symbols are
    read before the next rank's, for `_exclude`)."""
    k = keep.shape[1]
    flat = np.flatnonzero(keep.ravel())
    lb = list_bucket[flat // k]
    nl = len(_LIST_EDGES)
    if version < 3:
        cls = _bucket(flat % k, _RANK_EDGES) * nl + lb
        groups = [(f"id.{c // nl}.{c % nl}", -1) for c in range(len(_RANK_EDGES) * nl)]
    else:
        cls = (flat % k) * nl + lb
        groups = [(f"id.{_bucket(c // nl, _RANK_EDGES)}.{c % nl}", c // nl) for c in range(k * nl)]
    order = np.argsort(cls, kind="stable")
    counts = np.bincount(cls, minlength=len(groups))
    return flat[order], [(name, int(m)) for (name, _j), m in zip(groups, counts, strict=True)], np.array(
        [j for _name, j in groups], dtype=np.int64)


def _list_bucket(cur_rank: np.ndarray, ctx_keys: np.ndarray, ctx_sizes: np.ndarray) -> np.ndarray:
    """Per position: the bucket of the length of the context list of its current token (vocab rank)."""
    if not len(ctx_keys):
        return np.zeros(len(cur_rank), dtype=np.int64)
    i = np.minimum(np.searchsorted(ctx_keys, cur_rank), len(ctx_keys) - 1)
    size = np.where(ctx_keys[i] == cur_rank, ctx_sizes[i], 0)
    return _bucket(size, _LIST_EDGES)


def _bucket(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, values, side="right") - 1


def _limit(name: str, k: int, version: int) -> int:
    """The `_ans.IntClass` limit of a class, by the family before its first '.'."""
    base = name.split(".")[0]
    return {"kt": k, "gold": k + 1, "copy": k, "id": _IdLayout(version).size}.get(base) or _LIMITS[base]


class _Shard:
    """The arrays of a shard's samples, concatenated (positions row-major)."""

    def __init__(self, samples: list[ScoredSample], k: int):
        self.n_pos = np.array([len(s.positions) for s in samples], dtype=np.int64)
        self.n_tok = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
        self.input_ids = np.concatenate(
            [np.asarray(s.input_ids, dtype=np.int64) for s in samples] + [np.zeros(0, np.int64)]
        )
        tok_start = np.cumsum(self.n_tok) - self.n_tok
        pos = np.concatenate([np.asarray(s.positions, dtype=np.int64) for s in samples] + [np.zeros(0, np.int64)])
        self.pos_abs = pos + np.repeat(tok_start, self.n_pos)
        self.tok_start_of_pos = np.repeat(tok_start, self.n_pos)
        self.topk_ids = np.concatenate(
            [np.asarray(s.topk_ids, dtype=np.int64).reshape(-1, k) for s in samples] + [np.zeros((0, k), np.int64)]
        )
        self.topk_lp = np.concatenate(
            [np.asarray(s.topk_logprobs).reshape(-1, k) for s in samples] + [np.zeros((0, k), np.float32)]
        )
        self.gold_lp = np.concatenate([np.asarray(s.gold_logprob).ravel() for s in samples] + [np.zeros(0)])


def _pack_vocab(vocab: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """v3: the shard vocabulary (ids by descending count, ascending inside a count) as the lengths of its
    runs of equal count and, inside a run, the differences between consecutive ids (the first: the id):
    the long tail of ids seen once or twice costs about a byte each instead of two."""
    if not len(vocab):
        return {"vocab_runs": np.zeros(0, np.int64), "vocab_deltas": np.zeros(0, np.int64)}
    starts = np.concatenate([[True], counts[1:] != counts[:-1]])
    deltas = np.where(starts, vocab, np.diff(vocab, prepend=0))
    return {"vocab_runs": np.diff(np.flatnonzero(np.concatenate([starts, [True]]))), "vocab_deltas": deltas}


def _unpack_vocab(t: dict[str, np.ndarray]) -> np.ndarray:
    runs, deltas = t["vocab_runs"], t["vocab_deltas"]
    if int(runs.sum()) != len(deltas):
        raise ValueError("corrupt shard: vocabulary runs disagree with its length")
    total = np.cumsum(deltas)
    starts = np.cumsum(runs) - runs
    return total - np.repeat(total[starts] - deltas[starts], runs)


def _vocab_rank(vocab_ids: np.ndarray, rank_of: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return rank_of[np.searchsorted(vocab_ids, ids)]


def encode_shard(
    samples: list[ScoredSample], k: int, config: CodecConfig = CodecConfig(), stats: dict | None = None
) -> bytes:
    """Encode samples (already validated) into one Parquet file's bytes (encoding ``config.version``: v3
    by default, v2 or v1 for a dataset written in them).

    Args:
        samples: the shard's samples (`validate`d); k: entries per row.
        config: step and version; stats: when given, receives the bytes each part of the top-k costs
            (ANS estimate per class family: ``kt``, ``gold``, ``top1``, ``gap``, ``below``, ``id``,
            ``recent``, ``escape``, v3 ``copy``; ``table``: context table and models), for
            `bench/bench_codec.py`'s breakdown.

    Raises ValueError for truncated rows in v1 or a value too large for the coder."""
    if config.version == 1:
        if any((np.asarray(s.topk_ids) == PAD_ID).any() for s in samples):
            raise ValueError("encoding v1 cannot store truncated rows: use version 2 or 3")
        return _encode_shard_v1(samples, k, config)
    version = config.version
    sl = (config.step_units, config.step_log2)
    sh = _Shard(samples, k)
    n = len(sh.pos_abs)
    valid = sh.topk_ids != PAD_ID
    kt = valid.sum(axis=1)
    q = quantise(np.where(valid, sh.topk_lp, LOGPROB_FLOOR), *sl)
    gold_q = quantise(sh.gold_lp, *sl)

    # gold rank: the first rank holding the gold id, if its stored logprob is also the gold's; else k
    gold_id = sh.input_ids[sh.pos_abs + 1] if n else np.zeros(0, np.int64)
    hit = sh.topk_ids == gold_id[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
    in_topk = rank < k
    in_topk[in_topk] = q[np.flatnonzero(in_topk), rank[in_topk]] == gold_q[in_topk]
    rank = np.where(in_topk, rank, k)
    keep = valid.copy()  # the ids to code: all but the gold's and the padding
    keep[np.flatnonzero(in_topk), rank[in_topk]] = False

    # shard vocabulary, most frequent first: codes input_ids, the context table and escaped ids
    vocab_ids, vocab_counts = np.unique(np.concatenate([sh.input_ids, sh.topk_ids[keep]]), return_counts=True)
    by_freq = np.argsort(-vocab_counts, kind="stable")
    vocab = vocab_ids[by_freq]
    rank_of = np.empty(len(vocab), dtype=np.int64)
    rank_of[by_freq] = np.arange(len(vocab))
    nv = max(len(vocab), 1)

    # context table: (rank of current token, rank of id) pairs seen min_pair_count times or more; per
    # context most frequent first. Code 0 escapes to the id's vocabulary rank.
    ctx_tok = np.broadcast_to(sh.input_ids[sh.pos_abs][:, None], (n, k))[keep] if n else np.zeros(0, np.int64)
    ctx = _vocab_rank(vocab_ids, rank_of, ctx_tok)
    idr = _vocab_rank(vocab_ids, rank_of, sh.topk_ids[keep])
    pairs, pair_inv, pair_counts = np.unique(ctx * nv + idr, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(pair_counts >= config.min_pair_count)
    pair_ctx, pair_id = pairs[repeated] // nv, pairs[repeated] % nv
    order = np.lexsort((pair_id, -pair_counts[repeated], pair_ctx))
    ctx_keys, ctx_sizes = np.unique(pair_ctx, return_counts=True)
    listed = _segment_index(ctx_sizes) < CTX_MAX  # ids further down a list are coded otherwise
    order, pair_ctx, pair_id = order[listed], pair_ctx[order][listed], pair_id[order][listed]
    ctx_keys, ctx_sizes = np.unique(pair_ctx, return_counts=True)
    code_of_pair = np.zeros(len(pairs), dtype=np.int64)
    code_of_pair[repeated[order]] = _segment_index(ctx_sizes) + 1
    codes = np.zeros((n, k), dtype=np.int64)
    codes[keep] = code_of_pair[pair_inv.ravel()]
    id_rank = np.zeros((n, k), dtype=np.int64)
    id_rank[keep] = idr

    enc = _ans.Encoder()
    enc.write("kt", kt - 1, k)
    enc.write("gold", rank, k + 1)
    gold_class = np.where(rank == 0, 0, np.where(rank < k, 1, 2))  # gold: the top-1, another entry, absent
    for g in range(3):  # a teacher whose top-1 is the gold token tends to be sure of it
        enc.write(f"top1.{g}", q[gold_class == g, 0], _LIMITS["top1"])
    gaps = np.diff(q, axis=1)
    for j in range(1, k):
        rows = np.flatnonzero(kt > j)
        names, cls = _gap_classes(j, q[rows, 0], gaps[rows, j - 2] if j > 1 else None, q[rows, j - 1], config)
        order = np.argsort(cls, kind="stable")
        counts = np.bincount(cls, minlength=len(names))
        for name, part in zip(names, np.split(gaps[rows[order], j - 1], np.cumsum(counts)[:-1]), strict=True):
            enc.write(name, part, _LIMITS["gap"])
    absent = np.flatnonzero(~in_topk)
    below = gold_q[absent] - q[absent, kt[absent] - 1]
    enc.write("below", np.where(below >= 0, 2 * below, -2 * below - 1), _LIMITS["below"])
    # an id not in its context's list (or too far down it) but seen earlier in the sample (the gold
    # token's position included) is coded by how far back: symbol CTX_MAX + bit length of d + 1, then
    # the low bits; else 0 and its vocabulary rank
    inp_rank = _vocab_rank(vocab_ids, rank_of, sh.input_ids)
    lay = _IdLayout(version)
    near = keep & (codes > 0) & (codes <= CTX_FIRST)  # high in its list: the list index, whatever else
    sym = np.where(near, codes, 0)
    if version >= 3:
        gold_index = np.zeros(n, dtype=np.int64)
        pres = np.flatnonzero(in_topk)
        gold_index[pres] = _gold_list_index(ctx_keys, ctx_sizes, pair_id, inp_rank[sh.pos_abs[pres]],
                                            inp_rank[sh.pos_abs[pres] + 1], nv)
        sym, near = _exclude(np.where(near, codes, 0), gold_index)
        # v3: an id that is not listed but one of the sample's last COPY_ROWS rows holds is a copy of
        # that entry (a listed id keeps its list index: copies before the list measured larger)
        cdist, csrc = _copy_source(sh.topk_ids, valid, sh.tok_start_of_pos)
        use_copy = keep & (cdist > 0) & ~near
        sym[use_copy] = lay.copy + cdist[use_copy] - 1
        near |= use_copy
    dist = _recency(inp_rank, sh.tok_start_of_pos, sh.pos_abs + 1, id_rank, keep & ~near)
    recent = keep & ~near & (dist >= 0)
    far = keep & ~recent & ~near & (codes == 0)  # neither listed nor seen: the vocabulary rank
    listed = keep & ~recent & ~near & (codes > 0)
    sym[listed] = codes[listed]
    bl = _ans._bitlen(dist[recent] + 1)
    sym[recent] = lay.recent + bl - 1
    list_bucket = _list_bucket(inp_rank[sh.pos_abs] if n else np.zeros(0, np.int64), ctx_keys, ctx_sizes)
    entries, groups, _ranks = _id_groups(keep, list_bucket, version)
    sym_sorted = sym.ravel()[entries]
    for (name, _m), part in zip(groups, np.split(sym_sorted, np.cumsum([m for _n, m in groups])[:-1]), strict=True):
        enc.write(name, part, lay.size)
    recent_order = entries[recent.ravel()[entries]]
    escaped = [id_rank.ravel()[entries[far.ravel()[entries]]]]
    d1 = dist.ravel()[recent_order] + 1
    nb = _ans._bitlen(d1) - 1
    enc.write_bits("recent", d1 - (np.int64(1) << nb), nb)
    enc.write("escape", np.concatenate(escaped), _LIMITS["escape"])
    if version >= 3:
        copy_order = entries[use_copy.ravel()[entries]]
        _write_by_rank(enc, "copy", copy_order % k, csrc.ravel()[copy_order], k)
    words, hists = enc.finish()

    table_arrays = {
        **(_pack_vocab(vocab, vocab_counts[by_freq]) if version >= 3 else {"vocab": vocab}),
        "ctx_key_deltas": np.diff(ctx_keys, prepend=0),
        "ctx_sizes": ctx_sizes,
        "pair_ids": pair_id,
    }
    table_arrays.update({f"h:{name}": h for name, h in hists.items()})
    table = _pack_arrays(table_arrays, config.zstd_level)
    if stats is not None:
        stats.update(enc.costs())
        stats["table"] = len(table)

    tok_bounds = np.concatenate([[0], np.cumsum(sh.n_tok)])
    small, wide, huge = _escape(_vocab_rank(vocab_ids, rank_of, sh.input_ids))
    b1 = np.concatenate([[0], np.cumsum(small == ESCAPE)])[tok_bounds]
    b2 = np.concatenate([[0], np.cumsum(wide == ESCAPE16)])[b1]
    columns = _sample_columns(samples, SHARD_SCHEMA)
    columns["input_ids"] = [small[tok_bounds[i] : tok_bounds[i + 1]].tobytes() for i in range(len(samples))]
    columns["input_ids_u16"] = [wide[b1[i] : b1[i + 1]].tobytes() for i in range(len(samples))]
    columns["input_ids_u32"] = [huge[b2[i] : b2[i + 1]].tobytes() for i in range(len(samples))]
    meta = {"codec": config.describe()["codec"], "k": k, "step_units": sl[0], "step_log2": sl[1]}
    kv = {CODEC_KEY: json.dumps(meta).encode(), TABLE_KEY: table, TOPK_KEY: words.astype("<u4").tobytes()}
    return _write_parquet(columns, SHARD_SCHEMA, V2_STREAM_COLUMNS, config.zstd_level, kv)


def _sample_columns(samples: list[ScoredSample], schema: pa.Schema) -> dict[str, list]:
    """The columns every encoding stores the same way; the stream columns are left empty."""
    columns: dict[str, list] = {name: [] for name in schema.names}
    for s in samples:
        columns["sample_id"].append(s.sample_id)
        columns["num_tokens"].append(len(s.input_ids))
        columns["num_positions"].append(len(s.positions))
        columns["truncated"].append(bool(s.truncated))
        columns["text"].append(s.text)
        columns["assistant_spans"].append(np.asarray(s.assistant_spans, dtype=np.int32).ravel())
        columns["loss_spans"].append(_runs(np.asarray(s.loss_mask)))
        columns["position_spans"].append(_positions_runs(np.asarray(s.positions, dtype=np.int64)))
    return columns


def _write_parquet(columns: dict[str, list] | pa.Table, schema: pa.Schema, streams, level: int, kv: dict) -> bytes:
    """One row group of `columns` (lists by column name, or a table of `schema`), zstd at `level`, with
    `kv` as the file's key-value metadata."""
    if isinstance(columns, pa.Table):
        tbl = columns
    else:
        tbl = pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)
    buf = io.BytesIO()
    # store_schema=False: the Arrow schema copy would repeat the key-value metadata in base64
    with pq.ParquetWriter(
        buf,
        schema,
        compression="zstd",
        compression_level=level,
        use_dictionary=STAT_COLUMNS,
        # lengths apart from the bytes: zstd then sees each stream as one contiguous run
        column_encoding={c: "DELTA_LENGTH_BYTE_ARRAY" for c in streams},
        write_statistics=STAT_COLUMNS,
        store_schema=False,
    ) as writer:
        writer.write_table(tbl, row_group_size=max(1, tbl.num_rows))
        writer.add_key_value_metadata(kv)
    return buf.getvalue()
def rename_samples(data: bytes, sample_ids: list[str], config: CodecConfig) -> bytes:
    """A shard's bytes with row ``i``'s sample id replaced by ``sample_ids[i]`` and nothing else changed:
    the top-k stream, its tables and every other column are carried over as stored (no decode, no
    re-encode), so each row decodes to exactly the values it held. What `datastore.reuse` commits when
    a new dataset reuses a whole shard of an earlier one. The Parquet columns are rewritten at
    `config.zstd_level` (the target dataset's).

    Raises:
        ValueError: `sample_ids` has not one id per row, repeats an id, or `data` is not a shard of
            `config`'s encoding (codec version and logprob step).
    """
    pf = pq.ParquetFile(pa.BufferReader(data))
    kv = dict(pf.metadata.metadata or {})
    try:
        codec = json.loads(kv[CODEC_KEY])
    except (KeyError, ValueError):
        raise ValueError("not a logitfuse shard (no codec metadata)") from None
    want = config.describe()
    if (codec.get("codec"), codec.get("step_units"), codec.get("step_log2")) != \
            (want["codec"], want["step_units"], want["step_log2"]):
        raise ValueError(f"shard encoding {codec.get('codec')} step {codec.get('step_units')}/2^"
                         f"{codec.get('step_log2')} differs from the dataset's {want['codec']} step "
                         f"{want['step_units']}/2^{want['step_log2']}")
    if pf.metadata.num_rows != len(sample_ids) or len(set(sample_ids)) != len(sample_ids):
        raise ValueError(f"{len(sample_ids)} sample ids for a shard of {pf.metadata.num_rows} rows "
                         f"(one distinct id per row)")
    v1 = codec["codec"] == CODEC_V1
    schema = SHARD_SCHEMA_V1 if v1 else SHARD_SCHEMA
    table = pf.read().cast(schema)
    table = table.set_column(schema.get_field_index("sample_id"), schema.field("sample_id"),
                             pa.array(sample_ids, type=pa.string()))
    return _write_parquet(table, schema, STREAM_COLUMNS if v1 else V2_STREAM_COLUMNS, config.zstd_level, kv)


def _encode_shard_v1(samples: list[ScoredSample], k: int, config: CodecConfig) -> bytes:
    """Encoding v1 (`CodecConfig(version=1)`): per-row byte streams, zstd. No truncated rows."""
    sl = (config.step_units, config.step_log2)
    n_pos = np.array([len(s.positions) for s in samples], dtype=np.int64)
    n_tok = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    input_ids = np.concatenate(
        [np.asarray(s.input_ids, dtype=np.int64) for s in samples] + [np.zeros(0, np.int64)]
    )
    tok_start = np.cumsum(n_tok) - n_tok
    pos = np.concatenate([np.asarray(s.positions, dtype=np.int64) for s in samples] + [np.zeros(0, np.int64)])
    pos_abs = pos + np.repeat(tok_start, n_pos)  # index into the shard's concatenated input_ids
    topk_ids = np.concatenate([np.asarray(s.topk_ids, dtype=np.int64).reshape(-1, k) for s in samples])
    q = quantise(np.concatenate([np.asarray(s.topk_logprobs).reshape(-1, k) for s in samples]), *sl)
    gold_q = quantise(np.concatenate([np.asarray(s.gold_logprob).ravel() for s in samples]), *sl)
    n = len(pos)

    # gold rank: the first rank holding the gold id, if its stored logprob is also the gold's
    gold_id = input_ids[pos_abs + 1] if n else np.zeros(0, np.int64)
    hit = topk_ids == gold_id[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
    in_topk = rank < k
    in_topk[in_topk] = q[np.flatnonzero(in_topk), rank[in_topk]] == gold_q[in_topk]
    rank = np.where(in_topk, rank, k)
    keep = np.ones((n, k), dtype=bool)
    keep[np.flatnonzero(in_topk), rank[in_topk]] = False

    # shard vocabulary, most frequent first: codes input_ids and the context table
    vocab_ids, vocab_counts = np.unique(np.concatenate([input_ids, topk_ids[keep]]), return_counts=True)
    by_freq = np.argsort(-vocab_counts, kind="stable")
    vocab = vocab_ids[by_freq]
    rank_of = np.empty(len(vocab), dtype=np.int64)
    rank_of[by_freq] = np.arange(len(vocab))

    def vocab_rank(ids: np.ndarray) -> np.ndarray:
        return rank_of[np.searchsorted(vocab_ids, ids)]

    # context table: (rank of current token, rank of id) pairs seen twice or more; per context, most
    # frequent first. Code 0 escapes to `id_escapes` (a pair seen once costs less there than in the table).
    ctx = vocab_rank(np.repeat(input_ids[pos_abs], k).reshape(n, k)[keep]) if n else np.zeros(0, np.int64)
    idr = vocab_rank(topk_ids[keep])
    pairs, pair_inv, pair_counts = np.unique(ctx * len(vocab) + idr, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(pair_counts > 1)
    pair_ctx, pair_id = pairs[repeated] // max(len(vocab), 1), pairs[repeated] % max(len(vocab), 1)
    order = np.lexsort((-pair_counts[repeated], pair_ctx))
    ctx_keys, ctx_sizes = np.unique(pair_ctx, return_counts=True)
    code_of_pair = np.zeros(len(pairs), dtype=np.int64)
    code_of_pair[repeated[order]] = _segment_index(ctx_sizes) + 1
    codes = code_of_pair[pair_inv]
    escaped_ids = idr[codes == 0]

    table = _pack_arrays(
        {
            "vocab": vocab,
            "ctx_key_deltas": np.diff(ctx_keys, prepend=0),
            "ctx_sizes": ctx_sizes,
            "pair_ids": pair_id[order],
        },
        config.zstd_level,
    )

    # per-sample streams, cut by row
    pos_bounds = np.concatenate([[0], np.cumsum(n_pos)])
    tok_bounds = np.concatenate([[0], np.cumsum(n_tok)])
    kept_per_pos = keep.sum(axis=1)
    code_bounds = np.concatenate([[0], np.cumsum(kept_per_pos)])[pos_bounds]
    escape_bounds = np.concatenate([[0], np.cumsum(codes == 0)])[code_bounds]
    # a gold outside the top-k sits below its last rank: store the (zigzag) distance to it
    below = gold_q[~in_topk] - q[~in_topk, -1]
    extra_bounds = np.concatenate([[0], np.cumsum(~in_topk)])[pos_bounds]
    streams = {
        "input_ids": (_escape(vocab_rank(input_ids)), tok_bounds),
        "lp_top1": (_escape(q[:, 0]), pos_bounds),
        "lp_delta": (_escape(np.diff(q, axis=1)), pos_bounds * (k - 1)),
        "id_codes": (_escape(codes), code_bounds),
        "id_escapes": (_escape(escaped_ids), escape_bounds),
        "gold_rank": (_escape(rank), pos_bounds),
        "gold_extra": (_escape(np.where(below >= 0, 2 * below, -2 * below - 1)), extra_bounds),
    }
    cuts = {}  # per stream: row bounds in each of its three levels
    for name, ((small, wide, _huge), bounds) in streams.items():
        b1 = np.concatenate([[0], np.cumsum(small == ESCAPE)])[bounds]
        b2 = np.concatenate([[0], np.cumsum(wide == ESCAPE16)])[b1]
        cuts[name] = (bounds, b1, b2)
    columns = _sample_columns(samples, SHARD_SCHEMA_V1)
    for i in range(len(samples)):
        for name, (levels, _bounds) in streams.items():
            for suffix, level, b in zip(("", "_u16", "_u32"), levels, cuts[name], strict=True):
                columns[name + suffix].append(level[b[i] : b[i + 1]].tobytes())
    meta = {"codec": CODEC_V1, "k": k, "step_units": sl[0], "step_log2": sl[1]}
    kv = {CODEC_KEY: json.dumps(meta).encode(), TABLE_KEY: table}
    return _write_parquet(columns, SHARD_SCHEMA_V1, STREAM_COLUMNS, config.zstd_level, kv)



# ---------------------------------------------------------------- decode


def _flat_binary(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """All values of a binary column, concatenated, as one uint8 array (zero copy when possible)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros(0, dtype=np.uint8)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = arr.buffers()[2]
    if data is None or offsets[-1] == offsets[0]:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]


def _flat_list(col: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)


@dataclass
class ContextTable:
    """A shard's codec parameters, vocabulary, context table and (v2) class models, read once per shard.

    For v2 the top-k of the whole shard are one ANS stream: `decode_rows` decodes it from `shard`, the
    full table that `read_shard_bytes` read, once (cached here), whatever slice of rows it is asked for."""

    codec: str
    k: int
    step_units: int
    step_log2: int
    vocab: np.ndarray  # int64 token ids, most frequent first
    ctx_keys: np.ndarray  # ascending vocab ranks of contexts
    ctx_sizes: np.ndarray  # length of each context's list
    ctx_starts: np.ndarray  # start of each context's list in pair_ids
    pair_ids: np.ndarray  # token ids
    pair_ranks: np.ndarray  # the same as vocab ranks
    hists: dict[str, np.ndarray] = field(default_factory=dict)  # v2: quantised class histograms
    words: np.ndarray | None = None  # v2: the shard's ANS stream (uint32)
    shard: pa.Table | None = None  # v2: every row of the shard
    _decoded: dict[str, int] | None = None
    _samples: list[ScoredSample] | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes]) -> ContextTable:
        if metadata is None or CODEC_KEY not in metadata or TABLE_KEY not in metadata:
            raise ValueError("not a logitfuse logits shard: codec metadata missing")
        codec = json.loads(metadata[CODEC_KEY])
        name = codec.get("codec")
        if name not in CODECS:
            raise ValueError(f"unknown shard codec {name!r}, this reader knows {', '.join(map(repr, CODECS))}")
        t = _unpack_arrays(metadata[TABLE_KEY])
        if "vocab" not in t:
            t["vocab"] = _unpack_vocab(t)
        sizes = t["ctx_sizes"]
        words = None
        if name != CODEC_V1:
            if TOPK_KEY not in metadata:
                raise ValueError("corrupt shard: the top-k stream is missing")
            words = np.frombuffer(metadata[TOPK_KEY], dtype="<u4")
        return cls(
            codec=name,
            k=int(codec["k"]),
            step_units=int(codec["step_units"]),
            step_log2=int(codec["step_log2"]),
            vocab=t["vocab"],
            ctx_keys=np.cumsum(t["ctx_key_deltas"]),
            ctx_sizes=sizes,
            ctx_starts=np.cumsum(sizes) - sizes,
            pair_ids=t["vocab"][t["pair_ids"]] if len(t["pair_ids"]) else np.zeros(0, np.int64),
            pair_ranks=t["pair_ids"],
            hists={key[2:]: h for key, h in t.items() if key.startswith("h:")},
            words=words,
        )


def read_shard_bytes(data: bytes) -> tuple[pa.Table, ContextTable]:
    """A shard file's bytes -> (its table, its `ContextTable`), for `decode_rows`."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    table = pf.read()
    ctx = ContextTable.from_metadata(pf.metadata.metadata)
    if ctx.codec != CODEC_V1:
        ctx.shard = table
    return table, ctx


@dataclass
class _Rows:
    """What every encoding stores the same way: tokens, positions, masks, text, per row."""

    n_pos: np.ndarray
    n_tok: np.ndarray
    input_ranks: np.ndarray  # int64 vocab ranks of every token, rows concatenated
    input_ids: np.ndarray  # int64 token ids
    positions: list[np.ndarray]
    pos_abs: np.ndarray  # int64 index of each scored position in input_ids


def _rows(table: pa.Table, vocab: np.ndarray) -> _Rows:
    n_pos = np.asarray(table.column("num_positions").to_numpy(), dtype=np.int64)
    n_tok = np.asarray(table.column("num_tokens").to_numpy(), dtype=np.int64)
    input_ranks = _stream(table, "input_ids")
    if len(input_ranks) != n_tok.sum():
        raise ValueError(f"corrupt shard: {len(input_ranks)} input ids, expected {int(n_tok.sum())}")
    if len(input_ranks) and input_ranks.max() >= len(vocab):
        raise ValueError("corrupt shard: an input id outside the shard vocabulary")
    input_ids = vocab[input_ranks] if len(input_ranks) else np.zeros(0, np.int64)
    tok_start = np.cumsum(n_tok) - n_tok
    span_lens = _list_lengths(table.column("position_spans"))
    spans = _flat_list(table.column("position_spans"), np.int64)
    pos_rows = np.split(spans, np.cumsum(span_lens)[:-1]) if len(span_lens) else []
    positions = [_expand_runs(r) for r in pos_rows]
    if any(len(p) != c for p, c in zip(positions, n_pos, strict=True)):
        raise ValueError("corrupt shard: position spans disagree with num_positions")
    pos = np.concatenate(positions + [np.zeros(0, np.int32)]).astype(np.int64)
    pos_abs = pos + np.repeat(tok_start, n_pos)
    if len(pos_abs) and (pos_abs + 1 >= np.repeat(tok_start + n_tok, n_pos)).any():
        raise ValueError("corrupt shard: a scored position past its sample's last token")
    return _Rows(n_pos, n_tok, input_ranks, input_ids, positions, pos_abs)


def _stream(table: pa.Table, name: str) -> np.ndarray:
    return _unescape(
        _flat_binary(table.column(name)),
        _flat_binary(table.column(name + "_u16")).view("<u2"),
        _flat_binary(table.column(name + "_u32")).view("<u4"),
    )


def _assemble(table: pa.Table, r: _Rows, topk_ids: np.ndarray, logprobs: np.ndarray, gold: np.ndarray):
    topk_ids32 = topk_ids.astype(np.int32)
    ids32 = r.input_ids.astype(np.int32)
    mask_lens = _list_lengths(table.column("loss_spans"))
    mask_runs = np.split(_flat_list(table.column("loss_spans"), np.int64), np.cumsum(mask_lens)[:-1])
    span_lens = _list_lengths(table.column("assistant_spans"))
    a_spans = np.split(_flat_list(table.column("assistant_spans"), np.int32), np.cumsum(span_lens)[:-1])
    sample_ids = table.column("sample_id").to_pylist()
    texts = table.column("text").to_pylist()
    truncated = table.column("truncated").to_pylist()
    tok_start = np.cumsum(r.n_tok) - r.n_tok
    out = []
    p0 = 0
    for i in range(table.num_rows):
        t0, t1, p1 = tok_start[i], tok_start[i] + r.n_tok[i], p0 + r.n_pos[i]
        mask = np.zeros(r.n_tok[i], dtype=bool)
        mask[_expand_runs(mask_runs[i])] = True
        out.append(
            ScoredSample(
                sample_id=sample_ids[i],
                input_ids=ids32[t0:t1],
                loss_mask=mask,
                positions=r.positions[i].astype(np.int32),
                topk_ids=topk_ids32[p0:p1],
                topk_logprobs=logprobs[p0:p1],
                gold_logprob=gold[p0:p1],
                text=texts[i],
                assistant_spans=a_spans[i].reshape(-1, 2),
                truncated=bool(truncated[i]),
            )
        )
        p0 = p1
    return out


def decode_rows(table: pa.Table, ctx: ContextTable) -> list[ScoredSample]:
    """Decode every row of a shard table (or any slice of one) into ScoredSamples.

    Truncated rows (`truncate_topk`) come back padded to k with id -1 and logprob -inf."""
    if ctx.codec == CODEC_V1:
        return _decode_rows_v1(table, ctx)
    if ctx._samples is None:
        if ctx.shard is None:
            raise ValueError("decode_rows needs the ContextTable of read_shard_bytes (it holds the whole shard)")
        ctx._samples = _decode_ans(ctx.shard, ctx)
        ctx._decoded = {s.sample_id: i for i, s in enumerate(ctx._samples)}
    if table.num_rows == len(ctx._samples):
        ids = table.column("sample_id").to_pylist()
        if all(s.sample_id == sid for s, sid in zip(ctx._samples, ids, strict=True)):
            return list(ctx._samples)
    return [ctx._samples[ctx._decoded[sid]] for sid in table.column("sample_id").to_pylist()]


def _decode_ans(table: pa.Table, ctx: ContextTable) -> list[ScoredSample]:
    """Encodings v2 and v3: one rANS stream for the whole shard."""
    k, sl, version = ctx.k, (ctx.step_units, ctx.step_log2), CODECS[ctx.codec]
    lay = _IdLayout(version)
    r = _rows(table, ctx.vocab)
    n = len(r.pos_abs)
    dec = _ans.Decoder(ctx.words, ctx.hists, {name: _limit(name, k, version) for name in ctx.hists})
    kt = dec.read("kt", n) + 1
    rank = dec.read("gold", n)
    if n and (kt.max() > k or rank.max() > k):
        raise ValueError("corrupt shard: entry counts or gold ranks out of range")
    q = np.zeros((n, k), dtype=np.int64)
    gold_class = np.where(rank == 0, 0, np.where(rank < k, 1, 2))
    for g in range(3):
        sel = np.flatnonzero(gold_class == g)
        q[sel, 0] = dec.read(f"top1.{g}", len(sel))
    config = CodecConfig(step_units=ctx.step_units, step_log2=ctx.step_log2, version=version)
    for j in range(1, k):  # q[:, j] holds the value at rank j once its gap is read
        rows = np.flatnonzero(kt > j)
        names, cls = _gap_classes(j, q[rows, 0], q[rows, j - 1] - q[rows, j - 2] if j > 1 else None,
                                  q[rows, j - 1], config)
        counts = np.bincount(cls, minlength=len(names))
        vals = [dec.read(name, int(m)) for name, m in zip(names, counts, strict=True)]
        at = rows[np.argsort(cls, kind="stable")]
        q[at, j] = np.concatenate(vals) + q[at, j - 1]
    valid = np.arange(k)[None, :] < kt[:, None]
    present = np.flatnonzero(rank < k)
    if (rank[present] >= kt[present]).any():
        raise ValueError("corrupt shard: a gold rank past its row's entries")
    absent = np.flatnonzero(rank == k)
    zz = dec.read("below", len(absent))
    gold_q = np.empty(n, dtype=np.int64)
    gold_q[present] = q[present, rank[present]]
    gold_q[absent] = q[absent, kt[absent] - 1] + np.where(zz % 2 == 0, zz // 2, -(zz + 1) // 2)

    keep = valid.copy()
    keep[present, rank[present]] = False
    codes = np.zeros((n, k), dtype=np.int64)
    list_bucket = _list_bucket(r.input_ranks[r.pos_abs] if n else np.zeros(0, np.int64), ctx.ctx_keys, ctx.ctx_sizes)
    entries, groups, group_rank = _id_groups(keep, list_bucket, version)
    sym_sorted = np.concatenate([dec.read(name, m) for name, m in groups] + [np.zeros(0, np.int64)])
    if version >= 3:  # undo `_exclude`, rank by rank (a rank's entries are contiguous in the stream)
        taken = np.zeros((n, k + 1), dtype=np.int64)
        taken[present, 0] = _gold_list_index(ctx.ctx_keys, ctx.ctx_sizes, ctx.pair_ranks,
                                             r.input_ranks[r.pos_abs[present]],
                                             r.input_ranks[r.pos_abs[present] + 1], len(ctx.vocab))
        bounds = np.concatenate([[0], np.cumsum(np.bincount(group_rank, [m for _n, m in groups], k))]).astype(np.int64)
        for j in range(k):
            at = np.arange(bounds[j], bounds[j + 1])
            at = at[(sym_sorted[at] > 0) & (sym_sorted[at] <= CTX_MAX)]
            rows = entries[at] // k
            sym_sorted[at] = _unexclude(sym_sorted[at], taken[rows, : j + 1])
            taken[rows, j + 1] = sym_sorted[at]
    codes.ravel()[entries] = sym_sorted
    recent, escaped = entries[sym_sorted >= lay.recent], entries[sym_sorted == 0]
    topk_ids = np.full((n, k), PAD_ID, dtype=np.int64)
    nb = codes.ravel()[recent] - lay.recent
    tok_start = np.repeat(np.cumsum(r.n_tok) - r.n_tok, r.n_pos)
    if len(recent):
        if nb.max() > 32:
            raise ValueError("corrupt shard: an id code outside the alphabet")
        d = (np.int64(1) << nb) + dec.read_bits(nb) - 1
        row = recent // k
        src = r.pos_abs[row] + 1 - d
        if (src < tok_start[row]).any():
            raise ValueError("corrupt shard: an id coded as a token before its sample")
        topk_ids.flat[recent] = r.input_ids[src]
    copied = entries[(sym_sorted >= lay.copy) & (sym_sorted < lay.recent)]
    esc_ranks = dec.read("escape", len(escaped))
    if len(esc_ranks) and esc_ranks.max() >= len(ctx.vocab):
        raise ValueError("corrupt shard: an escaped id outside the shard vocabulary")
    topk_ids.flat[escaped] = ctx.vocab[esc_ranks]
    listed = keep & (codes > 0) & (codes <= CTX_MAX)
    if listed.any():
        cur_rank = np.broadcast_to(r.input_ranks[r.pos_abs][:, None], (n, k))[listed]
        ci = np.minimum(np.searchsorted(ctx.ctx_keys, cur_rank), max(len(ctx.ctx_keys) - 1, 0))
        c = codes[listed]
        if not len(ctx.ctx_keys) or (ctx.ctx_keys[ci] != cur_rank).any() or (c > ctx.ctx_sizes[ci]).any():
            raise ValueError("corrupt shard: an id code outside its context list")
        topk_ids[listed] = ctx.pair_ids[ctx.ctx_starts[ci] + c - 1]
    topk_ids[present, rank[present]] = r.input_ids[r.pos_abs[present] + 1]
    if len(copied):
        src_rank = _read_by_rank(dec, "copy", copied % k)
        _resolve_copies(topk_ids, copied, codes.ravel()[copied] - lay.copy + 1, src_rank, tok_start, kt)
    logprobs = dequantise(q, *sl)
    logprobs[~valid] = -np.inf
    return _assemble(table, r, topk_ids, logprobs, dequantise(gold_q, *sl))



def _write_by_rank(enc: _ans.Encoder, family: str, ranks: np.ndarray, values: np.ndarray, limit: int) -> None:
    """Queue `values` in classes ``family.<rank bucket>`` (the rank of the entry each belongs to)."""
    b = _bucket(ranks, _RANK_EDGES)
    order = np.argsort(b, kind="stable")
    counts = np.bincount(b, minlength=len(_RANK_EDGES))
    for c, part in enumerate(np.split(values[order], np.cumsum(counts)[:-1])):
        enc.write(f"{family}.{c}", part, limit)


def _read_by_rank(dec: _ans.Decoder, family: str, ranks: np.ndarray) -> np.ndarray:
    """The values `_write_by_rank` queued, back in the order of `ranks`."""
    b = _bucket(ranks, _RANK_EDGES)
    order = np.argsort(b, kind="stable")
    counts = np.bincount(b, minlength=len(_RANK_EDGES))
    out = np.empty(len(ranks), dtype=np.int64)
    out[order] = np.concatenate([dec.read(f"{family}.{c}", int(m)) for c, m in enumerate(counts)])
    return out


def _resolve_copies(topk_ids: np.ndarray, copied: np.ndarray, dist: np.ndarray, src_rank: np.ndarray,
                    tok_start_of_pos: np.ndarray, kt: np.ndarray) -> None:
    """Fill the entries (flat indices `copied`) that copy rank `src_rank` of the row `dist` rows back, in
    place. Chains of copies (an id kept for many positions) resolve by pointer doubling: log2(chain) passes."""
    k = topk_ids.shape[1]
    row = copied // k
    p = row - dist
    if (p < 0).any() or (tok_start_of_pos[np.maximum(p, 0)] != tok_start_of_pos[row]).any() or (
        src_rank >= kt[np.maximum(p, 0)]
    ).any():
        raise ValueError("corrupt shard: an id copied from a row or entry that does not exist")
    ptr = np.arange(topk_ids.size, dtype=np.int64)
    ptr[copied] = p * k + src_rank
    while True:
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        ptr = nxt
    flat = topk_ids.ravel()
    flat[copied] = flat[ptr[copied]]


def _decode_rows_v1(table: pa.Table, ctx: ContextTable) -> list[ScoredSample]:
    """Encoding v1: per-row byte streams (`datastore.schema.SHARD_SCHEMA_V1`)."""
    k, sl = ctx.k, (ctx.step_units, ctx.step_log2)
    r = _rows(table, ctx.vocab)
    n, pos_abs = len(r.pos_abs), r.pos_abs

    def stream(name: str) -> np.ndarray:
        return _stream(table, name)

    q = np.empty((n, k), dtype=np.int64)
    q[:, 0] = stream("lp_top1")
    q[:, 1:] = stream("lp_delta").reshape(n, k - 1)
    np.cumsum(q, axis=1, out=q)
    logprobs = dequantise(q, *sl)

    rank = stream("gold_rank")
    if len(rank) != n:
        raise ValueError(f"corrupt shard: {len(rank)} gold ranks, expected {n}")
    in_topk = rank < k
    hit_rows = np.flatnonzero(in_topk)
    gold = np.empty(n, dtype=np.float32)
    gold[hit_rows] = logprobs[hit_rows, rank[hit_rows]]
    zz = stream("gold_extra")
    if len(zz) != n - len(hit_rows):
        raise ValueError("corrupt shard: gold_extra length disagrees with gold_rank")
    gold[~in_topk] = dequantise(q[~in_topk, -1] + np.where(zz % 2 == 0, zz // 2, -(zz + 1) // 2), *sl)

    keep = np.ones((n, k), dtype=bool)
    keep[hit_rows, rank[hit_rows]] = False
    codes = stream("id_codes")
    if len(codes) != int(keep.sum()):
        raise ValueError(f"corrupt shard: {len(codes)} id codes, expected {int(keep.sum())}")
    topk_ids = np.empty((n, k), dtype=np.int64)
    if len(codes):
        cur_rank = r.input_ranks[np.repeat(pos_abs, k).reshape(n, k)[keep]]
        ci = np.minimum(np.searchsorted(ctx.ctx_keys, cur_rank), max(len(ctx.ctx_keys) - 1, 0))
        escaped = codes == 0
        ids = np.empty(len(codes), dtype=np.int64)
        ids[~escaped] = ctx.pair_ids[ctx.ctx_starts[ci[~escaped]] + codes[~escaped] - 1]
        esc_ranks = stream("id_escapes")
        if len(esc_ranks) != int(escaped.sum()):
            raise ValueError("corrupt shard: id_escapes length disagrees with id_codes")
        ids[escaped] = ctx.vocab[esc_ranks]
        topk_ids[keep] = ids
    topk_ids[hit_rows, rank[hit_rows]] = r.input_ids[pos_abs[hit_rows] + 1]
    return _assemble(table, r, topk_ids, logprobs, gold)


def topk_bytes(data: bytes) -> int:
    """Compressed bytes of a shard's top-k part: the top-k stream (v2) or columns (v1), plus the context
    table and models."""
    md = pq.ParquetFile(pa.BufferReader(data)).metadata
    total = len(md.metadata.get(TABLE_KEY, b"")) + len(md.metadata.get(TOPK_KEY, b""))
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for j in range(group.num_columns):
            if group.column(j).path_in_schema in TOPK_COLUMNS:
                total += group.column(j).total_compressed_size
    return total
