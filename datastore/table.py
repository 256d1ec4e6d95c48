"""Every dataset of the store is a Delta Lake table, written and read through delta-rs (`deltalake`).

The table's transaction log (``<dataset>/_delta_log/``) is the one source of truth:

- **what the dataset is**: the table's metadata action, ``description`` = JSON of the dataset's identity
  and settings (`kind`, `id`, `meta` (teacher, revision, tokenizer fingerprint, k, template, ...),
  `encoding` and its error bound, `range_rows`, `team`, `code_version`), written once at creation;
- **which shards exist**: the table's live ``add`` actions. A shard file is content-addressed
  (``shard-<sha256>.parquet``, the codec's zstd Parquet bytes, unchanged) and is written whole before the
  commit that adds it; a file no commit adds does not exist for readers;
- **per-shard facts** (rows, bytes, sha256, positions, tokens, top-k bytes, Bloom filter of its sample
  ids, writer, team): the commit's ``commitInfo`` (`SHARDS_KEY`), one JSON list per commit. Expired-log
  cleanup is switched off at creation (``delta.enableExpiredLogCleanup=false``) so every commit stays;
- **events**: a ``complete`` commit (no files) when a writer finished the whole input, a ``tokenizer``
  commit recording the sha256 of each stored tokenizer file;
- **exactly-once ranges**: a writer that commits a claimed sample range adds a Delta *application
  transaction* (``txn``: app id = the range, version = its lease generation). Two commits with the same
  app id conflict in delta-rs's conflict checker, so a range is committed at most once whatever the
  leases did (`DeltaDataset.commit` returns False for the loser).

Concurrency: delta-rs appends by creating log entry ``N`` only if it does not exist (local: atomic
link/rename; S3: conditional put, ``conditional_put: etag``) and retries on the next version, so any
number of processes append to one table without a lock service.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from datastore import fs
from datastore.errors import UserError
from datastore.manifest import ShardInfo

SHARDS_KEY = "logitfuse.shards"
OP_KEY = "logitfuse.op"
TOKENIZER_KEY = "logitfuse.tokenizer"
WRITER_KEY = "logitfuse.writer"
TEAM_KEY = "logitfuse.team"
COMPLETE_KEY = "logitfuse.complete_samples"
TABLE_CONFIG = {"delta.enableExpiredLogCleanup": "false"}
CONTENT_SHARD_RE = re.compile(r"^shard-([0-9a-f]{64})\.parquet$")


class CorruptDataset(UserError):
    """A dataset's log (or 0.1 manifest) cannot be read or does not describe a logitfuse dataset."""


