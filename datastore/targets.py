"""Targets datasets: fused training targets in the pivot's token space, what `fusion` writes and `trainer`
reads. This module owns their logical record (`TargetSample`), identity (`TargetsMeta`), manifest, the one
physical schema (`TARGETS_SCHEMA`), the writer and the reader.

Layout: a Delta Lake table (`datastore.table`: ``_delta_log/`` + content-addressed zstd Parquet shards
``shard-<sha256>.parquet``), conventionally at ``STORE/targets/<targets_id>`` (`targets_uri`), on a local
directory or S3 (`datastore.fs`). Targets datasets written by 0.1 (``manifest.json``) stay readable.

Physical encoding, one row per sample (chosen so the trainer turns a shard into tensors with a handful of
vectorised numpy calls, no per-token Python):

- `input_ids`, `positions`: ``list<int32>``; `loss_mask`: ``list<bool>`` (bit-packed by Parquet).
- `topk_ids`: ``list<int32>``, the ``[N, K]`` matrix flattened row-major (``-1`` = padding). Lossless.
- `topk_probs`: ``list<uint16>``, flattened like the ids, ``q = floor(p * 65535)``; decoded as
  ``q / 65535`` in float32. Precision: every decoded probability ``p'`` satisfies
  ``p - 1/65535 < p' <= p`` (absolute error below 1.53e-5, never rounded up), so a row that summed to
  <= 1 still does (up to float32 rounding of the decode) and a row loses at most ``K / 65535`` of mass.
  Inputs are accepted up to a row sum of ``1 + 1e-3`` (float32 softmax noise) and clipped to 1 first.
- `winner`: string; `ce`: ``map<string, float64>`` (per-candidate cross-entropy the fusion saw).
- `num_tokens`, `num_positions`: int32 lengths, so counts never need a decode.

Crash safety mirrors `datastore.writer`: a shard is written whole before the commit that adds it; a
reopened writer skips `done_ids`, so every committed sample is there exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from datastore import fs
from datastore.errors import UserError
from datastore.manifest import ShardedManifest, ShardInfo, snapshot_fields
from datastore.shards import ShardedWriter, ShardLocator, load_manifest, read_verified
from datastore.table import Snapshot

FORMAT = "logitfuse.targets/1"
KIND = "targets"
TARGETS_DIR = "targets"
PROB_SCALE = 65535
MAX_ROW_SUM = 1.0 + 1e-3
ZSTD_LEVEL = 3  # reading speed barely depends on the level; writing at 3 keeps fusion fast

TARGETS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_positions", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("positions", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_probs", pa.list_(pa.uint16()), nullable=False),
        pa.field("winner", pa.string(), nullable=False),
        pa.field("ce", pa.map_(pa.string(), pa.float64()), nullable=False),
    ]
)
TOPK_COLUMNS = ("topk_ids", "topk_probs")
ENCODING = {
    "format": FORMAT,
    "topk_ids": "int32, lossless, -1 = padding",
    "topk_probs": f"uint16 q = floor(p * {PROB_SCALE}); p' = q / {PROB_SCALE}; p - 1/{PROB_SCALE} < p' <= p",
    "prob_max_abs_error": 1.0 / PROB_SCALE,
    "compression": f"parquet zstd level {ZSTD_LEVEL}",
}



# ---------------------------------------------------------------- logical record and identity


@dataclass
class TargetSample:
    """Fused top-k targets of one sample, in pivot token space.

    Attributes:
        sample_id: the dataset's key.
        input_ids: int32 ``[T]`` pivot tokens.
        loss_mask: bool ``[T]``; True where token ``t`` is a trained response token.
        positions: int32 ``[N]``, strictly ascending, ``0 <= t < T - 1``: position ``t``'s distribution
            predicts token ``t + 1``.
        topk_ids: int32 ``[N, K]`` pivot ids, ``-1`` = padding.
        topk_probs: float32 ``[N, K]``; 0 where padding; each row sums to <= 1 (the rest is the mass
            outside the top-k).
        winner: which candidate the fusion picked (MinCE), or "".
        ce: cross-entropy of each candidate on the gold response, by name.
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    topk_ids: np.ndarray
    topk_probs: np.ndarray
    winner: str = ""
    ce: dict[str, float] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class TargetsMeta(BaseModel):
    """Identity of a targets dataset (hashed into its id): which pivot, sources and fusion made it.

    `pivot_tokenizer` (the pivot logits' tokenizer fingerprint, `datastore.tokenizers.tokenizer_fingerprint`)
    and `pivot_vocab_size` (``len(tokenizer)``) say which model the targets can train: the trainer refuses
    any other. Empty / 0 in datasets written before they were recorded (nothing to check against).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pivot: str
    sources: list[str]
    align: str
    vocab_map: str
    fusion: str
    k: int = Field(ge=1, le=1024)
    extra: dict = Field(default_factory=dict)
    pivot_tokenizer: str = ""
    pivot_vocab_size: int = Field(0, ge=0)


def targets_id(meta: TargetsMeta) -> str:
    """Stable 16-hex id: sha256 of the canonical JSON (sorted keys, no spaces) of the meta."""
    canonical = json.dumps(meta.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def targets_uri(store_uri: str, tid: str) -> str:
    """Where the targets dataset with this id lives in a store."""
    return fs.join(store_uri, TARGETS_DIR, tid)


class TargetsManifest(ShardedManifest):
    """`manifest.json` of a targets dataset: the only source of truth for which shards exist."""

    format: str = FORMAT
    targets_id: str
    meta: TargetsMeta
    encoding: dict = Field(default_factory=lambda: dict(ENCODING))


def is_targets_manifest(data: bytes) -> bool:
    """True when a manifest.json's bytes are a targets manifest (not a logits one)."""
    try:
        return json.loads(data).get("format", "").startswith("logitfuse.targets/")
    except (ValueError, AttributeError):
        return False


