"""The physical schema of a logits shard, declared once: every writer and reader uses `SHARD_SCHEMA`.

One row per sample. The logical columns of DESIGN.md ("Stored logits") map to physical ones so:

- `sample_id`, `text`, `truncated`: as they are.
- `assistant_spans`: flat ``[s0, e0, s1, e1, ...]`` character spans.
- `loss_spans`: flat ``[start, end)`` runs where `loss_mask` is True (a mask is mostly a few runs).
- `position_spans`: flat ``[start, end)`` runs of consecutive scored positions.
- `num_tokens`, `num_positions`: lengths, so counts never need a decode (and `scan()` can sum them).
- `input_ids`: one byte per token, the token's rank in the shard vocabulary (ids by frequency), 255 =
  escape to `input_ids_overflow` (rank - 255).
- `lp_top1`, `lp_delta`: quantised ``-logprob / step`` of the top-1, then the non-negative differences
  between consecutive ranks, one byte each with the same 255 escape.
- `gold_rank`: one byte per position, the rank of the gold next token in the top-k (its id is then not
  stored again, and its logprob is the top-k one), or k when the gold logprob is stored in `gold_extra`
  (zigzag distance in steps below the last rank's, same escape).
- `id_codes`: the remaining top-k ids, each as its index in the shard's candidate list for the current
  token ``input_ids[t]`` (the context table, in the file's key-value metadata), 255 escape as above.

The shard's context table and codec parameters live in the Parquet key-value metadata under
`TABLE_KEY` and `CODEC_KEY`; `datastore.codec` owns the byte layout of both.
"""

from __future__ import annotations

import pyarrow as pa

CODEC_KEY = b"logitfuse.codec"
TABLE_KEY = b"logitfuse.context_table"

_SPANS = pa.list_(pa.int32())
_OVERFLOW = pa.list_(pa.uint32())

SHARD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_positions", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("assistant_spans", _SPANS, nullable=False),
        pa.field("loss_spans", _SPANS, nullable=False),
        pa.field("position_spans", _SPANS, nullable=False),
        pa.field("input_ids", pa.binary(), nullable=False),
        pa.field("input_ids_overflow", _OVERFLOW, nullable=False),
        pa.field("lp_top1", pa.binary(), nullable=False),
        pa.field("lp_top1_overflow", _OVERFLOW, nullable=False),
        pa.field("lp_delta", pa.binary(), nullable=False),
        pa.field("lp_delta_overflow", _OVERFLOW, nullable=False),
        pa.field("gold_rank", pa.binary(), nullable=False),
        pa.field("gold_extra", pa.binary(), nullable=False),
        pa.field("gold_extra_overflow", _OVERFLOW, nullable=False),
        pa.field("id_codes", pa.binary(), nullable=False),
        pa.field("id_codes_overflow", _OVERFLOW, nullable=False),
    ]
)

# Columns whose bytes are the top-k distributions (the rest is the sample itself: tokens, text, masks).
TOPK_COLUMNS = (
    "lp_top1",
    "lp_top1_overflow",
    "lp_delta",
    "lp_delta_overflow",
    "gold_rank",
    "gold_extra",
    "gold_extra_overflow",
    "id_codes",
    "id_codes_overflow",
)

OVERFLOW_COLUMNS = [n for n in SHARD_SCHEMA.names if n.endswith("_overflow")]

# Small columns worth Parquet statistics and dictionary pages; the byte streams are not.
STAT_COLUMNS = ["sample_id", "num_tokens", "num_positions", "truncated"]
