"""What every sharded dataset of the store shares (logits and targets): the writer on a Delta Lake table
(`datastore.table`), sample-range claims under expiring leases (`datastore.leases`), checksum-verified
shard reads, and the Bloom-guided `ShardLocator`. The two dataset kinds differ only in their record,
identity and shard encoding, which their modules (`datastore.manifest` + `datastore.writer`,
`datastore.targets`) supply through the hooks below.

Crash safety: a shard file (content-addressed, ``shard-<sha256>.parquet``) is written whole before the
Delta commit that adds it. A crash between the two leaves a file no version references: readers never
see it and `logitfuse store gc` deletes it once it is older than its grace period (another writer's file
may be between its write and its commit). Every committed sample is there exactly once, and the samples
of a lost buffer are simply not in `done_ids`.

Many writers: `ShardedWriter.claims` hands out ranges of the input's samples (``range_rows`` per range,
fixed in the table when it is created, so writers with other ``shard_rows`` or batch budgets agree on
them) under leases; a range is committed as one shard with a Delta application transaction, so it lands
at most once even if a stalled holder and the writer that took its range over both finish it.
"""

from __future__ import annotations

import hashlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel

from datastore import fs
from datastore.errors import UserError
from datastore.leases import LEASE_SECONDS, Lease, LeaseManager, holder_id
from datastore.manifest import (
    ShardedManifest,
    ShardInfo,
    bloom_admits,
    code_version,
    id_bloom,
    meta_differences,
)
from datastore.table import CorruptDataset, CorruptShard, DeltaDataset, Snapshot, shard_file

if TYPE_CHECKING:
    from datastore.reuse import ShardCopy

# (absolute shard path, sha256, size, mtime) of every shard file this process has verified: `scan()` and id
# lookups re-hash a shard only when it is new to the process or its file changed since (size or mtime).
_VERIFIED: set[tuple] = set()


def _stamp(filesystem, path: str, sha256: str) -> tuple:
    info = filesystem.get_file_info(path)
    return (path, sha256, info.size, info.mtime_ns)


def read_verified(filesystem, root: str, shard: ShardInfo) -> bytes:
    """A shard's bytes after checking them against the log's sha256. Raises `CorruptShard` (a UserError)
    naming the shard when they differ (corrupt or replaced file) or it cannot be read (missing)."""
    path = fs.join(root, shard.file)
    try:
        data = fs.read_bytes(filesystem, path)
    except FileNotFoundError:
        raise CorruptShard(path, "shard listed in the dataset log is missing") from None
    except OSError as e:
        raise _unreadable(path, e) from None
    if not shard.sha256 or hashlib.sha256(data).hexdigest() != shard.sha256:
        raise CorruptShard(path, "sha256 does not match the dataset log (corrupt shard)")
    _VERIFIED.add(_stamp(filesystem, path, shard.sha256))
    return data


def ensure_verified(filesystem, root: str, shards: list[ShardInfo]) -> None:
    """Verify every shard whose file this process has not verified as it is now (what `scan()` does
    before a lazy scan). Raises like `read_verified`."""
    for s in shards:
        path = fs.join(root, s.file)
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise CorruptShard(path, "shard listed in the dataset log is missing")
        if (path, s.sha256, info.size, info.mtime_ns) not in _VERIFIED:
            read_verified(filesystem, root, s)


def read_columns(filesystem, root: str, shard: ShardInfo, columns: list[str]) -> pa.Table:
    """Some columns of a shard, read without hashing the whole file (the small ones an index needs).
    Raises `CorruptShard` when the file is missing or not readable Parquet."""
    path = fs.join(root, shard.file)
    try:
        with filesystem.open_input_file(path) as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise CorruptShard(path, "shard listed in the dataset log is missing") from None
    except ValueError as e:  # pyarrow's ArrowInvalid: not Parquet (truncated, overwritten)
        raise CorruptShard(path, f"shard is not readable Parquet ({str(e).splitlines()[0][:200]})") from None
    except OSError as e:
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: OSError) -> UserError:
    """A read that failed for another reason than a missing file (a timeout, throttling, a permission):
    the shard may be fine, so no `CorruptShard`."""
    return UserError(f"{path}: cannot read the shard now ({str(e).splitlines()[0][:200]})")


def sample_ids_of(data: bytes) -> list[str]:
    return pq.read_table(pa.BufferReader(data), columns=["sample_id"]).column("sample_id").to_pylist()


def legacy_manifest_path(root: str) -> str:
    return fs.join(root, fs.MANIFEST)