def parse_legacy_manifest(data: bytes) -> TargetsManifest:
    """A 0.1 targets ``manifest.json``. Raises UserError when it is another kind, ValueError when it
    does not parse."""
    if not is_targets_manifest(data):
        try:
            json.loads(data)
        except ValueError:
            raise ValueError("not JSON") from None
        raise UserError("not a targets dataset (its manifest has another format)")
    return TargetsManifest.model_validate_json(data)


def manifest_from_snapshot(snap: Snapshot) -> TargetsManifest:
    """The `TargetsManifest` view of a targets table snapshot (`datastore.table`)."""
    common = snapshot_fields(snap, KIND)
    info = snap.info
    return TargetsManifest(**common, targets_id=info["id"], meta=TargetsMeta.model_validate(info["meta"]))


def load_targets_manifest(uri: str) -> TargetsManifest:
    """The manifest of the targets dataset at `uri` (Delta log or 0.1 manifest.json); UserError when
    nothing is there, another kind is, or the log/manifest is corrupt."""
    return load_manifest(uri, manifest_from_snapshot, parse_legacy_manifest, "targets")


def list_targets(store_uri: str) -> list[TargetsManifest]:
    """Manifests of every readable targets dataset in a store (``STORE/targets/*``); see
    `datastore.catalog` for the listing that reports broken datasets too."""
    from datastore.catalog import catalog

    return [e["manifest"] for e in catalog(store_uri, kind="targets", with_manifest=True, missing_ok=True)
            if "manifest" in e]


# ---------------------------------------------------------------- validation and encoding


