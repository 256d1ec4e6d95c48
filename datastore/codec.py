"""The compact encoding of top-k distributions: `ScoredSample`s <-> one Parquet shard's bytes.

Log-probabilities. ``q = rint(-logprob / step)`` with ``step = 5/128 = 0.0390625`` nat by default: every
stored logprob is within ``step / 2 = 5/256 = 0.01953125`` nat of its fp32 input (round to nearest; the
quotient is computed in float64, which can add at most 1e-11 nat; the decoded value ``-5q/128`` is exact
in fp32 for |logprob| <= 2**16, the largest magnitude accepted). There is no floor and no coarser step for the tail: the bound holds for every
entry, -80 included. `CodecConfig(step_units=1, step_log2=5)` gives 1/32 nat (bound 1/64) at ~0.04 B/entry
more. A position stores the top-1's ``q`` and the k-1 differences to the next rank (non-negative because
ranks are sorted), one byte each with an escape (255) to wider values (`datastore.schema`).

Ids (lossless). The gold next token ``input_ids[t + 1]`` is usually in the top-k: a one-byte `gold_rank`
says where, and its id (and logprob) are not stored again. The other ids are coded per shard against a
context table: for each current token ``c = input_ids[t]``, the ids seen after ``c`` at least twice in
the shard's top-k, most frequent first; an id is stored as 1 + its index in its context's list (small
numbers: the top-k of a context repeats), or 0 followed by its rank in the shard vocabulary (ids by
frequency, which also codes `input_ids`) in `id_escapes`. zstd (Parquet) does the entropy coding.

Encoding and decoding are vectorised numpy over a whole shard. `datastore.schema` names the columns.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from datastore.sample import ScoredSample
from datastore.schema import CODEC_KEY, SHARD_SCHEMA, STAT_COLUMNS, STREAM_COLUMNS, TABLE_KEY, TOPK_COLUMNS

CODEC_NAME = "logitfuse-topk-v1"
ESCAPE = 255
MAX_ABS_LOGPROB = float(2**16)  # keeps step_units * q < 2**24: the decoded value is exact in fp32


@dataclass(frozen=True)
class CodecConfig:
    """How shards are encoded. The defaults bound every logprob error by 5/256 = 0.0195 nat (goal: 0.02)."""

    step_units: int = 5  # quantisation step = step_units / 2**step_log2 nat; the bound is half a step
    step_log2: int = 7
    zstd_level: int = 17  # Parquet zstd level of every column (size vs speed in bench/bench_codec.py)

    def __post_init__(self):
        if not (1 <= self.step_units <= 7 and 0 <= self.step_log2 <= 8):
            raise ValueError("step_units must be in [1, 7] and step_log2 in [0, 8]")

    @property
    def step(self) -> float:
        return self.step_units / 2.0**self.step_log2

    @property
    def max_abs_error(self) -> float:
        return self.step / 2

    def describe(self) -> dict:
        return {
            "codec": CODEC_NAME,
            "step_units": self.step_units,
            "step_log2": self.step_log2,
            "logprob_step": self.step,
            "logprob_max_abs_error": self.max_abs_error,
            "rounding": "round-to-nearest on -logprob/step; decoded -q*step exact in fp32; every entry, no floor",
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
    """Raise ValueError when a sample breaks the ScoredSample contract (shapes, order, ranges)."""
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
    for name, ids in (("input_ids", sample.input_ids), ("topk_ids", sample.topk_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
            raise ValueError(f"{sid}: {name} out of range [0, 2**31)")
    lp = np.asarray(sample.topk_logprobs, dtype=np.float32)
    gold = np.asarray(sample.gold_logprob, dtype=np.float32)
    for name, a in (("topk_logprobs", lp), ("gold_logprob", gold)):
        if a.size and not (np.all(np.isfinite(a)) and a.max() <= 0.0 and a.min() >= -MAX_ABS_LOGPROB):
            raise ValueError(f"{sid}: {name} must be finite log-probabilities in [-2**16, 0]")
    if k > 1 and n and np.any(lp[:, 1:] > lp[:, :-1]):
        raise ValueError(f"{sid}: topk_logprobs must be sorted by descending log-probability")
    spans = np.asarray(sample.assistant_spans)
    if spans.size and spans.reshape(-1, 2).shape[1] != 2:
        raise ValueError(f"{sid}: assistant_spans must be [S, 2]")


# ---------------------------------------------------------------- encode


def quantise(logprobs: np.ndarray, units: int, step_log2: int) -> np.ndarray:
    """fp32 logprobs -> int64 ``q = rint(-logprob / step)``, step = units / 2**step_log2."""
    return np.rint(-np.asarray(logprobs, dtype=np.float64) * (1 << step_log2) / units).astype(np.int64)


def dequantise(q: np.ndarray, units: int, step_log2: int) -> np.ndarray:
    """int q -> fp32 ``-q * step``, exact (units * q < 2**24 and the division is by a power of two)."""
    return (-(np.asarray(q, dtype=np.float64) * units) / (1 << step_log2)).astype(np.float32)


def encode_shard(samples: list[ScoredSample], k: int, config: CodecConfig = CodecConfig()) -> bytes:
    """Encode samples (already validated) into one Parquet file's bytes."""
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
    columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for i, s in enumerate(samples):
        columns["sample_id"].append(s.sample_id)
        columns["num_tokens"].append(int(n_tok[i]))
        columns["num_positions"].append(int(n_pos[i]))
        columns["truncated"].append(bool(s.truncated))
        columns["text"].append(s.text)
        columns["assistant_spans"].append(np.asarray(s.assistant_spans, dtype=np.int32).ravel())
        columns["loss_spans"].append(_runs(np.asarray(s.loss_mask)))
        columns["position_spans"].append(_positions_runs(np.asarray(s.positions, dtype=np.int64)))
        for name, (levels, _bounds) in streams.items():
            for suffix, level, b in zip(("", "_u16", "_u32"), levels, cuts[name], strict=True):
                columns[name + suffix].append(level[b[i] : b[i + 1]].tobytes())

    arrays = [pa.array(columns[f.name], type=f.type) for f in SHARD_SCHEMA]
    tbl = pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    # store_schema=False: the Arrow schema copy would repeat the key-value metadata in base64
    with pq.ParquetWriter(
        buf,
        SHARD_SCHEMA,
        compression="zstd",
        compression_level=config.zstd_level,
        use_dictionary=STAT_COLUMNS,
        # lengths apart from the bytes: zstd then sees each stream as one contiguous run
        column_encoding={c: "DELTA_LENGTH_BYTE_ARRAY" for c in STREAM_COLUMNS},
        write_statistics=STAT_COLUMNS,
        store_schema=False,
    ) as writer:
        writer.write_table(tbl, row_group_size=max(1, len(samples)))
        writer.add_key_value_metadata(
            {
                CODEC_KEY: json.dumps(
                    {"codec": CODEC_NAME, "k": k, "step_units": sl[0], "step_log2": sl[1]}
                ).encode(),
                TABLE_KEY: table,
            }
        )
    return buf.getvalue()


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
    """A shard's vocabulary and context table, decoded once per shard."""

    k: int
    step_units: int
    step_log2: int
    vocab: np.ndarray  # int64 token ids, most frequent first
    ctx_keys: np.ndarray  # ascending vocab ranks of contexts
    ctx_starts: np.ndarray  # start of each context's list in pair_ids
    pair_ids: np.ndarray  # token ids

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes]) -> ContextTable:
        if metadata is None or CODEC_KEY not in metadata or TABLE_KEY not in metadata:
            raise ValueError("not a logitfuse logits shard: codec metadata missing")
        codec = json.loads(metadata[CODEC_KEY])
        if codec.get("codec") != CODEC_NAME:
            raise ValueError(f"unknown shard codec {codec.get('codec')!r}, this reader knows {CODEC_NAME!r}")
        t = _unpack_arrays(metadata[TABLE_KEY])
        sizes = t["ctx_sizes"]
        return cls(
            k=int(codec["k"]),
            step_units=int(codec["step_units"]),
            step_log2=int(codec["step_log2"]),
            vocab=t["vocab"],
            ctx_keys=np.cumsum(t["ctx_key_deltas"]),
            ctx_starts=np.cumsum(sizes) - sizes,
            pair_ids=t["vocab"][t["pair_ids"]] if len(t["pair_ids"]) else np.zeros(0, np.int64),
        )


