"""The physical schema of a logits shard, declared once: writers and readers use `SHARD_SCHEMA` (v1: `SHARD_SCHEMA_V1`).

One row per sample. The logical columns of docs/contract.md ("Stored logits") map to physical ones so:

- `sample_id`, `text`, `truncated`: as they are.
- `assistant_spans`: flat ``[s0, e0, s1, e1, ...]`` character spans.
- `loss_spans`: flat ``[start, end)`` runs where `loss_mask` is True (a mask is mostly a few runs).
- `position_spans`: flat ``[start, end)`` runs of consecutive scored positions.
- `num_tokens`, `num_positions`: lengths, so counts never need a decode (and `scan()` can sum them).
- `input_ids`: a byte stream (`datastore.codec` owns its meaning) of three binary columns: ``NAME`` one
  byte per value (255 = escape), ``NAME_u16`` one little-endian uint16 of ``value - 255`` per escape
  (65535 = escape again), ``NAME_u32`` one little-endian uint32 of ``value - 255 - 65535`` per second
  escape; each token's rank in the shard vocabulary (token ids, most frequent first).

Encodings v3 and v2 (`SHARD_SCHEMA`): the top-k of all rows are one rANS stream in the Parquet key-value metadata
under `TOPK_KEY`; the shard's vocabulary, context table and class models under `TABLE_KEY`, the codec
parameters under `CODEC_KEY` (`datastore.codec` describes the symbols).

Encoding v1 (`SHARD_SCHEMA_V1`, read only, and written on when a v1 dataset is resumed) has the same
columns plus the top-k as byte streams like `input_ids`:

  - `lp_top1`, `lp_delta`: quantised ``-logprob / step`` of the top-1, then the non-negative
    differences between consecutive ranks.
  - `gold_rank`: the rank of the gold next token in the top-k (its id is then not stored again, and its
    logprob is the top-k one), or k when the gold logprob is in `gold_extra` (zigzag distance in steps
    below the last rank's).
  - `id_codes`: the remaining top-k ids, each as 1 + its index in the shard's candidate list for the
    current token ``input_ids[t]`` (the context table), or 0 when the id is in `id_escapes` as its
    shard vocabulary rank.
"""

from __future__ import annotations

import pyarrow as pa

CODEC_KEY = b"logitfuse.codec"
TABLE_KEY = b"logitfuse.context_table"
TOPK_KEY = b"logitfuse.topk"

STREAMS = ("input_ids", "lp_top1", "lp_delta", "gold_rank", "gold_extra", "id_codes", "id_escapes")
TOPK_STREAMS = ("lp_top1", "lp_delta", "gold_rank", "gold_extra", "id_codes", "id_escapes")

_SPANS = pa.list_(pa.int32())


def _stream(name: str) -> list[pa.Field]:
    return [
        pa.field(name, pa.binary(), nullable=False),
        pa.field(name + "_u16", pa.binary(), nullable=False),
        pa.field(name + "_u32", pa.binary(), nullable=False),
    ]


_COMMON = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("num_tokens", pa.int32(), nullable=False),
    pa.field("num_positions", pa.int32(), nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("assistant_spans", _SPANS, nullable=False),
    pa.field("loss_spans", _SPANS, nullable=False),
    pa.field("position_spans", _SPANS, nullable=False),
    *_stream("input_ids"),
]

# v3 and v2 (`logitfuse-topk-v3`, written today; `-v2`): the rows carry the sample; the top-k are one rANS stream per
# shard in the key-value metadata (`TOPK_KEY`), their models and context table under `TABLE_KEY`.
SHARD_SCHEMA = pa.schema(_COMMON)

# v1 (`logitfuse-topk-v1`, read only): every top-k stream a per-row byte column, entropy-coded by zstd.
SHARD_SCHEMA_V1 = pa.schema(_COMMON + [f for s in STREAMS[1:] for f in _stream(s)])

STREAM_COLUMNS = tuple(c for s in STREAMS for c in (s, s + "_u16", s + "_u32"))  # v1
V2_STREAM_COLUMNS = ("input_ids", "input_ids_u16", "input_ids_u32")

# v1 columns whose bytes are the top-k distributions (the rest is the sample itself: tokens, text, masks).
TOPK_COLUMNS = tuple(c for s in TOPK_STREAMS for c in (s, s + "_u16", s + "_u32"))

# Small columns worth Parquet statistics and dictionary pages; the byte streams are not.
STAT_COLUMNS = ["sample_id", "num_tokens", "num_positions", "truncated"]
