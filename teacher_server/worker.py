"""Teacher worker processes and the supervisor that runs them.

Each teacher runs in its own process (multiprocessing *spawn*: no CUDA or thread state is inherited),
pinned to the devices its config assigns. A worker loads its model once, then takes its teacher's
queued jobs from the job database one at a time and runs `teacher_server.extract.extract` on them (a
teacher with `engine: ray` holds a `teacher_server.ray_engine.RayPool` instead of a model and runs them on
its replicas on the cluster),
writing progress back after each batch; between batches (and when idle) it answers `/v1/topk` requests
that arrive on its request queue. Cancellation is seen within `CANCEL_POLL_S` while a job runs: a watcher
thread polls the job's state, and the worker stops at the next batch boundary or, with a torch backend, at
the next module of the batch's forward pass (a forward pre-hook raises), so a `DELETE` frees the teacher
within seconds however large the batch. The buffered, uncommitted samples are dropped and the committed
shards stay for a later resubmission to resume.

The supervisor (a thread of the API process) starts workers and, when `max_resident` limits how many
teachers may hold a model at once, asks an idle worker to release its model (the process exits) so that
a teacher with queued work can be loaded in its place. Workers die with the server (PR_SET_PDEATHSIG), so
a killed server never leaves a worker writing into a logits dataset that its successor resumes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from datastore.errors import UserError
from datastore.words import plural
from teacher_server.config import ServiceConfig, TeacherConfig
from teacher_server.jobs import JobDB, die_with_parent, lock_state_dir

POLL_S = 0.1
#: how often a running job's worker checks whether the job was cancelled (seconds)
CANCEL_POLL_S = 0.5


class TeacherUnavailable(Exception):
    """The teacher could not answer (its model failed to load, or its worker failed mid-request)."""


class _Cancelled(Exception):
    pass


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------- worker


def make_backend(t: TeacherConfig):
    """The backend a teacher config asks for, in this process (a worker after its devices are set, or a
    Ray replica: `engine` is not looked at here)."""
    if t.backend == "vllm":
        from teacher_server.backends.vllm import VLLMBackend

        return VLLMBackend(t.model, dtype=t.dtype, tensor_parallel_size=t.tensor_parallel_size,
                           max_model_len=t.max_length, max_logprobs=t.max_k,
                           gpu_memory_utilization=t.gpu_memory_utilization, scoring=t.vllm_scoring,
                           **t.vllm_args)
    from teacher_server.backends.hf import HFBackend

    device = t.devices[0] if t.devices else None
    if device and device.startswith("cuda"):
        device = "cuda:0"  # CUDA_VISIBLE_DEVICES already narrows the process to its devices
    return HFBackend(t.model, dtype=t.dtype, device=device)


def _assign_devices(t: TeacherConfig) -> None:
    cuda = [d.split(":", 1)[1] for d in t.devices if d.startswith("cuda:")]
    if cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(cuda)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}" if not isinstance(e, UserError) else (text[0] if text else "")


def score_records(backend, records: list[dict], k: int, template_spec: str, max_length: int,
                  all_positions: bool) -> list[dict]:
    """`/v1/topk`: validate, tokenise and score a few raw samples; over-long samples are refused, not cut."""
    from datastore.chat import parse_record
    from teacher_server.render import resolve_template, tokenize_sample

    samples = []
    for i, rec in enumerate(records):
        try:
            samples.append(parse_record(rec))
        except ValueError as e:
            raise UserError(f"samples[{i}]: {e}") from None
    template = resolve_template(template_spec, backend.tokenizer) if any(s.is_chat for s in samples) else None
    tokenized = []
    for i, s in enumerate(samples):
        ts = tokenize_sample(s, backend.tokenizer, template, 1 << 30, all_positions)
        if ts.num_tokens > max_length:
            raise UserError(f"samples[{i}] ({s.id!r}): {ts.num_tokens} tokens, above max_length={max_length}")
        if len(ts.positions) == 0:
            raise UserError(f"samples[{i}] ({s.id!r}): no position to score")
        tokenized.append(ts)
    scores = backend.score(tokenized, k)
    tok = backend.tokenizer
    out = []
    for ts, sc in zip(tokenized, scores, strict=True):
        out.append({
            "id": ts.sample_id,
            "input_ids": ts.input_ids.tolist(),
            "positions": ts.positions.tolist(),
            "targets": [tok.convert_ids_to_tokens(int(ts.input_ids[p + 1])) for p in ts.positions],
            "topk_ids": sc.topk_ids.tolist(),
            "topk_tokens": [tok.convert_ids_to_tokens(row) for row in sc.topk_ids.tolist()],
            "topk_logprobs": sc.topk_logprobs.tolist(),
            "gold_logprob": sc.gold_logprob.tolist(),
        })
    return out


class _CancelWatch:
    """While a job runs: a thread that polls the job's state every `CANCEL_POLL_S` and, once the job is no
    longer `running` (cancelled), sets `cancelled`; forward pre-hooks on the backend's torch modules (when
    it has any) raise `_Cancelled` from inside the forward pass once it is set, and so does the backend's
    `before_chunk` between chunks of the LM head. A context manager."""

    def __init__(self, db: JobDB, job_id: str, backend):
        self.db, self.job_id, self.backend = db, job_id, backend
        self.cancelled = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"cancel-watch-{job_id}", daemon=True)
        self._hooks: list = []
        #: set while the worker answers /v1/topk requests between batches: those forwards are not the job's
        self.paused = False

    def _watch(self) -> None:
        while not self._done.wait(CANCEL_POLL_S):
            try:
                job = self.db.job(self.job_id)
            except Exception:  # noqa: BLE001 - a busy or briefly unreadable database: look again later
                continue
            if job is None or job.state != "running":
                self.cancelled.set()
                return

    def _check(self, _module=None, _args=None) -> None:
        if self.cancelled.is_set() and not self.paused:
            raise _Cancelled

    def __enter__(self) -> _CancelWatch:
        model = getattr(self.backend, "model", None)
        if model is not None and hasattr(model, "modules"):  # a torch.nn.Module (HF backend)
            self._hooks = [m.register_forward_pre_hook(self._check) for m in model.modules()]
        self.backend.before_chunk = self._check  # the LM head runs outside the modules, chunk by chunk
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for h in self._hooks:
            h.remove()
        self.backend.before_chunk = None
        self._thread.join()


class _Worker:
    def __init__(self, t: TeacherConfig, store: str, db_path: str, requests, responses):
        self.t, self.store, self.requests, self.responses = t, store, requests, responses
        self.db = JobDB(db_path)
        self.backend = None
        self.release_after_job = False

    def handle(self, msg: tuple, busy: bool) -> None:
        kind = msg[0]
        if kind == "topk":
            _, req_id, payload = msg
            try:
                if hasattr(self.backend, "topk_records"):  # engine: ray
                    result = {"results": self.backend.topk_records(payload)}
                else:
                    result = {"results": score_records(self.backend, **payload)}
            except UserError as e:
                result = {"error": str(e), "status": 400}
            except Exception as e:  # noqa: BLE001 - reported to the caller, the worker keeps serving
                traceback.print_exc(file=sys.stderr)
                result = {"error": _one_line(e), "status": 500}
            self.responses.put((req_id, result))
        elif kind == "release":
            if busy:
                self.release_after_job = True
            else:
                raise _Stop
        elif kind == "stop":
            raise _Stop
        # "poke": a job was queued; returning is enough, the main loop claims it

    def drain(self, busy: bool) -> None:
        while True:
            try:
                msg = self.requests.get_nowait()
            except queue.Empty:
                return
            self.handle(msg, busy)

    def run_job(self, job) -> None:
        from datastore.chat import load_dataset
        from teacher_server.extract import ExtractSettings, extract

        ds = self.db.dataset(job.dataset_id)
        try:
            if ds is None:
                raise UserError(f"dataset {job.dataset_id} is no longer on this server")
            dataset = load_dataset(ds.path, skip_invalid=ds.skip_invalid)
            settings = ExtractSettings(
                k=job.k, chat_template=job.chat_template, max_length=job.max_length,
                all_positions=job.all_positions, batch_tokens=self.t.batch_tokens, shard_rows=self.t.shard_rows,
                team=getattr(job, "team", None) or None,  # recorded in the dataset's log (catalog: writer team)
                skip_invalid=ds.skip_invalid, top_p=self.t.top_p, within_nats=self.t.within_nats,
            )

            def on_batch(res) -> None:
                if watch.cancelled.is_set():
                    raise _Cancelled
                state = self.db.progress(
                    job.id, samples_done=res.samples_already_stored + res.samples_scored,
                    samples_scored=res.samples_scored, tokens=res.tokens, tokens_per_s=res.tokens_per_s,
                    run_seconds=res.seconds, truncated=res.truncated, logits_id=res.logits_id, uri=res.uri,
                )
                watch.paused = True
                try:
                    self.drain(busy=True)
                finally:
                    watch.paused = False
                if state != "running":
                    raise _Cancelled

            with _CancelWatch(self.db, job.id, self.backend) as watch:
                if self.t.engine == "ray":  # the teacher's replicas on the cluster (about twice a second)
                    res = self.backend.run(dataset, self.store, settings, progress=False, on_batch=on_batch)
                else:
                    res = extract(self.backend, dataset, self.store, self.t.name, settings, progress=False,
                                  on_batch=on_batch)
        except _Cancelled:
            return
        except _Stop:
            self.db.requeue(job.id)
            raise
        except Exception as e:  # noqa: BLE001 - a failed job is recorded; the worker goes on
            if not isinstance(e, UserError):
                traceback.print_exc(file=sys.stderr)
            self.db.finish(job.id, "failed", error=_one_line(e))
            return
        self.db.finish(
            job.id, "done", samples_done=res.samples_already_stored + res.samples_scored,
            samples_scored=res.samples_scored, tokens=res.tokens, tokens_per_s=res.tokens_per_s,
            run_seconds=res.seconds, logits_id=res.logits_id, uri=res.uri,
        )

    def main(self) -> None:
        name, pid = self.t.name, os.getpid()
        self.db.set_worker(name, pid, "loading")
        try:
            if self.t.engine == "ray":  # replicas start with the first job and stay for the next ones
                from teacher_server.ray_engine import RayPool

                self.backend = RayPool(self.t, self.t.ray)
                self.backend.pids()  # every replica's model loaded before the teacher is "ready"
            else:
                self.backend = make_backend(self.t)
        except Exception as e:  # noqa: BLE001 - every queued job learns why
            msg = f"teacher {name!r} failed to load: {_one_line(e)}"
            print(msg, file=sys.stderr)
            self.db.set_worker(name, pid, "failed", msg)
            self.db.fail_queued(name, msg)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # answer topk requests that are already waiting
                try:
                    msg_in = self.requests.get(timeout=0.2)
                except queue.Empty:
                    continue
                if msg_in[0] == "topk":
                    self.responses.put((msg_in[1], {"error": msg, "status": 503}))
            return
        self.db.set_worker(name, pid, "ready")
        try:
            while True:
                job = self.db.claim(name)
                if job is not None:
                    self.db.set_worker(name, pid, "busy", job.id)
                    self.run_job(job)
                    self.db.set_worker(name, pid, "ready")
                    continue
                if self.release_after_job:
                    break
                try:
                    msg = self.requests.get(timeout=POLL_S * 2)
                except queue.Empty:
                    continue
                self.handle(msg, busy=False)
        except _Stop:
            pass
        finally:
            self.backend.close()
            self.db.set_worker(name, None, "stopped")


def worker_main(teacher_json: str, store: str, db_path: str, requests, responses, parent_pid: int) -> None:
    """Entry point of a teacher worker process (spawned)."""
    die_with_parent(parent_pid)
    # A process group of its own: vLLM starts engine processes that would outlive a killed worker; the
    # supervisor kills the whole group (now, or at the next start after a crash) so no model stays loaded.
    os.setpgid(0, 0)
    t = TeacherConfig.model_validate_json(teacher_json)
    _assign_devices(t)
    _Worker(t, store, db_path, requests, responses).main()


# ---------------------------------------------------------------------------------------------- supervisor


def kill_group(pgid: int | None) -> None:
    """SIGKILL what is left of a worker's process group (never our own group)."""
    import signal

    if not pgid or pgid == os.getpgid(0):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class _Handle:
    process: mp.process.BaseProcess
    requests: object
    responses: object
    started: float = field(default_factory=time.monotonic)
    releasing: bool = False


