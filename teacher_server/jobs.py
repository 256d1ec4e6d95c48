"""The job service: uploaded datasets and extraction jobs, persisted in SQLite, with no HTTP in sight.

`JobDB` is the persistent state shared by the API process and the teacher worker processes (SQLite in
WAL mode; each call opens its own short connection, so threads and processes never share one).
`DatasetStore` streams an upload to disk, validates it exactly as `logitfuse extract` does (in a separate
process, streaming, under the config's decoded-size limits, so neither the API's memory nor its event loop
feel a large or hostile file) and files it under its content hash. `JobService` is what the routes call:
it checks a request against the config, returns the team's existing job for a repeated (dataset,
teacher, settings), enforces the per-team queue limit, keeps teams out of each other's jobs, and enqueues
the rest for the teacher's worker (`teacher_server.worker`).

Job states: queued -> running -> done | failed; queued/running -> cancelled. A server that dies leaves
`running` jobs behind; the next start puts them back in the queue, and extraction's resume scores only
the samples that are not committed yet. One server at a time owns a state directory (`lock_state_dir`):
a second one started on it refuses before it touches a job or a worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datastore.chat import InvalidDataset, Limits, ScanResult, scan_dataset
from datastore.errors import UserError
from datastore.words import plural
from teacher_server.auth import AuthError, Principal
from teacher_server.config import ServiceConfig
from teacher_server.render import shared_templates
from teacher_server.weights import weights_stamp

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, format TEXT NOT NULL, samples INTEGER NOT NULL,
    skipped INTEGER NOT NULL, skip_invalid INTEGER NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, teacher TEXT NOT NULL, dataset_id TEXT NOT NULL,
    k INTEGER NOT NULL, chat_template TEXT NOT NULL, max_length INTEGER NOT NULL, all_positions INTEGER NOT NULL,
    state TEXT NOT NULL, team TEXT NOT NULL, samples_total INTEGER NOT NULL, samples_done INTEGER NOT NULL DEFAULT 0,
    samples_scored INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0,
    tokens_per_s REAL NOT NULL DEFAULT 0, run_seconds REAL NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0, logits_id TEXT, uri TEXT, error TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, started REAL, finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (teacher, state, created);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key);
CREATE TABLE IF NOT EXISTS workers (
    teacher TEXT PRIMARY KEY, pid INTEGER, state TEXT NOT NULL, detail TEXT, updated REAL NOT NULL
);
"""