class CorruptShard(CorruptDataset):
    """A shard the dataset's log lists is missing, unreadable, or not the bytes whose sha256 the log
    recorded. The message names the file and points to ``logitfuse store verify``."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem} (`logitfuse store verify` lists every problem of the dataset; "
                         "re-run the command that wrote it, or `store rm` it)")


def shard_file(sha256: str) -> str:
    """The content-addressed file name of a shard."""
    return f"shard-{sha256}.parquet"


def _iso(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


@dataclass
class Snapshot:
    """One version of a dataset table, as the datastore uses it.

    Attributes:
        version: the Delta table version read.
        info: the dataset description written at creation (identity, encoding, range_rows, team, ...).
        shards: the live shards in commit order (oldest first).
        complete: a ``complete`` commit follows the last commit that added shards.
        created / updated: ISO-8601 UTC times of the first and the last commit.
        tokenizer: stored tokenizer files recorded in the log, name -> {"sha256", "bytes"}.
        writers: team of each commit that added shards (for the catalog).
    """

    version: int
    info: dict
    shards: list[ShardInfo]
    complete: bool
    created: str
    updated: str
    tokenizer: dict[str, dict] = field(default_factory=dict)
    teams: list[str] = field(default_factory=list)


class DeltaDataset:
    """The Delta table at a dataset URI (local directory or ``s3://bucket/prefix/kind/id``)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = fs.resolve(uri)
        self.table_uri, self.options = fs.table_location(uri)
        self._dt = None
        self._history: dict[int, dict] = {}  # commitInfo by version, read incrementally

    # ------------------------------------------------------------ existence and creation

    def exists(self) -> bool:
        """True when a Delta log is at the URI. Raises UserError, one line, when the URI is a file (not a
        dataset directory) or its store cannot be read (an unreachable S3 endpoint, a missing permission)."""
        from deltalake import DeltaTable

        try:
            return DeltaTable.is_deltatable(self.table_uri, storage_options=self.options or None)
        except OSError as e:
            try:
                is_file = self.fs.get_file_info(self.root).type == fs.pafs.FileType.File
            except OSError:
                is_file = False
            if is_file:
                raise UserError(f"{self.uri}: a file, not a dataset directory") from None
            raise UserError(f"{self.uri}: cannot read the store ({_first_line(e)})") from None

    def create(self, schema: pa.Schema, info: dict) -> bool:
        """Create the table (version 0: schema + description, no files). False when another process
        created it first (the caller then compares its description with what it wanted)."""
        from deltalake import Schema
        from deltalake.transaction import create_table_with_add_actions

        try:
            create_table_with_add_actions(
                self.table_uri, Schema.from_arrow(schema), [], mode="error", name=str(info.get("id", "")),
                description=json.dumps(info, sort_keys=True), configuration=dict(TABLE_CONFIG),
                storage_options=self.options or None,
            )
        except Exception as e:  # noqa: BLE001 - delta-rs raises one generic error class for "exists"
            if "already exists" in str(e) or self.exists():
                return False
            raise
        return True

    def table(self, refresh: bool = True):
        """The `deltalake.DeltaTable`, loaded once and brought to the newest version when `refresh`."""
        from deltalake import DeltaTable

        try:
            if self._dt is None:
                self._dt = DeltaTable(self.table_uri, storage_options=self.options or None)
            elif refresh:
                self._dt.update_incremental()
        except Exception as e:  # noqa: BLE001 - a log that delta-rs cannot read is a corrupt dataset
            raise CorruptDataset(f"{self.uri}: unreadable Delta log ({_first_line(e)})") from None
        return self._dt

    # ------------------------------------------------------------ reading

    def info(self) -> dict:
        """The dataset description of the table's metadata action."""
        meta = self.table(refresh=False).metadata()
        try:
            info = json.loads(meta.description or "")
        except ValueError:
            info = None
        if not isinstance(info, dict) or "kind" not in info:
            raise CorruptDataset(f"{self.uri}: the Delta table's description is not a logitfuse dataset")
        return info

    def snapshot(self) -> Snapshot:
        """The newest version: description, live shards in commit order, completeness and times."""
        dt = self.table()
        try:
            info = self.info()
            adds = pa.table(dt.get_add_actions(flatten=True))
            newest = dt.version()
            known = max(self._history, default=-1)
            if newest > known:
                for h in dt.history(limit=newest - known):
                    self._history[int(h.get("version", 0))] = h
            history = [self._history[v] for v in sorted(self._history) if v <= newest]
        except CorruptDataset:
            raise
        except Exception as e:  # noqa: BLE001
            raise CorruptDataset(f"{self.uri}: unreadable Delta log ({_first_line(e)})") from None
        live = {
            p: (int(size), int(rows) if rows is not None else 0)
            for p, size, rows in zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist(),
                                     adds.column("num_records").to_pylist(), strict=True)
        }
        shards: list[ShardInfo] = []
        seen: set[str] = set()
        tokenizer: dict[str, dict] = {}
        teams: list[str] = []
        complete = False
        for h in history:
            op = h.get(OP_KEY)
            if op in ("shards", "migrate"):
                complete = op == "migrate" and bool(h.get(COMPLETE_KEY))
                for d in json.loads(h.get(SHARDS_KEY) or "[]"):
                    s = ShardInfo.model_validate(d)
                    if s.file in live and s.file not in seen:
                        shards.append(s)
                        seen.add(s.file)
                team = h.get(TEAM_KEY)
                if team and team not in teams:
                    teams.append(team)
            elif op == "complete":
                complete = True
            elif op == "tokenizer":
                tokenizer = json.loads(h.get(TOKENIZER_KEY) or "{}")
        for path, (size, rows) in sorted(live.items()):  # files added by another engine: facts unknown
            if path not in seen:
                m = CONTENT_SHARD_RE.match(path)
                shards.append(ShardInfo(file=path, rows=rows, bytes=size, sha256=m.group(1) if m else "",
                                        positions=0, tokens=0, topk_bytes=0))
        stamps = [h.get("timestamp") for h in history if h.get("timestamp")]
        return Snapshot(
            version=dt.version(), info=info, shards=shards, complete=complete,
            created=_iso(min(stamps)) if stamps else "", updated=_iso(max(stamps)) if stamps else "",
            tokenizer=tokenizer, teams=teams,
        )

    def range_version(self, app_id: str) -> int | None:
        """The version (lease generation) of the commit that stored range `app_id`, or None."""
        return self.table(refresh=False).transaction_version(app_id)

    # ------------------------------------------------------------ writing

    def commit(self, shards: list[ShardInfo], op: str, extra: dict[str, Any] | None = None,
               app_txn: tuple[str, int] | None = None) -> bool:
        """Append one commit adding `shards` (files already written whole under the dataset directory)
        with `op` and `extra` in its commitInfo. With `app_txn` = (app id, version) the commit also
        records that application transaction: it fails, and this returns False, when another commit
        recorded the same app id (already in the table, or concurrently). Raises on other errors."""
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import AddAction, CommitProperties, Transaction

        # a blind append needs no fresh snapshot (delta-rs rebases it onto the newest version); a fenced
        # one checks the range against the newest version, and conflicts with any commit after it
        dt = self.table(refresh=app_txn is not None)
        if app_txn is not None and dt.transaction_version(app_txn[0]) is not None:
            return False
        now_ms = int(time.time() * 1000)
        adds = [AddAction(s.file, s.bytes, {}, now_ms, True, json.dumps({"numRecords": s.rows})) for s in shards]
        custom = {OP_KEY: op, **(extra or {})}
        if shards:
            custom[SHARDS_KEY] = json.dumps([s.model_dump() for s in shards], separators=(",", ":"))
        props = CommitProperties(
            custom_metadata=custom,
            app_transactions=[Transaction(app_txn[0], app_txn[1], now_ms)] if app_txn else None,
            max_commit_retries=1000,
        )
        try:
            dt.create_write_transaction(adds, mode="append", schema=dt.schema(), commit_properties=props)
        except CommitFailedError:
            if app_txn is None:
                raise
            return False
        return True


def _first_line(e: BaseException, limit: int = 240) -> str:
    """The error's type and first line, cut to `limit` characters (delta-rs puts whole Rust debug
    structs of the log's paths in some messages)."""
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(e).__name__}: {line if len(line) <= limit else line[:limit] + ' ...'}"
