"""`LogitsReader`: reads a logits dataset back as `ScoredSample`s (int32 ids, float32 logprobs, bool mask).

Only the shards listed in `manifest.json` exist for the reader. Every shard read is checked against the
manifest's sha256 before it is decoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from datastore import codec, fs
from datastore.errors import UserError
from datastore.manifest import Manifest, ShardInfo
from datastore.sample import ScoredSample
from datastore.shards import ShardLocator


class LogitsReader:
    def __init__(self, uri: str):
        self.uri = uri
        self._fs, self._root = fs.resolve(uri)
        path = fs.join(self._root, fs.MANIFEST)
        if not fs.exists(self._fs, path):
            raise UserError(
                f"no logits dataset at {uri} (no {fs.MANIFEST}): expected STORE/logits/<logits_id>"
            )
        self.manifest = Manifest.model_validate_json(fs.read_bytes(self._fs, path))
        self._locator = ShardLocator(self._fs, self._root, self.manifest.shards)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def tokenizer(self):
        """The teacher's tokenizer, stored with the dataset at extraction (`datastore.fs.save_tokenizer`)."""
        return fs.load_tokenizer(self.uri)

    def shard_path(self, shard: ShardInfo) -> str:
        return fs.join(self._root, shard.file)

    def read_shard(self, shard: ShardInfo, rows: list[int] | None = None) -> list[ScoredSample]:
        """Decode one shard (or only some of its rows), after checking its checksum."""
        data = fs.read_bytes(self._fs, self.shard_path(shard))
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise ValueError(f"{self.uri}/{shard.file}: sha256 does not match the manifest (corrupt shard)")
        table, ctx = codec.read_shard_bytes(data)
        if rows is not None:
            table = table.take(np.asarray(rows, dtype=np.int64))
        return codec.decode_rows(table, ctx)

    def iter_samples(self) -> Iterator[ScoredSample]:
        """Every sample, in write order (one shard decoded at a time)."""
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
        filters in the manifest); then only that row is decoded. Raises KeyError when absent."""
        found = self._locator.locate(sample_id)
        if found is None:
            raise KeyError(sample_id)
        i, row = found
        return self.read_shard(self.manifest.shards[i], rows=[row])[0]

    @property
    def shards_indexed(self) -> int:
        return self._locator.shards_indexed

    def scan(self):
        """A polars LazyFrame over the listed shards' physical columns (`datastore.schema`): useful ones
        are sample_id, num_tokens, num_positions, truncated, text; the byte streams need `datastore.codec`."""
        import polars as pl
        import pyarrow.dataset as ds

        from datastore.schema import SHARD_SCHEMA

        paths = [self.shard_path(s) for s in self.manifest.shards]
        if not paths:
            return pl.LazyFrame(schema=pl.from_arrow(SHARD_SCHEMA.empty_table()).schema)
        return pl.scan_pyarrow_dataset(
            ds.dataset(paths, schema=SHARD_SCHEMA, filesystem=self._fs, format="parquet")
        )