class Supervisor:
    """Starts, stops and rotates the teacher worker processes of one server."""

    def __init__(self, config: ServiceConfig, db: JobDB):
        self.config, self.db = config, db
        self.ctx = mp.get_context("spawn")
        self.workers: dict[str, _Handle] = {}
        self._lock = threading.RLock()
        self._topk_locks = {t.name: threading.Lock() for t in config.teachers}
        self._topk_waiting: dict[str, int] = {t.name: 0 for t in config.teachers}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Take the state directory (`lock_state_dir`: a `UserError` while another server holds it, before
        anything is touched), kill what a killed server left behind, requeue its running jobs, and start
        the supervising thread."""
        lock_state_dir(os.path.dirname(self.db.path))  # `serve` took it already; this is for other callers
        for w in self.db.workers().values():  # leftovers of a server that was killed
            kill_group(w.get("pid"))
        n = self.db.requeue_running()
        if n:
            print(f"resuming {plural(n, 'job')} left running by a previous server", file=sys.stderr)
        for t in self.config.teachers:
            self.db.set_worker(t.name, None, "stopped")
        self._thread = threading.Thread(target=self._loop, name="teacher-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for h in self.workers.values():
                h.requests.put(("stop",))
            deadline = time.monotonic() + timeout
            for h in self.workers.values():
                h.process.join(max(0.1, deadline - time.monotonic()))
                if h.process.is_alive():
                    h.process.kill()
                    h.process.join(2)
                kill_group(h.process.pid)
            self.workers.clear()

    def wake(self) -> None:
        self._wake.set()

    def job_queued(self, teacher: str) -> None:
        """Wake the teacher's idle worker now rather than at its next poll."""
        with self._lock:
            h = self.workers.get(teacher)
            if h is not None and h.process.is_alive() and not h.releasing:
                h.requests.put(("poke",))
        self.wake()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the supervisor must outlive one bad tick
                traceback.print_exc(file=sys.stderr)
            self._wake.wait(0.25)
            self._wake.clear()

    def _start_worker(self, t: TeacherConfig) -> None:
        requests, responses = self.ctx.Queue(), self.ctx.Queue()
        p = self.ctx.Process(
            target=worker_main, name=f"teacher-{t.name}",
            args=(t.model_dump_json(), self.config.store, self.db.path, requests, responses, os.getpid()),
        )
        p.start()
        self.workers[t.name] = _Handle(p, requests, responses)

    def _tick(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            for name, h in list(self.workers.items()):
                if not h.process.is_alive():
                    h.process.join(0)
                    kill_group(h.process.pid)
                    del self.workers[name]
                    if h.process.exitcode not in (0, None):
                        # a crashed worker (OOM, segfault): its running job goes back to the queue
                        self.db.requeue_teacher(name, max_attempts=3)
                    self.db.set_worker(name, None, "stopped")
            counts = self.db.counts()
            wanting = [
                t for t in self.config.teachers
                if counts.get((t.name, "queued"), 0) or self._topk_waiting[t.name] or self.config.max_resident is None
            ]
            limit = self.config.max_resident or len(self.config.teachers)
            for t in wanting:
                if t.name in self.workers:
                    continue
                if len(self.workers) < limit:
                    self._start_worker(t)
                    continue
                # full: release one resident teacher that has nothing to do
                for name, h in self.workers.items():
                    busy = counts.get((name, "queued"), 0) + counts.get((name, "running"), 0) + self._topk_waiting[name]
                    if not busy and not h.releasing:
                        h.releasing = True
                        h.requests.put(("release",))
                        break
                break  # one rotation at a time, oldest-configured teacher first

    def resident(self) -> list[str]:
        with self._lock:
            return [n for n, h in self.workers.items() if h.process.is_alive()]

    # -------------------------------------------------------------- synchronous top-k

    def topk(self, teacher: str, samples: list[dict], k: int, chat_template: str, max_length: int,
             all_positions: bool, timeout: float) -> list[dict]:
        payload = {"records": samples, "k": k, "template_spec": chat_template, "max_length": max_length,
                   "all_positions": all_positions}
        req_id = secrets.token_hex(8)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._topk_waiting[teacher] += 1
        self.wake()
        try:
            with self._topk_locks[teacher]:
                sent_to = None
                while time.monotonic() < deadline:
                    with self._lock:
                        h = self.workers.get(teacher)
                    if h is None or not h.process.is_alive() or h.releasing:
                        self.wake()
                        time.sleep(POLL_S)
                        continue
                    if sent_to is not h:
                        h.requests.put(("topk", req_id, payload))
                        sent_to = h
                    try:
                        rid, result = h.responses.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if rid != req_id:
                        continue  # a late answer to a request that timed out
                    if "error" in result:
                        raise UserError(result["error"]) if result["status"] == 400 else TeacherUnavailable(result["error"])
                    return result["results"]
            raise TimeoutError(f"teacher {teacher!r} did not answer within {timeout:.0f}s")
        finally:
            with self._lock:
                self._topk_waiting[teacher] -= 1
