"""`LogitsWriter`: appends ScoredSamples to a logits dataset, one atomic shard at a time, resumable.

Crash safety: a shard is written whole (see `datastore.fs.write_atomic`) before the manifest that lists
it; the manifest is rewritten atomically after each shard. A crash between the two leaves an orphan shard
that readers never see and that the next writer deletes, so every committed sample is there exactly once
and the samples of the lost buffer are simply not in `done_ids`.
"""

from __future__ import annotations

import hashlib
import re

from datastore import codec, fs
from datastore.errors import UserError
from datastore.manifest import LogitsMeta, Manifest, ShardInfo, id_bloom, logits_id, meta_differences, now
from datastore.sample import ScoredSample

_SHARD_RE = re.compile(r"^shard-(\d{6})\.parquet$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


class LogitsWriter:
    """Write a logits dataset at `uri` (a dataset directory: ``STORE/logits/<logits_id(meta)>``, see
    `datastore.logits_uri`). Re-opening an existing dataset resumes it: skip `done_ids`, write the rest."""

    def __init__(
        self,
        uri: str,
        meta: LogitsMeta,
        shard_rows: int = 512,
        *,
        codec_config: codec.CodecConfig | None = None,
    ):
        if shard_rows < 1:
            raise UserError(f"shard_rows must be >= 1, got {shard_rows}")
        self.uri, self.meta, self.shard_rows = uri, meta, shard_rows
        self._fs, self._root = fs.resolve(uri)
        self._buffer: list[ScoredSample] = []
        self._buffered_ids: set[str] = set()
        self._closed = False
        self._manifest_path = fs.join(self._root, fs.MANIFEST)
        if fs.exists(self._fs, self._manifest_path):
            self.manifest = Manifest.model_validate_json(fs.read_bytes(self._fs, self._manifest_path))
            diffs = meta_differences(self.manifest.meta, meta)
            if diffs:
                raise UserError(f"{uri} holds a different logits dataset ({'; '.join(diffs)})")
            self.codec = _config_from(self.manifest.encoding)
            if codec_config is not None and codec_config.step != self.codec.step:
                raise UserError(
                    f"{uri} was written with logprob step {self.codec.step}, not {codec_config.step}"
                )
            self.manifest.complete = False
        else:
            self.codec = codec_config or codec.CodecConfig()
            self.manifest = Manifest(logits_id=logits_id(meta), meta=meta, encoding=self.codec.describe())
        self._remove_orphans()
        self._done = self._committed_ids()
        self._next_index = 1 + max(
            (int(_SHARD_RE.match(s.file).group(1)) for s in self.manifest.shards), default=-1
        )

    # ------------------------------------------------------------ public API

    @property
    def done_ids(self) -> set[str]:
        """Sample ids already committed (buffered ones are not: they are lost if the process dies)."""
        return set(self._done)

    def write(self, sample: ScoredSample) -> None:
        if self._closed:
            raise ValueError("LogitsWriter is closed")
        sid = sample.sample_id
        if sid in self._done or sid in self._buffered_ids:
            raise UserError(f"sample id {sid!r} is already in {self.uri}: skip the ids in done_ids")
        codec.validate(sample, self.meta.k)
        self._buffer.append(sample)
        self._buffered_ids.add(sid)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Encode and commit the buffered samples as one shard (no-op when the buffer is empty)."""
        if not self._buffer:
            return
        data = codec.encode_shard(self._buffer, self.meta.k, self.codec)
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
                topk_bytes=codec.topk_bytes(data),
                id_bloom=id_bloom([s.sample_id for s in self._buffer]),
            )
        )
        self._save_manifest()
        self._done |= self._buffered_ids
        self._next_index += 1
        self._buffer, self._buffered_ids = [], set()

    def close(self) -> Manifest:
        """Commit the last partial shard and mark the dataset complete."""
        if not self._closed:
            self.flush()
            self.manifest.complete = True
            self._save_manifest()
            self._closed = True
        return self.manifest

    def __enter__(self) -> LogitsWriter:
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
            if (_SHARD_RE.match(name) and name not in listed) or name.startswith(".tmp-"):
                fs.delete(self._fs, fs.join(self._root, name))

    def _committed_ids(self) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for shard in self.manifest.shards:
            with self._fs.open_input_file(fs.join(self._root, shard.file)) as f:
                done.update(pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist())
        return done


def _config_from(encoding: dict) -> codec.CodecConfig:
    return codec.CodecConfig(
        step_units=int(encoding.get("step_units", 5)),
        step_log2=int(encoding.get("step_log2", 7)),
        zstd_level=int(encoding.get("zstd_level", 17)),
    )