def validate(sample: TargetSample, k: int) -> TargetSample:
    """Check a sample's shapes and values; returns it with canonical dtypes. Raises UserError."""
    sid = sample.sample_id
    if not isinstance(sid, str) or not sid:
        raise UserError(f"sample_id must be a non-empty string, got {sid!r}")

    def arr(name, dtype, ndim):
        a = np.asarray(getattr(sample, name))
        if a.ndim != ndim:
            raise UserError(f"sample {sid!r}: {name} must be {ndim}-D, got shape {a.shape}")
        if dtype is np.bool_:
            if a.dtype != np.bool_:
                raise UserError(f"sample {sid!r}: {name} must be bool, got {a.dtype}")
        elif dtype is np.int32:
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise UserError(f"sample {sid!r}: {name} must be integers, got {a.dtype}")
        return a.astype(dtype, copy=False)

    input_ids = arr("input_ids", np.int32, 1)
    loss_mask = arr("loss_mask", np.bool_, 1)
    positions = arr("positions", np.int32, 1)
    topk_ids = arr("topk_ids", np.int32, 2)
    probs = np.asarray(sample.topk_probs)
    if probs.ndim != 2:
        raise UserError(f"sample {sid!r}: topk_probs must be 2-D, got shape {probs.shape}")
    T, N = len(input_ids), len(positions)
    if T < 1:
        raise UserError(f"sample {sid!r}: input_ids is empty")
    if np.any(input_ids < 0):
        raise UserError(f"sample {sid!r}: input_ids has negative ids")
    if loss_mask.shape != (T,):
        raise UserError(f"sample {sid!r}: loss_mask has {len(loss_mask)} entries for {T} tokens")
    if N and (positions[0] < 0 or positions[-1] >= T - 1 or np.any(np.diff(positions) <= 0)):
        raise UserError(f"sample {sid!r}: positions must be strictly ascending in [0, {T - 1})")
    if topk_ids.shape != (N, k) or probs.shape != (N, k):
        raise UserError(
            f"sample {sid!r}: topk_ids {topk_ids.shape} and topk_probs {probs.shape} must both be "
            f"[{N} positions, k={k}]"
        )
    probs = probs.astype(np.float32, copy=False)
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise UserError(f"sample {sid!r}: topk_probs must be finite and >= 0")
    if np.any(topk_ids < -1):
        raise UserError(f"sample {sid!r}: topk_ids must be >= 0, or -1 for padding")
    if np.any(probs[topk_ids == -1] != 0):
        raise UserError(f"sample {sid!r}: padding entries (id -1) must have probability 0")
    if N and float(probs.sum(axis=1, dtype=np.float64).max()) > MAX_ROW_SUM:
        raise UserError(f"sample {sid!r}: a row of topk_probs sums to more than 1")
    if not isinstance(sample.winner, str):
        raise UserError(f"sample {sid!r}: winner must be a string")
    ce = {str(name): float(v) for name, v in dict(sample.ce).items()}
    return TargetSample(sid, input_ids, loss_mask, positions, topk_ids, probs, sample.winner, ce)


def quantise_probs(probs: np.ndarray) -> np.ndarray:
    """float ``[N, K]`` -> uint16 ``floor(p * 65535)``, rows clipped so the codes sum to <= 65535."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    q = np.floor(p * PROB_SCALE).astype(np.int64)
    excess = q.sum(axis=1) - PROB_SCALE
    for row in np.nonzero(excess > 0)[0]:  # only float noise above 1 gets here (validate caps it)
        q[row, int(np.argmax(q[row]))] -= int(excess[row])
    return q.astype(np.uint16)


def dequantise_probs(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * np.float32(1.0 / PROB_SCALE)


def _list_array(values: list[np.ndarray], pa_type: pa.DataType, np_type) -> pa.ListArray:
    lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(values).astype(np_type, copy=False) if values else np.zeros(0, np_type)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa_type))


def encode_shard(samples: list[TargetSample]) -> bytes:
    """Validated samples -> one zstd Parquet shard's bytes (`TARGETS_SCHEMA`)."""
    cols = {
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "num_tokens": pa.array([len(s.input_ids) for s in samples], pa.int32()),
        "num_positions": pa.array([len(s.positions) for s in samples], pa.int32()),
        "input_ids": _list_array([s.input_ids for s in samples], pa.int32(), np.int32),
        "loss_mask": _list_array([s.loss_mask for s in samples], pa.bool_(), np.bool_),
        "positions": _list_array([s.positions for s in samples], pa.int32(), np.int32),
        "topk_ids": _list_array([s.topk_ids.reshape(-1) for s in samples], pa.int32(), np.int32),
        "topk_probs": _list_array(
            [quantise_probs(s.topk_probs).reshape(-1) for s in samples], pa.uint16(), np.uint16
        ),
        "winner": pa.array([s.winner for s in samples], pa.string()),
        "ce": pa.array([list(s.ce.items()) for s in samples], pa.map_(pa.string(), pa.float64())),
    }
    table = pa.Table.from_pydict(cols, schema=TARGETS_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=["sample_id", "winner"],
        write_statistics=["sample_id", "num_tokens", "num_positions"],
    )
    return buf.getvalue()


