"""Extraction on a Ray cluster: one job, many scoring replicas, one logits dataset.

`RayPool` keeps a teacher's replicas — Ray actors that each hold one backend (HF, or a vLLM engine with
its own tensor parallelism), placed by Ray with the CPUs/GPUs of `teacher_server.config.RayConfig` — and
runs jobs on them (`RayPool.run`, what `extract --ray` and a service teacher with `engine: ray` call):

1. the driver loads only the tokenizer (and hashes the weights for the revision), then validates and
   tokenises the dataset as Ray tasks on CPU workers, chunk by chunk; refused samples are reported as
   `extract` reports them; the tokenised chunks stay in Ray's object store;
2. the driver opens (or creates) the logits dataset and stores the tokenizer, as `extract` does;
3. every replica runs the same many-writer loop as concurrent `extract` processes
   (`teacher_server.extract.fill`): claim a range under a lease, fetch its tokenised samples, score them
   in length-bucketed batches, commit the range as one shard with its Delta application transaction.
   Replicas are just more writers: exactly once comes from the leases and commits
   (`datastore.shards.ShardedWriter.claims`), not from Ray;
4. replicas send their counters after every batch to a Ray queue; the driver sums them into the CLI's bar
   (samples, tokens/s, ETA) or the service's job status (`on_batch`), and marks the dataset complete.

Faults: a replica whose process dies loses only its uncommitted range; the surviving replicas take the
range over (at once on the same host, after the lease — 60 s by default — on another) and Ray restarts
the replica (`max_restarts`), whose run resumes with the ranges still open. If the driver dies, Ray ends
its replicas; the same command resumes (committed ranges are never scored again).

Ray is an optional extra (`pip install 'logitfuse[ray]'`), imported only here, inside functions.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from datastore.chat import Dataset, Problem
from datastore.errors import UserError
from datastore.fs import save_tokenizer
from datastore.manifest import LogitsMeta
from datastore.reuse import ReuseIndex, scoring_key
from datastore.words import plural
from teacher_server.config import RayConfig, TeacherConfig
from teacher_server.extract import (
    ExtractResult,
    ExtractSettings,
    NonFiniteScores,
    _located,
    check_settings,
    check_store,
    dataset_template,
    fill,
    logits_meta,
    new_result,
    open_writer,
    progress_bar,
    refuse_or_skip,
    store_errors,
)

#: samples per tokenisation task
CHUNK_SAMPLES = 256
#: seconds a stopped job's replicas get to reach a batch boundary before they are killed
STOP_GRACE_S = 10.0
#: environment variables of the driver that replicas get too (store credentials, lease length, team)
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "LOGITFUSE_S3_ENDPOINT", "LOGITFUSE_LEASE_SECONDS", "LOGITFUSE_TEAM",
    "LOGITFUSE_WEIGHTS_CACHE", "HF_HOME", "HF_HUB_OFFLINE",
)
INSTALL_HINT = "pip install 'logitfuse[ray]'"


def import_ray():
    """The `ray` module; UserError (one line naming the extra to install) when Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray / engine: ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str):
    """Connect this process to the Ray cluster at `address` (`local` starts one on this machine, which
    ends with this process) unless it already is; returns the `ray` module. UserError when unreachable."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    import logging

    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ray address {address!r}: cannot connect to a Ray cluster ({first}); use 'local', "
                        f"'auto' or the head's host:port") from None
    return ray


def check_fits(resources: dict, options: RayConfig) -> None:
    """Refuse (UserError, one line) a pool the cluster cannot hold at once: replicas keep their CPUs and
    GPUs for the whole job, and tokenisation tasks need `tokenize_cpus` beside them, so a pool that takes
    every CPU would wait forever. `resources` is `ray.cluster_resources()` (current, not autoscaled)."""
    cpus = options.replicas * options.num_cpus + options.tokenize_cpus
    have_cpus = float(resources.get("CPU", 0))
    if cpus > have_cpus + 1e-9:
        raise UserError(
            f"ray: {plural(options.replicas, 'replica')} x {options.num_cpus:g} CPU + {options.tokenize_cpus:g} CPU for "
            f"tokenising = {cpus:g} CPUs, but the cluster has {have_cpus:g}: give each replica fewer CPUs "
            f"(fractions are fine, e.g. num_cpus 0.5 / --replica-cpus 0.5) or fewer replicas"
        )
    gpus = options.replicas * options.num_gpus
    have_gpus = float(resources.get("GPU", 0))
    if gpus > have_gpus + 1e-9:
        raise UserError(f"ray: {plural(options.replicas, 'replica')} x {options.num_gpus:g} GPU = {gpus:g} GPUs, but the "
                        f"cluster has {have_gpus:g}")


@dataclass
class _Identity:
    """What `logits_meta` needs of a backend, without loading the model: tokenizer and weights revision."""

    tokenizer: object
    revision: str


def _tokenize_chunk(samples, tokenizer, template, max_length: int, all_positions: bool, scoring: str):
    """(Ray task, CPU) Validate and tokenise samples: ([(id, reason)] refused + {id: content key}, the
    `TokenizedSample`s of the others)."""
    from datastore.reuse import sample_key
    from teacher_server.render import checked_samples

    refused, keys, tokenized = [], {}, []
    for sample, (ts, reason) in zip(samples, checked_samples(samples, tokenizer, template, max_length,
                                                             all_positions), strict=True):
        if ts is None:
            refused.append((sample.id, f"id {sample.id!r}: {reason}"))
        else:
            keys[sample.id] = sample_key(scoring, ts.text, ts.input_ids, ts.loss_mask, ts.positions)
            tokenized.append(ts)
    return (refused, keys), tokenized


class _Stopped(Exception):
    pass


class Replica:
    """(Ray actor) One scoring replica: a backend loaded once, then jobs (`run`) and `/v1/topk` requests
    (`score_records`). Runs two calls at once, so `stop` and `pid` answer while a job runs."""

    def __init__(self, teacher: TeacherConfig):
        from teacher_server.worker import make_backend

        self.backend = make_backend(teacher)
        self._stopped: set[str] = set()

    def pid(self) -> int:
        return os.getpid()

    def stop(self, job_token: str) -> None:
        self._stopped.add(job_token)

    def score_records(self, payload: dict) -> list[dict]:
        from teacher_server.worker import score_records

        return score_records(self.backend, **payload)

    def run(self, job: dict) -> tuple[str, ExtractResult]:
        """Fill the job's dataset as one more writer; returns (this run's token, its counters)."""
        import ray

        run_token = uuid.uuid4().hex
        settings: ExtractSettings = job["settings"]
        meta = LogitsMeta.model_validate(job["meta"])
        result = ExtractResult(uri=job["uri"], logits_id=job["logits_id"])
        chunk_of, refs, progress = job["chunk_of"], job["chunk_refs"], job["progress"]
        cache: dict[int, dict] = {}

        def check_stop() -> None:
            if job["token"] in self._stopped:
                raise _Stopped

        def window_of(ids: list[str]):
            check_stop()
            out = []
            for sid in ids:
                c = chunk_of[sid]
                if c not in cache:
                    if len(cache) >= 4:
                        cache.pop(next(iter(cache)))
                    cache[c] = {ts.sample_id: ts for ts in ray.get(refs[c])}
                out.append(cache[c][sid])
            return out

        def on_batch(res: ExtractResult) -> None:
            progress.put_nowait.remote((run_token, res))  # fire and forget; ordered per caller
            check_stop()

        t0 = time.perf_counter()
        with store_errors(job["store"]):
            writer = open_writer(job["uri"], meta, settings)
            reuse = None
            if settings.reuse:
                reuse = ReuseIndex.build(job["store"], meta, writer.codec.describe(), exclude_uri=job["uri"])
            try:
                fill(writer, self.backend, job["ids"], job["keys"], window_of, settings, result, reuse, t0, None,
                     on_batch)
            except _Stopped:
                pass
        result.seconds = time.perf_counter() - t0
        return run_token, result


class RayPool:
    """A teacher's scoring replicas on a Ray cluster, started on the first job and kept for later ones.

    Args:
        teacher: the backend each replica loads (`backend`, `model`, `dtype`, `max_k`, `max_length`, ...).
        options: cluster address, number of replicas, resources per replica and per tokenisation task.
    Raises:
        UserError: Ray not installed, cluster unreachable, tokenizer not loadable.
    """

    def __init__(self, teacher: TeacherConfig, options: RayConfig):
        from transformers import AutoTokenizer

        from teacher_server.weights import weights_revision

        self.teacher, self.options = teacher, options
        self.ray = connect(options.address)
        check_fits(self.ray.cluster_resources(), options)
        try:
            tokenizer = AutoTokenizer.from_pretrained(teacher.model)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"teacher {teacher.model}: cannot load a tokenizer from it ({first})") from e
        self.identity = _Identity(tokenizer, weights_revision(teacher.model))
        self._replicas: list = []
        self.startup_seconds = 0.0  # time the last replica start took (model loads), for benches

    # -------------------------------------------------------------- replicas

    def _actor_class(self):
        env = {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **self.options.env}
        runtime_env: dict = {"env_vars": env} if env else {}
        if self.options.python:
            runtime_env["py_executable"] = self.options.python
        return self.ray.remote(Replica).options(
            num_cpus=self.options.num_cpus, num_gpus=self.options.num_gpus, max_concurrency=2,
            max_restarts=self.options.max_restarts, max_task_retries=self.options.max_restarts,
            runtime_env=runtime_env or None,
        )

    def _ensure_replicas(self) -> None:
        missing = self.options.replicas - len(self._replicas)
        if missing <= 0:
            return
        t0 = time.perf_counter()
        cls = self._actor_class()
        self._replicas += [cls.remote(self.teacher) for _ in range(missing)]
        try:
            self.ray.get([r.pid.remote() for r in self._replicas])  # every model loaded
        except self.ray.exceptions.RayError as e:
            self._kill_replicas()
            raise UserError(f"teacher {self.teacher.name!r}: a Ray replica failed to start "
                            f"({_ray_error_line(e)})") from None
        self.startup_seconds = time.perf_counter() - t0

    def pids(self) -> list[int]:
        """The process id of every replica (started if needed)."""
        self._ensure_replicas()
        return self.ray.get([r.pid.remote() for r in self._replicas])

    def _kill_replicas(self) -> None:
        for r in self._replicas:
            self.ray.kill(r, no_restart=True)
        self._replicas = []

    def close(self) -> None:
        """End the replicas (models freed); a later job starts new ones."""
        self._kill_replicas()

    def topk_records(self, payload: dict) -> list[dict]:
        """`/v1/topk` on one replica (`teacher_server.worker.score_records`'s payload)."""
        self._ensure_replicas()
        try:
            return self.ray.get(self._replicas[0].score_records.remote(payload))
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise

    # -------------------------------------------------------------- jobs

    def run(
        self,
        dataset: Dataset,
        store_uri: str,
        settings: ExtractSettings | None = None,
        progress: bool = True,
        on_batch: Callable[[ExtractResult], None] | None = None,
    ) -> ExtractResult:
        """`teacher_server.extract.extract` on the cluster: same logits dataset, same checks, same errors.

        `on_batch(result)` gets the summed counters of every replica (samples, tokens, tokens/s) about
        twice a second; raising from it stops the job (the replicas stop at their next batch boundary,
        or are killed after `STOP_GRACE_S`; committed shards stay for a resume)."""
        ray = self.ray
        settings = check_settings(settings or ExtractSettings())
        tok = self.identity.tokenizer
        template = dataset_template(dataset, settings, tok)
        meta = logits_meta(self.identity, dataset, self.teacher.name, settings)
        result = new_result(store_uri, meta)

        # validate and tokenise on CPU workers; only the refusals come back here
        task = ray.remote(_tokenize_chunk).options(num_cpus=self.options.tokenize_cpus, num_returns=2)
        tok_ref = ray.put(tok)
        chunks = [dataset.samples[i : i + CHUNK_SAMPLES] for i in range(0, len(dataset.samples), CHUNK_SAMPLES)]
        scoring = scoring_key(meta)
        pairs = [task.remote(c, tok_ref, template, settings.max_length, settings.all_positions, scoring)
                 for c in chunks]
        refused, keys = [], {}
        for chunk_refused, chunk_keys in ray.get([p[0] for p in pairs]):
            refused += chunk_refused
            keys.update(chunk_keys)
        bad = {sid for sid, _ in refused}
        ids = [s.id for s in dataset.samples if s.id not in bad]
        refuse_or_skip(dataset, [Problem(sid, reason) for sid, reason in refused], bool(ids), settings, result)
        chunk_of = {s.id: i // CHUNK_SAMPLES for i, s in enumerate(dataset.samples) if s.id not in bad}

        check_store(store_uri)
        with store_errors(store_uri):
            writer = open_writer(result.uri, meta, settings)
            save_tokenizer(result.uri, tok)
            wanted = set(ids)
            before = len(writer.done_ids & wanted)
            self._ensure_replicas()
            t0 = time.perf_counter()
            result.samples_already_stored = before
            bar = progress_bar(len(ids), before, self.teacher.name) if progress else None
            from ray.util.queue import Queue

            queue = Queue(actor_options={"num_cpus": 0})
            job = {"token": uuid.uuid4().hex, "settings": settings, "meta": meta.model_dump(mode="json"),
                   "uri": result.uri, "logits_id": result.logits_id, "store": store_uri, "ids": ids, "keys": keys,
                   "chunk_of": chunk_of, "chunk_refs": [p[1] for p in pairs], "progress": queue.actor}
            latest: dict[str, ExtractResult] = {}
            try:
                self._drive(job, queue, latest, result, before, len(ids), t0, bar, on_batch)
            finally:
                if bar is not None:
                    bar.close()
                ray.kill(queue.actor)
            writer.refresh()
            scored_now = len(writer.done_ids & wanted) - before
            _sum_into(result, latest.values())
            result.samples_scored = scored_now - result.samples_reused
            result.samples_already_stored = len(ids) - result.samples_scored
            result.seconds = time.perf_counter() - t0
            if result.nonfinite:
                result.nonfinite = _located(dataset, result.nonfinite)
                if not settings.skip_invalid:
                    raise NonFiniteScores(result.nonfinite)
            writer.close()  # every sample is committed: mark the dataset complete
        return result

    def _drive(self, job: dict, queue, latest: dict, result: ExtractResult, before: int, total: int,
               t0: float, bar, on_batch) -> None:
        """Run the job on every replica until all return; progress from the queue into bar / on_batch."""
        ray = self.ray
        pending = [r.run.remote(job) for r in self._replicas]
        failed: list[str] = []
        finished: set[str] = set()  # runs whose final counters arrived: later queue items are older
        shown = before

        def report() -> None:
            nonlocal shown
            while not queue.empty():
                token, res = queue.get_nowait()
                if token not in finished:
                    latest[token] = res
            live = ExtractResult(uri=result.uri, logits_id=result.logits_id)
            _sum_into(live, latest.values())
            live.seconds = time.perf_counter() - t0
            done = min(total, before + live.samples_scored + live.samples_reused)
            live.samples_already_stored = before + live.samples_reused
            if bar is not None and done > shown:
                bar.update(done - shown)
                shown = done
                bar.set_postfix(tok_s=f"{live.tokens_per_s:,.0f}")
            if on_batch is not None:
                on_batch(live)

        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in ready:
                    try:
                        token, res = ray.get(ref)
                        latest[token] = res
                        finished.add(token)
                    except ray.exceptions.RayTaskError as e:
                        if isinstance(e.cause, UserError):
                            raise e.cause from None
                        raise UserError(f"teacher {self.teacher.name!r}: a replica failed "
                                        f"({_ray_error_line(e)})") from None
                    except ray.exceptions.RayActorError as e:
                        failed.append(_ray_error_line(e))
                        print(f"warning: a replica of {self.teacher.name!r} died ({failed[-1]}); the other "
                              f"replicas take its ranges over", file=sys.stderr)
                report()
            if len(failed) == len(self._replicas):
                raise UserError(f"teacher {self.teacher.name!r}: every Ray replica died (first: {failed[0]}); "
                                f"committed shards are kept, rerun to resume")
        except BaseException:
            self._stop(job, pending)
            raise
        finally:
            if failed:
                self._replicas = [r for r in self._replicas if _alive(ray, r)]

    def _stop(self, job: dict, pending: list) -> None:
        """Ask every replica to stop the job; kill the ones still busy after `STOP_GRACE_S`."""
        ray = self.ray
        for r in self._replicas:
            r.stop.remote(job["token"])
        if pending:
            _, still = ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S)
            if still:
                self._kill_replicas()


def _alive(ray, replica) -> bool:
    try:
        ray.get(replica.pid.remote(), timeout=30)
        return True
    except Exception:  # noqa: BLE001 - dead, restarting too long, or unreachable: start a new one next job
        ray.kill(replica, no_restart=True)
        return False


def _sum_into(total: ExtractResult, parts) -> None:
    """Add the counters of the replicas' runs (`parts`) into `total` (non-finite samples once each)."""
    seen = {p.where for p in total.nonfinite}
    for p in parts:
        total.samples_scored += p.samples_scored
        total.samples_reused += p.samples_reused
        total.samples_lost_to_others += p.samples_lost_to_others
        total.shards_copied += p.shards_copied
        total.tokens += p.tokens
        total.padded_tokens += p.padded_tokens
        total.positions += p.positions
        total.truncated += p.truncated
        total.truncated_ids += p.truncated_ids
        for prob in p.nonfinite:
            if prob.where not in seen:
                seen.add(prob.where)
                total.nonfinite.append(prob)


def _ray_error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