@dataclass
class Job:
    id: str
    key: str
    teacher: str
    dataset_id: str
    k: int
    chat_template: str
    max_length: int
    all_positions: bool
    state: str
    team: str
    samples_total: int
    samples_done: int
    samples_scored: int
    tokens: int
    tokens_per_s: float
    run_seconds: float
    truncated: int
    logits_id: str | None
    uri: str | None
    error: str | None
    attempts: int
    created: float
    started: float | None
    finished: float | None
    #: set by `JobService.submit` only (not stored): the team's earlier done job for the same settings
    #: whose logits dataset is gone from the store, which this new job computes again
    replaces: str | None = None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current run's rate (None until a batch of this run is done)."""
        if self.state != "running" or not self.samples_scored or not self.run_seconds:
            return None
        rate = self.samples_scored / self.run_seconds
        return max(0.0, (self.samples_total - self.samples_done) / rate)

    def public(self) -> dict:
        return {
            "id": self.id,
            "state": self.state,
            "teacher": self.teacher,
            "team": self.team,
            "dataset": self.dataset_id,
            "k": self.k,
            "chat_template": self.chat_template,
            "max_length": self.max_length,
            "all_positions": self.all_positions,
            "samples_done": self.samples_done,
            "samples_scored": self.samples_scored,
            "samples_total": self.samples_total,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "run_seconds": round(self.run_seconds, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "truncated": self.truncated,
            "logits_id": self.logits_id,
            "uri": self.uri,
            "errors": [self.error] if self.error else [],
            "attempts": self.attempts,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


@dataclass
class DatasetRecord:
    id: str
    path: str
    format: str
    samples: int
    skipped: int
    skip_invalid: bool
    bytes: int
    created: float

    def public(self) -> dict:
        return {"id": self.id, "format": self.format, "samples": self.samples, "skipped": self.skipped,
                "bytes": self.bytes}


def job_key(dataset_id: str, teacher: str, k: int, chat_template: str, max_length: int, all_positions: bool,
            weights: str = "") -> str:
    """Identity of a job's result: the same key means the same logits dataset. `weights` is the teacher's
    `weights_stamp`, so retrained weights at the same path make a new job instead of returning the old one."""
    payload = json.dumps([dataset_id, teacher, k, chat_template, max_length, all_positions, weights])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class JobDB:
    """Job and dataset state in one SQLite file, safe to use from several processes."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
        finally:
            con.close()

    @contextmanager
    def _tx(self, immediate: bool = False):
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    # ------------------------------------------------------------ datasets

    def add_dataset(self, rec: DatasetRecord) -> None:
        with self._tx(immediate=True) as db:
            db.execute(
                "INSERT OR IGNORE INTO datasets VALUES (?,?,?,?,?,?,?,?)",
                (rec.id, rec.path, rec.format, rec.samples, rec.skipped, int(rec.skip_invalid), rec.bytes, rec.created),
            )

    def dataset(self, dataset_id: str) -> DatasetRecord | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM datasets WHERE id=?", (dataset_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["skip_invalid"] = bool(d["skip_invalid"])
        return DatasetRecord(**d)

    # ------------------------------------------------------------ jobs

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        d = dict(row)
        d["all_positions"] = bool(d["all_positions"])
        return Job(**d)

    def find_job(self, key: str, team: str) -> Job | None:
        """The team's newest queued, running or done job with this key (what a resubmission returns)."""
        with self._tx() as db:
            return self._job(db.execute(
                "SELECT * FROM jobs WHERE key=? AND team=? AND state IN ('queued','running','done') "
                "ORDER BY created DESC LIMIT 1",
                (key, team),
            ).fetchone())

    def create_job(self, key: str, teacher: str, dataset_id: str, k: int, chat_template: str, max_length: int,
                   all_positions: bool, team: str, samples_total: int,
                   max_queued: int | None = None, stale: str | None = None) -> tuple[Job, bool]:
        """A new queued job, or the team's live/done job with the same key (second value: created?).
        `stale`: the id of a done job with this key not to return (its logits dataset is gone), so a new
        one is queued unless another submission queued it meanwhile. Raises `QueueFull` when the team
        already has `max_queued` queued jobs (checked in the same transaction, so concurrent submissions
        cannot overshoot)."""
        with self._tx(immediate=True) as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE key=? AND team=? AND state IN ('queued','running','done') AND id!=? "
                "ORDER BY created DESC LIMIT 1",
                (key, team, stale or ""),
            ).fetchone()
            if row is not None:
                return self._job(row), False
            if max_queued is not None:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE team=? AND state='queued'", (team,)).fetchone()[0]
                if queued >= max_queued:
                    raise QueueFull(f"team {team!r} already has {plural(queued, 'queued job')}, the limit is {max_queued}; "
                                    f"wait for some to start or cancel them")
            jid = secrets.token_hex(8)
            db.execute(
                "INSERT INTO jobs (id,key,teacher,dataset_id,k,chat_template,max_length,all_positions,state,team,"
                "samples_total,created) VALUES (?,?,?,?,?,?,?,?,'queued',?,?,?)",
                (jid, key, teacher, dataset_id, k, chat_template, max_length, int(all_positions), team,
                 samples_total, time.time()),
            )
            return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (jid,)).fetchone()), True

    def job(self, job_id: str) -> Job | None:
        with self._tx() as db:
            return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def jobs(self, state: str | None = None, teacher: str | None = None, limit: int = 100,
             team: str | None = None) -> list[Job]:
        """Recent jobs, newest first, optionally of one state, teacher and team."""
        q, args = "SELECT * FROM jobs WHERE 1=1", []
        if team is not None:
            q += " AND team=?"
            args.append(team)
        if state:
            q += " AND state=?"
            args.append(state)
        if teacher:
            q += " AND teacher=?"
            args.append(teacher)
        q += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        with self._tx() as db:
            return [self._job(r) for r in db.execute(q, args).fetchall()]

    def claim(self, teacher: str) -> Job | None:
        """Oldest queued job of a teacher, now marked running (atomic across processes)."""
        with self._tx(immediate=True) as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE teacher=? AND state='queued' ORDER BY created LIMIT 1", (teacher,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', started=?, attempts=attempts+1, samples_scored=0, run_seconds=0, "
                "tokens_per_s=0 WHERE id=?",
                (time.time(), row["id"]),
            )
            return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone())

    def progress(self, job_id: str, **fields) -> str | None:
        """Update a running job's counters; returns its state (the worker stops on 'cancelled')."""
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx(immediate=True) as db:
            if fields:
                db.execute(f"UPDATE jobs SET {sets} WHERE id=? AND state='running'", (*fields.values(), job_id))
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row["state"] if row else None

    def finish(self, job_id: str, state: str, error: str | None = None, **fields) -> None:
        """End a running job (a job cancelled meanwhile stays cancelled)."""
        sets = "".join(f", {k}=?" for k in fields)
        with self._tx(immediate=True) as db:
            db.execute(
                f"UPDATE jobs SET state=?, error=?, finished=?{sets} WHERE id=? AND state='running'",
                (state, error, time.time(), *fields.values(), job_id),
            )

    def fail_queued(self, teacher: str, error: str) -> int:
        with self._tx(immediate=True) as db:
            cur = db.execute(
                "UPDATE jobs SET state='failed', error=?, finished=? WHERE teacher=? AND state='queued'",
                (error, time.time(), teacher),
            )
            return cur.rowcount

    def cancel(self, job_id: str) -> Job | None:
        with self._tx(immediate=True) as db:
            db.execute(
                "UPDATE jobs SET state='cancelled', finished=? WHERE id=? AND state IN ('queued','running')",
                (time.time(), job_id),
            )
            return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def requeue_running(self) -> int:
        """After a restart: jobs left `running` by a dead server go back to the queue."""
        with self._tx(immediate=True) as db:
            return db.execute("UPDATE jobs SET state='queued' WHERE state='running'").rowcount

    def requeue(self, job_id: str) -> None:
        """A running job whose worker was stopped cleanly goes back to the queue."""
        with self._tx(immediate=True) as db:
            db.execute("UPDATE jobs SET state='queued' WHERE id=? AND state='running'", (job_id,))

    def requeue_teacher(self, teacher: str, max_attempts: int) -> None:
        """A teacher's worker crashed: its running job is retried, or failed after `max_attempts` runs."""
        with self._tx(immediate=True) as db:
            db.execute(
                "UPDATE jobs SET state='failed', finished=?, error=? WHERE teacher=? AND state='running' "
                "AND attempts>=?",
                (time.time(), f"the teacher worker crashed {max_attempts} times on this job", teacher, max_attempts),
            )
            db.execute("UPDATE jobs SET state='queued' WHERE teacher=? AND state='running'", (teacher,))

    def counts(self) -> dict[tuple[str, str], int]:
        with self._tx() as db:
            rows = db.execute("SELECT teacher, state, COUNT(*) AS n FROM jobs GROUP BY teacher, state").fetchall()
        return {(r["teacher"], r["state"]): r["n"] for r in rows}

    def teacher_totals(self) -> dict[str, dict]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT teacher, SUM(samples_done) AS done, SUM(tokens) AS tokens, "
                "SUM(CASE WHEN state='running' THEN tokens_per_s ELSE 0 END) AS tps, "
                "SUM(CASE WHEN state='failed' THEN 1 ELSE 0 END) AS failed FROM jobs GROUP BY teacher"
            ).fetchall()
        return {r["teacher"]: dict(r) for r in rows}

    # ------------------------------------------------------------ workers

    def set_worker(self, teacher: str, pid: int | None, state: str, detail: str | None = None) -> None:
        with self._tx(immediate=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO workers VALUES (?,?,?,?,?)", (teacher, pid, state, detail, time.time())
            )

    def workers(self) -> dict[str, dict]:
        with self._tx() as db:
            return {r["teacher"]: dict(r) for r in db.execute("SELECT * FROM workers").fetchall()}