def load_manifest(uri: str, build, parse_legacy, what: str) -> ShardedManifest:
    """The manifest view of the dataset at `uri`: from its Delta log, else from a 0.1 ``manifest.json``.

    Args:
        build: Snapshot -> manifest (the kind's `_manifest_from_snapshot`).
        parse_legacy: bytes -> manifest (raises on another kind).
        what: "logits" or "targets", for messages.
    Raises:
        UserError: nothing there; CorruptDataset (a UserError): an unreadable log or manifest.
    """
    table = DeltaDataset(uri)
    if table.exists():
        try:
            return build(table.snapshot())
        except CorruptDataset:
            raise
        except UserError as e:
            raise UserError(f"{uri}: {e}") from None
        except ValueError as e:  # a description that does not validate
            raise CorruptDataset(f"{uri}: corrupt dataset description ({str(e).splitlines()[0]})") from None
    path = legacy_manifest_path(table.root)
    if fs.exists(table.fs, path):
        data = fs.read_bytes(table.fs, path)
        try:
            return parse_legacy(data)
        except UserError as e:
            raise UserError(f"{uri}: {e}") from None
        except ValueError as e:
            raise CorruptDataset(f"{uri}: corrupt {fs.MANIFEST} ({str(e).splitlines()[0]})") from None
    raise UserError(f"no {what} dataset at {uri} (no Delta log {fs.DELTA_LOG}/ nor {fs.MANIFEST}): "
                    f"expected STORE/{what}/<id>")


class Claim:
    """A range of samples this writer holds the lease for: score `sample_ids`, then `commit` them."""

    def __init__(self, writer: ShardedWriter, range_key: str, lease: Lease, sample_ids: list[str], app_id: str):
        self.writer, self.range_key, self.lease, self.sample_ids = writer, range_key, lease, sample_ids
        self.app_id = app_id

    def commit(self, samples: list[Any], copies: Sequence[ShardCopy] = ()) -> bool:
        """Commit the claimed samples (all of them, or fewer: the rest stay unstored) in one Delta commit
        fenced by the claim's application transaction: `samples` encoded as one shard, and each of
        `copies` (whole shards of earlier datasets, `datastore.reuse.ShardCopy`) as a shard of its own,
        renamed to its new sample ids without decoding. False when another writer committed the same
        claim first (this one's work is dropped). Raises ValueError for a sample the claim does not
        hold, or one given twice."""
        return self.writer._commit_claim(self, samples, copies)