# ---------------------------------------------------------------- columnar shard access


@dataclass
class ShardArrays:
    """One decoded shard as flat arrays (what the trainer's data path consumes; no per-sample objects).

    Sample ``i``'s tokens are ``input_ids[tok_offsets[i]:tok_offsets[i+1]]`` (same for `loss_mask`); its
    target rows are ``positions/topk_ids/topk_probs[pos_offsets[i]:pos_offsets[i+1]]``.
    """

    sample_ids: list[str]
    tok_offsets: np.ndarray  # int64 [R + 1]
    input_ids: np.ndarray  # int32 [sum T]
    loss_mask: np.ndarray  # bool [sum T]
    pos_offsets: np.ndarray  # int64 [R + 1]
    positions: np.ndarray  # int32 [sum N]
    topk_ids: np.ndarray  # int32 [sum N, K]
    topk_probs: np.ndarray  # float32 [sum N, K]
    winner: list[str] | None = None
    ce: list[dict[str, float]] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def sample(self, i: int) -> TargetSample:
        t0, t1 = int(self.tok_offsets[i]), int(self.tok_offsets[i + 1])
        p0, p1 = int(self.pos_offsets[i]), int(self.pos_offsets[i + 1])
        return TargetSample(
            self.sample_ids[i],
            self.input_ids[t0:t1].copy(),
            self.loss_mask[t0:t1].copy(),
            self.positions[p0:p1].copy(),
            self.topk_ids[p0:p1].copy(),
            self.topk_probs[p0:p1].copy(),
            self.winner[i] if self.winner is not None else "",
            dict(self.ce[i]) if self.ce is not None else {},
        )


def _flat(column: pa.ChunkedArray, np_type) -> tuple[np.ndarray, np.ndarray]:
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    if offsets[0]:
        values = values[offsets[0] :]
        offsets = offsets - offsets[0]
    return offsets, np.asarray(values[: offsets[-1]], dtype=np_type)


def decode_shard(data: bytes, k: int, with_extras: bool = True) -> ShardArrays:
    """A shard's bytes -> `ShardArrays`. ``with_extras=False`` skips `winner`/`ce` (the trainer's path)."""
    columns = [f.name for f in TARGETS_SCHEMA if with_extras or f.name not in ("winner", "ce")]
    table = pq.read_table(pa.BufferReader(data), columns=columns)
    tok_offsets, input_ids = _flat(table.column("input_ids"), np.int32)
    _, loss_mask = _flat(table.column("loss_mask"), np.bool_)
    pos_offsets, positions = _flat(table.column("positions"), np.int32)
    _, ids = _flat(table.column("topk_ids"), np.int32)
    _, codes = _flat(table.column("topk_probs"), np.uint16)
    winner = ce = None
    if with_extras:
        winner = table.column("winner").to_pylist()
        ce = [dict(items) for items in table.column("ce").to_pylist()]
    return ShardArrays(
        sample_ids=table.column("sample_id").to_pylist(),
        tok_offsets=tok_offsets,
        input_ids=input_ids,
        loss_mask=loss_mask,
        pos_offsets=pos_offsets,
        positions=positions,
        topk_ids=ids.reshape(-1, k),
        topk_probs=dequantise_probs(codes).reshape(-1, k),
        winner=winner,
        ce=ce,
    )