class UploadTooLarge(Exception):
    """An upload over `max_upload_bytes` (HTTP 413)."""


class QueueFull(Exception):
    """A team has as many queued jobs as its limit allows (HTTP 429)."""


class JobEnded(Exception):
    """A cancellation of a job that already ended: done, failed or cancelled (HTTP 409)."""

    def __init__(self, job: Job):
        self.job = job
        super().__init__(f"job {job.id} already ended (state {job.state}); only queued or running jobs can be "
                         f"cancelled")


#: the file in the state directory on which a running server holds an exclusive lock (`lock_state_dir`)
LOCK_FILE = "serve.lock"
_HELD_LOCKS: dict[str, int] = {}


def lock_state_dir(state_dir: str | Path) -> None:
    """Take the state directory for this process for the rest of its life: an exclusive `flock` on
    `STATE/serve.lock`, which the OS drops when the process exits (kill -9 included, so a crashed server
    never blocks its restart). The lock's file descriptor is not inherited by the worker or validation
    processes. A second server on the same state directory would put the first one's running jobs back
    in the queue and kill its workers; it gets a `UserError` naming the directory and the pid of the
    server that holds it instead. Taking the lock again in the process that holds it does nothing."""
    import errno
    import fcntl

    from datastore.fs import check_local_directory

    state = Path(state_dir)
    check_local_directory(str(state), "state_dir")
    try:
        state.mkdir(parents=True, exist_ok=True)
        path = state / LOCK_FILE
        key = str(path.resolve())
        if key in _HELD_LOCKS:
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies; not inheritable (PEP 446)
    except OSError as e:
        raise UserError(f"state_dir {state}: cannot create its lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise UserError(f"state_dir {state} is in use by another logitfuse serve (pid "
                            f"{holder if holder.isdigit() else 'unknown'}); stop that server first, or give this "
                            f"one another state_dir") from None
        raise UserError(f"state_dir {state}: cannot lock {path.name} ({e.strerror or e})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = fd


def _warm_up() -> None:
    """Runs in a fresh validation process: import what validating a Parquet upload needs."""
    import pyarrow.parquet  # noqa: F401


def _validate_upload(path: str, skip_invalid: bool, limits: Limits) -> ScanResult:
    """Runs in the validation process: `scan_dataset`, its one-line errors naming the upload, not the
    server's temporary file."""
    try:
        return scan_dataset(path, skip_invalid, limits)
    except InvalidDataset as e:
        raise InvalidDataset(str(e).replace(path, "upload"), e.problems, e.count) from None
    except UserError as e:
        raise type(e)(str(e).replace(path, "upload")) from None


def die_with_parent(parent_pid: int) -> None:
    """Make this (child) process receive SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG), so a
    killed service leaves no worker or validation process behind; exits at once if the parent is gone."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class DatasetStore:
    """Uploaded datasets under `STATE/datasets/<id>.<jsonl|parquet>`, id = sha256[:16] of the bytes (the
    same id `load_dataset` gives the file, so the CLI and the service name a dataset alike)."""

    def __init__(self, root: str | Path, db: JobDB, limits: Limits | None = None, validators: int = 1):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = db
        self.limits = limits or Limits()
        self.validators = validators
        self._pool = None

    def _executor(self):
        """The validation process pool (spawned on first use; `start` spawns it ahead)."""
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.validators, mp_context=mp.get_context("spawn"),
                                             initializer=die_with_parent, initargs=(os.getpid(),))
        return self._pool

    def start(self) -> None:
        """Start the validation processes now, so that the first upload does not wait for them."""
        self._executor().submit(_warm_up)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def validate(self, path: Path, skip_invalid: bool) -> ScanResult:
        """`scan_dataset` in a validation process: a hostile file costs that process memory and CPU, never
        the API's (whose event loop only awaits the result)."""
        import asyncio
        from concurrent.futures.process import BrokenProcessPool

        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor(), _validate_upload, str(path), skip_invalid, self.limits)
        except BrokenProcessPool:
            self._pool = None
            raise UserError("the upload could not be validated: the validation process died (out of memory?); "
                            "split the dataset or lower its decoded size") from None

    async def ingest(self, chunks: AsyncIterator[bytes], max_bytes: int, skip_invalid: bool) -> tuple[DatasetRecord, list[str]]:
        """Stream an upload to a temporary file, then validate and file it; nothing is kept on failure."""
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = _mkstemp(self.root)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                head = b""
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                    if len(head) < 4:
                        head += chunk[: 4 - len(head)]
                    h.update(chunk)
                    f.write(chunk)
            if size == 0:
                raise UserError("empty upload: send a JSONL or Parquet dataset as the request body")
            fmt = "parquet" if head == b"PAR1" else "jsonl"
            named = tmp.with_name(tmp.name + "." + fmt)
            tmp.rename(named)
            tmp = named
            scan = await self.validate(tmp, skip_invalid)
            did = h.hexdigest()[:16]
            final = self.root / f"{did}.{fmt}"
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
            rec = DatasetRecord(id=did, path=str(final), format=fmt, samples=scan.samples,
                                skipped=scan.invalid, skip_invalid=skip_invalid, bytes=size, created=time.time())
            self.db.add_dataset(rec)
            return self.db.dataset(did) or rec, [str(p) for p in scan.problems]
        finally:
            if tmp.exists() and tmp.parent == self.root and tmp.name.startswith(".upload-"):
                tmp.unlink()


    @staticmethod
    def read_store_file(uri: str, store: str, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        """Chunks of a dataset file that lives in the store (an upload by reference). Only files inside
        the configured store are readable: the server never opens a path a client picks elsewhere."""
        from starlette.concurrency import run_in_threadpool

        from datastore import fs

        filesystem, path = fs.resolve(uri)
        _, root = fs.resolve(store)
        if not (path == root or path.startswith(root.rstrip("/") + "/")) or "/../" in f"{path}/":
            raise UserError(f"uri {uri!r} is not inside this server's store {store}")
        if not fs.exists(filesystem, path):
            raise UserError(f"uri {uri!r}: no such file in the store")

        async def chunks() -> AsyncIterator[bytes]:
            stream = await run_in_threadpool(filesystem.open_input_stream, path)
            try:
                while chunk := await run_in_threadpool(stream.read, chunk_bytes):
                    yield bytes(chunk)
            finally:
                stream.close()

        return chunks()


def _logits_gone(uri: str | None) -> bool:
    """Whether a done job's logits dataset is no longer in the store (`logitfuse store rm`, a deleted
    directory). Only a dataset known to be absent counts: a store that cannot be read now, or a dataset
    whose log is damaged, is not "gone"."""
    if not uri:
        return False
    from datastore.catalog import dataset_kind

    try:
        return dataset_kind(uri) is None
    except (UserError, OSError):
        return False


def _describe_model(model: str) -> dict:
    """Architecture facts from a local model's config.json (read here rather than through the HF backend,
    so the API process never imports torch)."""
    path = Path(model) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: cfg[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers") if k in cfg}


def _mkstemp(root: Path) -> tuple[int, str]:
    from datastore.fs import local_temp_file

    return local_temp_file(str(root), prefix=".upload-")  # the umask's mode, not mkstemp's 0600


class JobService:
    """What the HTTP routes (and tests) call. Raises UserError for a bad request, LookupError for an
    unknown id."""

    def __init__(self, config: ServiceConfig, supervisor=None):
        self.config = config
        state = Path(config.state_dir or ".logitfuse-service")
        self.db = JobDB(state / "jobs.sqlite")
        limits = Limits(max_sample_bytes=config.max_sample_bytes, max_decoded_bytes=config.max_decoded_bytes)
        self.datasets = DatasetStore(state / "datasets", self.db, limits)
        self.supervisor = supervisor

    def teachers(self) -> list[dict]:
        workers = self.db.workers()
        out = []
        for t in self.config.teachers:
            out.append({
                "name": t.name, "backend": t.backend, "max_k": t.max_k, "max_length": t.max_length,
                "chat_template": t.chat_template, "dtype": t.dtype, "devices": t.devices,
                "tensor_parallel_size": t.tensor_parallel_size, "model": _describe_model(t.model),
                "worker": workers.get(t.name, {}).get("state", "stopped"),
            })
        return out

    def _teacher(self, name: str):
        t = self.config.teacher(name)
        if t is None:
            known = ", ".join(x.name for x in self.config.teachers)
            raise UserError(f"unknown teacher {name!r}; this server has: {known}")
        return t

    def check_settings(self, teacher: str, k: int, chat_template: str | None, max_length: int | None):
        t = self._teacher(teacher)
        if k > t.max_k:
            raise UserError(f"k={k} is above teacher {teacher!r}'s max_k={t.max_k}")
        template = chat_template or t.chat_template
        allowed = {"model", t.chat_template, *shared_templates()}
        if template not in allowed:
            raise UserError(f"chat_template {template!r}: use one of {', '.join(sorted(allowed))}")
        length = max_length or t.max_length
        if length > t.max_length:
            raise UserError(f"max_length={length} is above teacher {teacher!r}'s max_length={t.max_length}")
        return t, template, length

    def submit(self, dataset_id: str, teacher: str, k: int, chat_template: str | None, max_length: int | None,
               all_positions: bool, team: str) -> tuple[Job, bool]:
        """Queue a job for `team` (or return the team's existing one for the same settings, unless that one
        is done and its logits dataset is no longer in the store: then a new job computes it again, its
        `replaces` naming the old one). Raises UserError for bad settings or an unknown dataset,
        `QueueFull` past the team's queue limit."""
        t, template, length = self.check_settings(teacher, k, chat_template, max_length)
        ds = self.db.dataset(dataset_id)
        if ds is None:
            raise UserError(f"unknown dataset {dataset_id!r}: upload it first with POST /v1/datasets")
        key = job_key(dataset_id, t.name, k, template, length, all_positions, weights_stamp(t.model))
        found = self.db.find_job(key, team)
        stale = found if found is not None and found.state == "done" and _logits_gone(found.uri) else None
        job, created = self.db.create_job(key, t.name, dataset_id, k, template, length, all_positions, team,
                                          ds.samples, max_queued=self.config.queue_limit(team),
                                          stale=stale.id if stale else None)
        if created and stale is not None:
            job.replaces = stale.id
        if created and self.supervisor is not None:
            self.supervisor.job_queued(t.name)
        return job, created

    def job(self, job_id: str, principal: Principal | None = None) -> Job:
        """A job by id; raises LookupError when unknown, AuthError(403) when `principal` is given and the
        job belongs to another team (and the principal is no admin)."""
        job = self.db.job(job_id)
        if job is None:
            raise LookupError(f"unknown job id {job_id!r}")
        if principal is not None and not principal.owns(job.team):
            raise AuthError(403, f"job {job_id} belongs to team {job.team!r}; team {principal.team!r} "
                                 f"may only see and cancel its own jobs")
        return job

    def jobs(self, principal: Principal, state: str | None = None, teacher: str | None = None,
             limit: int = 100) -> list[Job]:
        """The principal's team's jobs (every team's with an admin token), newest first. Raises UserError
        for a `state` that is none of `STATES`."""
        if state is not None and state not in STATES:
            raise UserError(f"state {state!r}: expected one of {', '.join(STATES)}")
        team = None if principal.scope == "admin" else principal.team
        return self.db.jobs(state, teacher, limit, team=team)

    def cancel(self, job_id: str, principal: Principal | None = None) -> Job:
        """Cancel a queued or running job of the principal's team (AuthError(403) for another team's,
        `JobEnded` for a job that is already done, failed or cancelled, which stays as it is)."""
        job = self.job(job_id, principal)
        if job.state not in ACTIVE:
            raise JobEnded(job)
        job = self.db.cancel(job_id)
        if job.state != "cancelled":  # it ended between the two reads
            raise JobEnded(job)
        return job

    def topk(self, teacher: str, samples: list[dict], k: int, chat_template: str | None,
             max_length: int | None, all_positions: bool, timeout: float = 300) -> list[dict]:
        t, template, length = self.check_settings(teacher, k, chat_template, max_length)
        if len(samples) > self.config.max_topk_samples:
            raise UserError(f"{len(samples)} samples: /v1/topk takes at most {self.config.max_topk_samples}; "
                            f"submit a job for more")
        if self.supervisor is None:
            raise UserError("this service runs no teacher workers")
        return self.supervisor.topk(t.name, samples, k, template, length, all_positions, timeout)
