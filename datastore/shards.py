"""What every sharded dataset of the store shares (logits and targets): the manifest's shard bookkeeping
and the resumable, crash-safe writer. The two dataset kinds differ only in their record, identity and
shard encoding, which their modules (`datastore.manifest` + `datastore.writer`, `datastore.targets`)
supply through the hooks below.

Crash safety: a shard is written whole (`datastore.fs.write_atomic`) before the manifest that lists it;
the manifest is rewritten atomically after each shard. A crash between the two leaves an orphan shard
that readers never see and that the next writer deletes, so every committed sample is there exactly once
and the samples of the lost buffer are simply not in `done_ids`.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from typing import Any

import pyarrow.parquet as pq
from pydantic import BaseModel

from datastore import fs
from datastore.errors import UserError
from datastore.manifest import ShardedManifest, ShardInfo, bloom_admits, id_bloom, meta_differences, now

SHARD_RE = re.compile(r"^shard-(\d{6})\.parquet$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


class ShardedWriter(ABC):
    """Appends samples to a dataset directory at `uri`, one atomic shard of `shard_rows` samples at a
    time. Re-opening an existing dataset resumes it: skip `done_ids`, write the rest.

    Subclasses set `kind` and implement `_load_manifest`, `_new_manifest`, `_validate` and `_encode`
    (and may override `_topk_bytes`)."""

    kind = "dataset"

    def __init__(self, uri: str, meta: BaseModel, shard_rows: int = 512):
        if shard_rows < 1:
            raise UserError(f"shard_rows must be >= 1, got {shard_rows}")
        self.uri, self.meta, self.shard_rows = uri, meta, shard_rows
        self._fs, self._root = fs.resolve(uri)
        self._manifest_path = fs.join(self._root, fs.MANIFEST)
        self._buffer: list[Any] = []
        self._buffered_ids: set[str] = set()
        self._closed = False
        if fs.exists(self._fs, self._manifest_path):
            self.manifest = self._load_manifest(fs.read_bytes(self._fs, self._manifest_path))
            diffs = meta_differences(self.manifest.meta, meta)
            if diffs:
                raise UserError(f"{uri} holds a different {self.kind} ({'; '.join(diffs)})")
            self.manifest.complete = False
        else:
            self.manifest = self._new_manifest()
        self._remove_orphans()
        self._done = self._committed_ids()
        self._next_index = 1 + max((int(SHARD_RE.match(s.file).group(1)) for s in self.manifest.shards), default=-1)

    # ------------------------------------------------------------ hooks

    @abstractmethod
    def _load_manifest(self, data: bytes) -> ShardedManifest:
        """Parse an existing `manifest.json` (UserError when it is another kind of dataset)."""

    @abstractmethod
    def _new_manifest(self) -> ShardedManifest:
        """The manifest of a new, empty dataset of `self.meta`."""

    @abstractmethod
    def _validate(self, sample: Any) -> Any:
        """Check one sample against the dataset's contract (UserError); return the sample to store."""

    @abstractmethod
    def _encode(self, samples: list[Any]) -> bytes:
        """One shard's bytes."""

    def _topk_bytes(self, data: bytes) -> int:
        return 0

    # ------------------------------------------------------------ public API

    @property
    def done_ids(self) -> set[str]:
        """Sample ids already committed (buffered ones are not: they are lost if the process dies)."""
        return set(self._done)

    def write(self, sample: Any) -> None:
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")
        sid = sample.sample_id
        if sid in self._done or sid in self._buffered_ids:
            raise UserError(f"sample id {sid!r} is already in {self.uri}: skip the ids in done_ids")
        self._buffer.append(self._validate(sample))
        self._buffered_ids.add(sid)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Encode and commit the buffered samples as one shard (no-op when the buffer is empty)."""
        if not self._buffer:
            return
        data = self._encode(self._buffer)
        name = shard_name(self._next_index)
        fs.write_atomic(self._fs, fs.join(self._root, name), data)
        self.manifest.shards.append(
            ShardInfo(
                file=name,
                rows=len(self._buffer),
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                positions=sum(len(s.positions) for s in self._buffer),
                tokens=sum(len(s.input_ids) for s in self._buffer),
                topk_bytes=self._topk_bytes(data),
                id_bloom=id_bloom([s.sample_id for s in self._buffer]),
            )
        )
        self._save_manifest()
        self._done |= self._buffered_ids
        self._next_index += 1
        self._buffer, self._buffered_ids = [], set()

    def close(self):
        """Commit the last partial shard and mark the dataset complete; returns the manifest."""
        if not self._closed:
            self.flush()
            self.manifest.complete = True
            self._save_manifest()
            self._closed = True
        return self.manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # on an error the buffer is dropped: its samples are not in done_ids, a resume writes them again

    # ------------------------------------------------------------ internals

    def _save_manifest(self) -> None:
        self.manifest.updated = now()
        fs.write_atomic(self._fs, self._manifest_path, self.manifest.to_json())

    def _remove_orphans(self) -> None:
        listed = {s.file for s in self.manifest.shards}
        for name in fs.list_files(self._fs, self._root):
            if (SHARD_RE.match(name) and name not in listed) or name.startswith(".tmp-"):
                fs.delete(self._fs, fs.join(self._root, name))

    def _committed_ids(self) -> set[str]:
        done: set[str] = set()
        for shard in self.manifest.shards:
            with self._fs.open_input_file(fs.join(self._root, shard.file)) as f:
                done.update(pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist())
        return done


class ShardLocator:
    """Finds the shard and row of a sample id without scanning every shard: each shard's Bloom filter in
    the manifest says whether it may hold the id, so only the admitted shards (the right one, plus about
    1% false positives) have their small `sample_id` column read, once each (cached)."""

    def __init__(self, filesystem, root: str, shards: list[ShardInfo]):
        self._fs, self._root, self._shards = filesystem, root, shards
        self._rows: dict[str, dict[str, int]] = {}  # shard file -> sample id -> row
        self.shards_indexed = 0  # how many shards had to be opened (see tests)

    def locate(self, sample_id: str) -> tuple[int, int] | None:
        """(index of the shard in the manifest, row in it), or None when no shard holds the id."""
        for i, shard in enumerate(self._shards):
            if shard.id_bloom and not bloom_admits(shard.id_bloom, sample_id):
                continue
            row = self._shard_rows(shard).get(sample_id)
            if row is not None:
                return i, row
        return None

    def _shard_rows(self, shard: ShardInfo) -> dict[str, int]:
        if shard.file not in self._rows:
            with self._fs.open_input_file(fs.join(self._root, shard.file)) as f:
                ids = pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()
            self._rows[shard.file] = {sid: row for row, sid in enumerate(ids)}
            self.shards_indexed += 1
        return self._rows[shard.file]