class ShardedWriter(ABC):
    """Appends samples to a dataset (a Delta table at `uri`), one atomic shard commit at a time.
    Re-opening an existing dataset resumes it: skip `done_ids`, write the rest.

    Two ways to write: `write` (buffered; one writer per dataset) and `claims` (any number of concurrent
    writers over the same input). Subclasses set `kind`, `schema` and implement `_info`, `_open_info`,
    `_manifest_from_snapshot`, `_validate` and `_encode` (and may override `_topk_bytes`).

    Raises UserError when `uri` holds another dataset, or a 0.1 dataset (``store migrate`` first).
    """

    kind = "dataset"
    schema: pa.Schema

    def __init__(self, uri: str, meta: BaseModel, shard_rows: int = 512, *, team: str | None = None,
                 lease_seconds: float = LEASE_SECONDS):
        if shard_rows < 1:
            raise UserError(f"shard_rows must be >= 1, got {shard_rows}")
        self.uri, self.meta, self.shard_rows = uri, meta, shard_rows
        self.lease_seconds = lease_seconds
        self.team = team if team is not None else os.environ.get("LOGITFUSE_TEAM", "")
        self.holder = holder_id()
        self.table = DeltaDataset(uri)
        self._fs, self._root = self.table.fs, self.table.root
        self._buffer: list[Any] = []
        self._buffered_ids: set[str] = set()
        self._closed = False
        if not self.table.exists():
            if fs.exists(self._fs, legacy_manifest_path(self._root)):
                raise UserError(f"{uri} is a logitfuse 0.1 dataset ({fs.MANIFEST}): run "
                                f"`logitfuse store migrate {uri}` before writing to it")
            info = {**self._info(), "range_rows": shard_rows, "team": self.team, "code_version": code_version()}
            self.table.create(self.schema, info)  # False: another writer created it first, checked below
        info = self.table.info()
        if info.get("kind") != self._info()["kind"]:
            raise UserError(f"{uri} holds another kind of dataset ({info.get('kind')}), not {self.kind}s")
        stored = type(meta).model_validate(info["meta"])
        diffs = meta_differences(stored, meta)
        if diffs:
            raise UserError(f"{uri} holds a different {self.kind} ({'; '.join(diffs)})")
        self._open_info(info)
        self.range_rows = int(info.get("range_rows") or shard_rows)
        self._ids_by_shard: dict[str, list[str]] = {}
        self._done: set[str] = set()
        self._snapshot: Snapshot | None = None
        self.refresh()

    # ------------------------------------------------------------ hooks

    @abstractmethod
    def _info(self) -> dict:
        """The dataset description stored at creation: kind, id, meta, encoding."""

    def _open_info(self, info: dict) -> None:  # noqa: B027 - optional hook, most kinds need nothing
        """Take what the writer needs from an existing (or just created) dataset's description."""

    @abstractmethod
    def _manifest_from_snapshot(self, snap: Snapshot) -> ShardedManifest:
        """The manifest view of a table snapshot."""

    @abstractmethod
    def _validate(self, sample: Any) -> Any:
        """Check one sample against the dataset's contract (UserError); return the sample to store."""

    @abstractmethod
    def _encode(self, samples: list[Any]) -> bytes:
        """One shard's bytes."""

    def _topk_bytes(self, data: bytes) -> int:
        return 0

    def _sample_keys(self, samples: list[Any]) -> list[str]:
        """Content key of each sample, in row order (`datastore.reuse`); empty: the kind has none."""
        return []

    def _renamed(self, data: bytes, sample_ids: list[str]) -> bytes:
        """A shard of this kind and encoding with its rows renamed to `sample_ids` (`Claim.commit`'s
        copies). Kinds without sample reuse refuse (UserError)."""
        raise UserError(f"{self.kind}s do not reuse shards of other datasets")

    # ------------------------------------------------------------ public API

    @property
    def manifest(self) -> ShardedManifest:
        """The dataset as of the last refresh or commit of this writer."""
        return self._manifest_from_snapshot(self._snapshot)

    @property
    def done_ids(self) -> set[str]:
        """Sample ids committed (by any writer, as of the last refresh); buffered ones are not."""
        return set(self._done)

    def refresh(self) -> None:
        """Read the newest table version; the ids of shards new to this writer are read from their
        bytes after their checksum is verified (a resume never trusts an unverified shard)."""
        snap = self.table.snapshot()
        for shard in snap.shards:
            if shard.file not in self._ids_by_shard:
                try:
                    data = read_verified(self._fs, self._root, shard)
                except (ValueError, OSError) as e:
                    why = e.problem if isinstance(e, CorruptShard) else str(e).splitlines()[0]
                    raise CorruptDataset(f"{self.uri}: committed shard {shard.file} fails verification "
                                         f"({why}): run `logitfuse store verify`") from None
                ids = sample_ids_of(data)
                self._ids_by_shard[shard.file] = ids
                self._done.update(ids)
        self._snapshot = snap

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
        info, data = self._write_shard(self._buffer)
        self.table.commit([info], "shards", self._commit_extra())
        self._committed([info], [[s.sample_id for s in self._buffer]])
        self._buffer, self._buffered_ids = [], set()

    def close(self):
        """Commit the last partial shard and mark the dataset complete; returns the manifest."""
        if not self._closed:
            self.flush()
            self.refresh()
            if not self._snapshot.complete:
                self.table.commit([], "complete", self._commit_extra())
                self.refresh()
            self._closed = True
        return self.manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # on an error the buffer is dropped: its samples are not in done_ids, a resume writes them again

    def claims(self, sample_ids: list[str], poll_seconds: float | None = None,
               exclude: set[str] | None = None) -> Iterator[Claim]:
        """Claims over an input's ordered sample ids, for any number of concurrent writers.

        The ids are cut into ranges of `range_rows` (the table's, not this writer's `shard_rows`). Yields
        a `Claim` for each range not yet committed whose lease this writer gets (free, or expired: its
        holder died), holding only the range's ids not yet stored; the caller scores them and calls
        `Claim.commit`. Ranges leased by live writers are waited for (polling every `poll_seconds`,
        default a quarter of the lease, at most 1 s) and taken over if their holder dies. Returns when
        every sample is committed, by whichever writer, except those in `exclude` (a set the caller may
        grow while iterating: samples it gave up on, e.g. non-finite scores). Leases are renewed in the
        background.

        A claim's commit is fenced by a Delta application transaction whose id names the range and the
        exact samples it stores, so two writers that claimed the same samples never both commit them.
        """
        exclude = exclude if exclude is not None else set()
        ranges = []
        for start in range(0, len(sample_ids), self.range_rows):
            ids = sample_ids[start : start + self.range_rows]
            digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
            ranges.append((f"range-{start // self.range_rows:06d}-{digest}", ids))
        poll = poll_seconds if poll_seconds is not None else min(1.0, self.lease_seconds / 4)
        leases = LeaseManager(self._fs, self._root, self.holder, self.lease_seconds)
        try:
            pending = ranges
            while True:
                self.refresh()
                pending = [(key, ids) for key, ids in pending
                           if any(i not in self._done and i not in exclude for i in ids)]
                if not pending:
                    return
                got_one = False
                for key, ids in pending:
                    lease = leases.try_acquire(key)
                    if lease is None:
                        continue
                    got_one = True
                    try:
                        self.refresh()
                        todo = [i for i in ids if i not in self._done and i not in exclude]
                        if todo:
                            digest = hashlib.sha256("\n".join(todo).encode()).hexdigest()[:12]
                            yield Claim(self, key, lease, todo, f"{key}.{digest}")
                    finally:
                        leases.release(lease)
                if not got_one:
                    time.sleep(poll)
        finally:
            leases.close()

    # ------------------------------------------------------------ internals

    def _commit_extra(self) -> dict:
        from datastore.table import TEAM_KEY, WRITER_KEY

        return {WRITER_KEY: self.holder, TEAM_KEY: self.team}

    def _write_shard(self, samples: list[Any]) -> tuple[ShardInfo, bytes]:
        data = self._encode(samples)
        info = self._store_shard(data, [s.sample_id for s in samples],
                                 positions=sum(len(s.positions) for s in samples),
                                 tokens=sum(len(s.input_ids) for s in samples),
                                 sample_keys=self._sample_keys(samples))
        return info, data

    def _store_shard(self, data: bytes, ids: list[str], *, positions: int, tokens: int,
                     sample_keys: list[str]) -> ShardInfo:
        """Write a shard's bytes whole under their content address; its facts for the commit."""
        sha = hashlib.sha256(data).hexdigest()
        name = shard_file(sha)
        fs.write_atomic(self._fs, fs.join(self._root, name), data)
        _VERIFIED.add(_stamp(self._fs, fs.join(self._root, name), sha))
        return ShardInfo(file=name, rows=len(ids), bytes=len(data), sha256=sha, positions=positions,
                         tokens=tokens, topk_bytes=self._topk_bytes(data), id_bloom=id_bloom(ids),
                         writer=self.holder, team=self.team, sample_keys=sample_keys)

    def _copy_shard(self, copy: ShardCopy) -> ShardInfo:
        """Store an earlier dataset's shard (its bytes checked against its log's sha256) under new ids."""
        data = self._renamed(copy.data, copy.sample_ids)
        return self._store_shard(data, copy.sample_ids, positions=copy.shard.positions,
                                 tokens=copy.shard.tokens, sample_keys=list(copy.shard.sample_keys))

    def _committed(self, infos: list[ShardInfo], ids: list[list[str]]) -> None:
        for info, shard_ids in zip(infos, ids, strict=True):
            self._ids_by_shard[info.file] = shard_ids
            self._done.update(shard_ids)
        self.refresh()

    def _commit_claim(self, claim: Claim, samples: list[Any], copies: Sequence[ShardCopy] = ()) -> bool:
        parts = [[s.sample_id for s in samples]] if samples else []
        parts += [list(c.sample_ids) for c in copies]
        got = [i for part in parts for i in part]
        if len(set(got)) != len(got) or not set(got) <= set(claim.sample_ids):
            raise ValueError(f"claim {claim.range_key}: committing samples it does not hold, or twice "
                             f"(each claimed sample at most once)")
        if not got:
            return True
        infos = []
        if samples:
            infos.append(self._write_shard([self._validate(s) for s in samples])[0])
        infos += [self._copy_shard(c) for c in copies]
        extra = {**self._commit_extra(), "logitfuse.range": claim.range_key}
        if not self.table.commit(infos, "shards", extra, app_txn=(claim.app_id, claim.lease.generation)):
            self.refresh()  # the range is another writer's: our files are orphans for `store gc`
            return False
        self._committed(infos, parts)
        return True


