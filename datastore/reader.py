"""`LogitsReader`: reads a logits dataset back as `ScoredSample`s (int32 ids, float32 logprobs, bool mask).

The reader opens one version of the dataset (the newest, or `version=` for time travel on a Delta
dataset); only the shards that version's log lists exist for it. No shard is returned or scanned before
its bytes were checked against the log's sha256 (`datastore.shards.read_verified`). Datasets still in the
0.1 layout (``manifest.json``) are read the same way, from their manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from datastore import codec, fs
from datastore.errors import UserError
from datastore.manifest import Manifest, ShardInfo
from datastore.sample import ScoredSample
from datastore.shards import ShardLocator, ensure_verified, load_manifest, read_verified
from datastore.writer import manifest_from_snapshot


def parse_legacy_manifest(data: bytes) -> Manifest:
    """A 0.1 logits ``manifest.json``. Raises UserError when it is a targets manifest, ValueError when
    it does not parse."""
    try:
        fmt = json.loads(data).get("format", "")
    except (ValueError, AttributeError):
        raise ValueError("not JSON") from None
    if isinstance(fmt, str) and fmt.startswith("logitfuse.targets/"):
        raise UserError("a targets dataset, not a logits dataset")
    return Manifest.model_validate_json(data)


def load_logits_manifest(uri: str) -> Manifest:
    """The `Manifest` of the logits dataset at `uri` (Delta log, or 0.1 manifest.json). Raises UserError
    (one line) when nothing is there or the log/manifest is corrupt."""
    return load_manifest(uri, manifest_from_snapshot, parse_legacy_manifest, "logits")


class LogitsReader:
    """Read a logits dataset at `uri` (``STORE/logits/<logits_id>``).

    Raises:
        UserError: no dataset there, another kind of dataset, or a corrupt log or manifest.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._fs, self._root = fs.resolve(uri)
        self.manifest = load_logits_manifest(uri)
        self._locator = ShardLocator(self._fs, self._root, self.manifest.shards)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def tokenizer(self):
        """The teacher's tokenizer, stored with the dataset at extraction (`datastore.fs.save_tokenizer`),
        each file checked against the sha256 the log recorded."""
        return fs.load_tokenizer(self.uri)

    def shard_path(self, shard: ShardInfo) -> str:
        return fs.join(self._root, shard.file)

    def read_shard(self, shard: ShardInfo, rows: list[int] | None = None) -> list[ScoredSample]:
        """Decode one shard (or only some of its rows), after checking its checksum (ValueError)."""
        table, ctx = codec.read_shard_bytes(read_verified(self._fs, self._root, shard))
        if rows is not None:
            table = table.take(np.asarray(rows, dtype=np.int64))
        return codec.decode_rows(table, ctx)

    def iter_samples(self) -> Iterator[ScoredSample]:
        """Every sample, in commit order (one shard decoded at a time)."""
        for shard in self.manifest.shards:
            yield from self.read_shard(shard)

    def iter_batches(self, batch_size: int) -> Iterator[list[ScoredSample]]:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        batch: list[ScoredSample] = []
        for sample in self.iter_samples():
            batch.append(sample)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def get(self, sample_id: str) -> ScoredSample:
        """One sample by id: `datastore.shards.ShardLocator` opens only the shard that holds it (Bloom
        filters in the log); then only that row is decoded. Raises KeyError when absent."""
        found = self._locator.locate(sample_id)
        if found is None:
            raise KeyError(sample_id)
        i, row = found
        return self.read_shard(self.manifest.shards[i], rows=[row])[0]

    @property
    def shards_indexed(self) -> int:
        return self._locator.shards_indexed

    def scan(self):
        """A polars LazyFrame over the version's shards' physical columns (`datastore.schema`): useful ones
        are sample_id, num_tokens, num_positions, truncated, text; the byte streams need `datastore.codec`.
        Every shard is verified against its sha256 first (once per process). Raises ValueError naming a
        corrupt shard."""
        import polars as pl
        import pyarrow.dataset as ds

        from datastore.schema import SHARD_SCHEMA

        ensure_verified(self._fs, self._root, self.manifest.shards)
        paths = [self.shard_path(s) for s in self.manifest.shards]
        if not paths:
            return pl.LazyFrame(schema=pl.from_arrow(SHARD_SCHEMA.empty_table()).schema)
        return pl.scan_pyarrow_dataset(
            ds.dataset(paths, schema=SHARD_SCHEMA, filesystem=self._fs, format="parquet")
        )