# ---------------------------------------------------------------- writer


class TargetsWriter(ShardedWriter):
    """Write a targets dataset at `uri` (a dataset directory, e.g. `targets_uri(store, targets_id(meta))`).
    Re-opening an existing dataset resumes it: skip `done_ids`, write the rest (`datastore.shards`)."""

    kind = "targets dataset"
    schema = TARGETS_SCHEMA

    def __init__(self, uri: str, meta: TargetsMeta, shard_rows: int = 512, *, team: str | None = None):
        super().__init__(uri, meta, shard_rows, team=team)

    def _info(self) -> dict:
        return {"kind": KIND, "id": targets_id(self.meta), "meta": self.meta.model_dump(mode="json"),
                "encoding": dict(ENCODING)}

    def _manifest_from_snapshot(self, snap: Snapshot) -> TargetsManifest:
        return manifest_from_snapshot(snap)

    def _validate(self, sample: TargetSample) -> TargetSample:
        return validate(sample, self.meta.k)

    def _encode(self, samples: list[TargetSample]) -> bytes:
        return encode_shard(samples)

    def _topk_bytes(self, data: bytes) -> int:
        return _topk_bytes(data)


def _topk_bytes(data: bytes) -> int:
    md = pq.ParquetFile(pa.BufferReader(data)).metadata
    total = 0
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            if col.path_in_schema.split(".")[0] in TOPK_COLUMNS:
                total += col.total_compressed_size
    return total


# ---------------------------------------------------------------- reader


class TargetsReader:
    """Read a targets dataset (Delta table, or 0.1 manifest.json). Only shards the log lists exist; each
    is checked against its sha256 before it is decoded. Raises UserError when `uri` holds no targets
    dataset or its log is corrupt."""

    def __init__(self, uri: str):
        self.uri = uri
        self._fs, self._root = fs.resolve(uri)
        self.manifest = load_targets_manifest(uri)
        self._locator = ShardLocator(self._fs, self._root, self.manifest.shards)

    @property
    def k(self) -> int:
        return self.manifest.meta.k

    def __len__(self) -> int:
        return self.manifest.num_samples

    def shard_path(self, shard: ShardInfo) -> str:
        return fs.join(self._root, shard.file)

    def read_shard_bytes(self, shard: ShardInfo) -> bytes:
        """A shard's bytes after checking them against the log's sha256 (ValueError when they differ)."""
        return read_verified(self._fs, self._root, shard)

    def read_shard(self, shard: ShardInfo | int, with_extras: bool = True) -> ShardArrays:
        """One shard (a `ShardInfo` or its index in the manifest) as flat arrays (`ShardArrays`)."""
        if isinstance(shard, int):
            shard = self.manifest.shards[shard]
        return decode_shard(self.read_shard_bytes(shard), self.k, with_extras=with_extras)

    def iter_samples(self) -> Iterator[TargetSample]:
        """Every sample, in write order (one shard decoded at a time)."""
        for shard in self.manifest.shards:
            arrays = self.read_shard(shard)
            for i in range(len(arrays)):
                yield arrays.sample(i)

    def get(self, sample_id: str) -> TargetSample:
        """One sample by id; only the shard that holds it is opened (`datastore.shards.ShardLocator`)."""
        found = self._locator.locate(sample_id)
        if found is None:
            raise KeyError(sample_id)
        i, row = found
        return self.read_shard(i).sample(row)