class ShardLocator:
    """Finds the shard and row of a sample id without scanning every shard: each shard's Bloom filter in
    the log says whether it may hold the id, so only the admitted shards (the right one, plus about 1%
    false positives) are read — verified against their sha256 — once each (ids cached)."""

    def __init__(self, filesystem, root: str, shards: list[ShardInfo]):
        self._fs, self._root, self._shards = filesystem, root, shards
        self._rows: dict[str, dict[str, int]] = {}  # shard file -> sample id -> row
        self.shards_indexed = 0  # how many shards had to be opened (see tests)

    def locate(self, sample_id: str) -> tuple[int, int] | None:
        """(index of the shard in the manifest, row in it), or None when no shard holds the id."""
        for i, shard in enumerate(self._shards):
            if shard.id_bloom and not bloom_admits(shard.id_bloom, sample_id, shard.rows):
                continue
            row = self._shard_rows(shard).get(sample_id)
            if row is not None:
                return i, row
        return None

    def _shard_rows(self, shard: ShardInfo) -> dict[str, int]:
        if shard.file not in self._rows:
            ids = sample_ids_of(read_verified(self._fs, self._root, shard))
            self._rows[shard.file] = {sid: row for row, sid in enumerate(ids)}
            self.shards_indexed += 1
        return self._rows[shard.file]