def read_shard_bytes(data: bytes) -> tuple[pa.Table, ContextTable]:
    pf = pq.ParquetFile(pa.BufferReader(data))
    table = pf.read()
    return table, ContextTable.from_metadata(pf.metadata.metadata)


def decode_rows(table: pa.Table, ctx: ContextTable) -> list[ScoredSample]:
    """Decode every row of a shard table (or any slice of one) into ScoredSamples."""
    k, sl = ctx.k, (ctx.step_units, ctx.step_log2)
    n_pos = np.asarray(table.column("num_positions").to_numpy(), dtype=np.int64)
    n_tok = np.asarray(table.column("num_tokens").to_numpy(), dtype=np.int64)
    n = int(n_pos.sum())

    def stream(name: str) -> np.ndarray:
        return _unescape(
            _flat_binary(table.column(name)),
            _flat_binary(table.column(name + "_u16")).view("<u2"),
            _flat_binary(table.column(name + "_u32")).view("<u4"),
        )

    input_ranks = stream("input_ids")
    if len(input_ranks) != n_tok.sum():
        raise ValueError(f"corrupt shard: {len(input_ranks)} input ids, expected {int(n_tok.sum())}")
    input_ids = ctx.vocab[input_ranks] if len(input_ranks) else np.zeros(0, np.int64)
    tok_start = np.cumsum(n_tok) - n_tok

    # positions from their runs
    span_lens = _list_lengths(table.column("position_spans"))
    spans = _flat_list(table.column("position_spans"), np.int64)
    pos_rows = np.split(spans, np.cumsum(span_lens)[:-1]) if len(span_lens) else []
    positions = [_expand_runs(r) for r in pos_rows]
    if any(len(p) != c for p, c in zip(positions, n_pos, strict=True)):
        raise ValueError("corrupt shard: position spans disagree with num_positions")
    pos = np.concatenate(positions + [np.zeros(0, np.int32)]).astype(np.int64)
    pos_abs = pos + np.repeat(tok_start, n_pos)

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
        cur_rank = input_ranks[np.repeat(pos_abs, k).reshape(n, k)[keep]]
        ci = np.minimum(np.searchsorted(ctx.ctx_keys, cur_rank), max(len(ctx.ctx_keys) - 1, 0))
        escaped = codes == 0
        ids = np.empty(len(codes), dtype=np.int64)
        ids[~escaped] = ctx.pair_ids[ctx.ctx_starts[ci[~escaped]] + codes[~escaped] - 1]
        esc_ranks = stream("id_escapes")
        if len(esc_ranks) != int(escaped.sum()):
            raise ValueError("corrupt shard: id_escapes length disagrees with id_codes")
        ids[escaped] = ctx.vocab[esc_ranks]
        topk_ids[keep] = ids
    topk_ids[hit_rows, rank[hit_rows]] = input_ids[pos_abs[hit_rows] + 1]

    topk_ids32 = topk_ids.astype(np.int32)
    ids32 = input_ids.astype(np.int32)
    mask_lens = _list_lengths(table.column("loss_spans"))
    mask_runs = np.split(_flat_list(table.column("loss_spans"), np.int64), np.cumsum(mask_lens)[:-1])
    span_lens = _list_lengths(table.column("assistant_spans"))
    a_spans = np.split(_flat_list(table.column("assistant_spans"), np.int32), np.cumsum(span_lens)[:-1])
    sample_ids = table.column("sample_id").to_pylist()
    texts = table.column("text").to_pylist()
    truncated = table.column("truncated").to_pylist()

    out = []
    p0 = 0
    for i in range(table.num_rows):
        t0, t1, p1 = tok_start[i], tok_start[i] + n_tok[i], p0 + n_pos[i]
        mask = np.zeros(n_tok[i], dtype=bool)
        mask[_expand_runs(mask_runs[i])] = True
        out.append(
            ScoredSample(
                sample_id=sample_ids[i],
                input_ids=ids32[t0:t1],
                loss_mask=mask,
                positions=positions[i].astype(np.int32),
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


def topk_bytes(data: bytes) -> int:
    """Compressed bytes of a shard's top-k part: its top-k columns plus its context table."""
    md = pq.ParquetFile(pa.BufferReader(data)).metadata
    total = len(md.metadata.get(TABLE_KEY, b""))
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for j in range(group.num_columns):
            if group.column(j).path_in_schema in TOPK_COLUMNS:
                total += group.column(j).total_compressed_size
    return total
