"""Extraction driver: one teacher over one dataset into the datastore, resumable.

Any number of `extract` processes (CLI runs, service workers) may work on the same logits dataset at
once: the writer hands out ranges of the input's samples under expiring leases
(`datastore.shards.ShardedWriter.claims`), each range is tokenised, sorted by length and cut into
batches under a token budget (bucketing, so padding wastes little compute), scored by a `Backend`, and
committed as one shard. A range whose holder died is taken over once its lease expires; a re-run after an
interruption scores only what is not committed, so every sample lands exactly once. Samples that an
earlier dataset of the store scored with the same settings are copied, not scored (`datastore.reuse`).

Before anything is opened in the store, every sample is rendered with the teacher's template and
tokenised (`usable_samples`): a sample the template refuses or the tokenizer rejects, or one with no
position left to score within `max_length`, is reported with its line and rejects the run, or is skipped
with `skip_invalid`. A sample whose scores come back non-finite (fp16 overflow) is never stored; the
others are, and the run then fails naming it (`NonFiniteScores`), or reports and leaves it out with
`skip_invalid`.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from datastore.chat import Dataset, Problem, Sample, iter_records
from datastore.codec import truncate_topk
from datastore.errors import UserError
from datastore.fs import check_local_directory, is_local, resolve, save_tokenizer
from datastore.manifest import LogitsMeta, logits_id
from datastore.reuse import ReuseIndex, ReusePlan, sample_key, scoring_key
from datastore.sample import ScoredSample
from datastore.words import plural
from datastore.writer import LogitsWriter
from teacher_server.backends.base import Backend, TopK
from teacher_server.batching import plan_batches
from teacher_server.render import (
    TokenizedSample,
    checked_samples,
    resolve_template,
    tokenize_samples,
    tokenizer_fingerprint,
)


@dataclass
class ExtractSettings:
    k: int = 10
    chat_template: str = "model"
    max_length: int = 2048
    all_positions: bool = False
    batch_tokens: int = 16384  # padded tokens per forward batch (real tokens on a packing engine: vLLM)
    shard_rows: int = 512  # samples per shard and claimed range, when this run creates the dataset
    lease_seconds: float = field(default_factory=lambda: float(os.environ.get("LOGITFUSE_LEASE_SECONDS", "60")))
    team: str | None = None  # recorded in the dataset's log (default $LOGITFUSE_TEAM)
    reuse: bool = True  # copy samples that earlier datasets of the store scored with the same settings
    skip_invalid: bool = False  # skip samples the template/tokenizer refuse or that score non-finite
    # truncation (`datastore.codec.truncate_topk`): per position keep only the entries covering this
    # probability mass / within this many nats of the top-1; part of the logits id when set
    top_p: float | None = None
    within_nats: float | None = None

    def truncation(self) -> dict:
        """The truncation settings that are set, as recorded in `LogitsMeta.extra` (empty: none)."""
        cuts = (("top_p", self.top_p), ("within_nats", self.within_nats))
        # within_nats=inf keeps every entry: no cut, so the same logits id as no truncation
        return {name: v for name, v in cuts if v is not None and not (name == "within_nats" and v == math.inf)}


@dataclass
class ExtractResult:
    uri: str
    logits_id: str
    samples_scored: int = 0
    samples_already_stored: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    positions: int = 0
    truncated: int = 0
    seconds: float = 0.0
    truncated_ids: list[str] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)  # refused by the template or tokenizer (skip_invalid)
    nonfinite: list[Problem] = field(default_factory=list)  # scored non-finite, not stored
    samples_lost_to_others: int = 0  # scored here, but another writer committed their range first
    samples_reused: int = 0  # copied from an earlier dataset of the store with the same scoring settings
    shards_copied: int = 0  # earlier datasets' shards copied whole (renamed, not decoded): part of the above

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def logits_meta(backend: Backend, dataset: Dataset, teacher_name: str, settings: ExtractSettings) -> LogitsMeta:
    return LogitsMeta(
        dataset_id=dataset.dataset_id,
        teacher_name=teacher_name,
        teacher_revision=backend.revision,
        tokenizer_fingerprint=tokenizer_fingerprint(backend.tokenizer),
        k=settings.k,
        chat_template=settings.chat_template,
        max_length=settings.max_length,
        all_positions=settings.all_positions,
        extra=settings.truncation(),
    )


def extract(
    backend: Backend,
    dataset: Dataset,
    store_uri: str,
    teacher_name: str,
    settings: ExtractSettings | None = None,
    progress: bool = True,
    on_batch: Callable[[ExtractResult], None] | None = None,
) -> ExtractResult:
    """Score every sample of `dataset` not yet stored and commit them under `STORE/logits/<id>`.

    Returns when every sample of the dataset is committed — by this process or by concurrent ones (ranges
    leased by live writers are waited for, ranges of dead ones taken over) — and the dataset is marked
    complete. Raises UserError for bad settings, refused samples, or a dataset that holds other logits."""
    settings = check_settings(settings or ExtractSettings())
    tok = backend.tokenizer
    template = dataset_template(dataset, settings, tok)
    meta = logits_meta(backend, dataset, teacher_name, settings)
    result = new_result(store_uri, meta)
    scoring = scoring_key(meta)
    samples, keys = usable_samples(dataset, tok, template, settings, result, scoring)  # before anything is stored
    check_store(store_uri)
    t0 = time.perf_counter()
    with store_errors(store_uri), open_writer(result.uri, meta, settings) as writer:
        save_tokenizer(result.uri, tok)
        by_id = {s.id: s for s in samples}
        result.samples_already_stored = len(writer.done_ids & by_id.keys())
        bar = progress_bar(len(samples), result.samples_already_stored, teacher_name) if progress else None

        def window_of(sample_ids: list[str]) -> list[TokenizedSample]:
            # only the samples to score are tokenised again (the input check kept their keys, not tokens)
            window = tokenize_samples([by_id[sid] for sid in sample_ids], tok, template, settings.max_length,
                                      settings.all_positions)
            for ts in window:  # checked at the start: only a tokenizer that changed since gets here
                if isinstance(ts, UserError):
                    raise ts
            return window

        encoding = writer.codec.describe()
        reuse = ReuseIndex.build(store_uri, meta, encoding, exclude_uri=result.uri) if settings.reuse else None
        fill(writer, backend, list(by_id), keys, window_of, settings, result, reuse, t0, bar, on_batch)
        if bar is not None:
            bar.close()
        result.samples_already_stored = len(samples) - result.samples_scored  # incl. reused ones
        if result.nonfinite:
            result.nonfinite = _located(dataset, result.nonfinite)
            if not settings.skip_invalid:
                writer.flush()  # every other sample is committed; the dataset is not marked complete
                raise NonFiniteScores(result.nonfinite)
    result.seconds = time.perf_counter() - t0
    return result


def check_settings(settings: ExtractSettings) -> ExtractSettings:
    """`settings` if its values are usable; raises UserError naming the first bad one."""
    if not 1 <= settings.k <= 1024:
        raise UserError(f"k={settings.k}: must be between 1 and 1024")
    if settings.max_length < 2:
        raise UserError(f"max_length={settings.max_length}: must be at least 2")
    if settings.batch_tokens < 1:
        raise UserError(f"batch_tokens={settings.batch_tokens}: must be at least 1")
    if settings.shard_rows < 1:
        raise UserError(f"shard_rows={settings.shard_rows}: must be at least 1")
    if settings.top_p is not None and not 0.0 < settings.top_p <= 1.0:
        raise UserError(f"top_p={settings.top_p}: must be in (0, 1]")
    if settings.within_nats is not None and not settings.within_nats >= 0.0:
        raise UserError(f"within_nats={settings.within_nats}: must be >= 0")
    return settings


def dataset_template(dataset: Dataset, settings: ExtractSettings, tokenizer) -> str | None:
    """The Jinja source chats are rendered with (None for a plain-text dataset)."""
    if any(s.is_chat for s in dataset.samples):
        return resolve_template(settings.chat_template, tokenizer)
    return None


def new_result(store_uri: str, meta: LogitsMeta) -> ExtractResult:
    """An empty result for the logits dataset of `meta` in `store_uri`."""
    lid = logits_id(meta)
    return ExtractResult(uri=f"{store_uri.rstrip('/')}/logits/{lid}", logits_id=lid)


def open_writer(uri: str, meta: LogitsMeta, settings: ExtractSettings) -> LogitsWriter:
    """The many-writer logits writer on `uri` (created with `settings.shard_rows` ranges if new)."""
    return LogitsWriter(uri, meta, shard_rows=settings.shard_rows, team=settings.team,
                        lease_seconds=settings.lease_seconds)


def progress_bar(total: int, initial: int, teacher_name: str):
    """The CLI's tqdm bar on stderr (samples; tokens/s in its postfix, ETA from tqdm's rate)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="sample", desc=f"{teacher_name}", file=sys.stderr,
                dynamic_ncols=True)


def fill(
    writer: LogitsWriter,
    backend: Backend,
    sample_ids: list[str],
    keys: dict[str, str],
    window_of: Callable[[list[str]], list[TokenizedSample]],
    settings: ExtractSettings,
    result: ExtractResult,
    reuse: ReuseIndex | None,
    t0: float,
    bar=None,
    on_batch: Callable[[ExtractResult], None] | None = None,
) -> None:
    """One writer's share of a job: claim ranges of `sample_ids` (`ShardedWriter.claims`), copy what
    `reuse` holds (by each sample's content key in `keys`), score the rest with `backend` in
    length-bucketed batches, commit each range as one shard.

    `window_of(ids)` gives the tokenised samples of those ids, in order (tokenised here, or by the CPU
    workers of a Ray job). Counters accumulate into `result` (samples, tokens, positions, non-finite
    samples, which are never stored); `on_batch(result)` runs after every batch. Returns when every sample
    is committed by some writer, except the non-finite ones this writer gave up on."""
    encoding = writer.codec.describe()
    nonfinite_ids: set[str] = set()
    for claim in writer.claims(sample_ids, exclude=nonfinite_ids):
        plan = ReusePlan()
        if reuse is not None and len(reuse):  # samples an earlier dataset already scored: copied
            plan = reuse.plan([(keys[sid], sid) for sid in claim.sample_ids], encoding)
        reused = plan.sample_ids
        scored: list[ScoredSample] = list(plan.samples.values())
        reused_here = len(reused)
        if reused_here:
            result.samples_reused += reused_here
            result.samples_already_stored += reused_here  # progress counts them as stored
            if bar is not None:
                bar.update(reused_here)
            if on_batch is not None:
                on_batch(result)
        window = window_of([sid for sid in claim.sample_ids if sid not in reused])
        packed = getattr(backend, "packs_sequences", False)
        for idx in plan_batches([t.num_tokens for t in window], settings.batch_tokens, packed=packed):
            batch: list[TokenizedSample] = [window[i] for i in idx]
            scores = backend.score(batch, settings.k)
            for ts, sc in zip(batch, scores, strict=True):
                if (reason := nonfinite_reason(ts, sc)) is not None:
                    result.nonfinite.append(Problem(ts.sample_id, reason))
                    nonfinite_ids.add(ts.sample_id)
                    continue
                if cuts := settings.truncation():
                    sc.topk_ids, sc.topk_logprobs = truncate_topk(
                        sc.topk_ids, sc.topk_logprobs, cuts.get("top_p"), cuts.get("within_nats")
                    )
                scored.append(
                    ScoredSample(
                        sample_id=ts.sample_id,
                        input_ids=ts.input_ids,
                        loss_mask=ts.loss_mask,
                        positions=ts.positions,
                        topk_ids=sc.topk_ids,
                        topk_logprobs=sc.topk_logprobs,
                        gold_logprob=sc.gold_logprob,
                        text=ts.text,
                        assistant_spans=ts.assistant_spans,
                        truncated=ts.truncated,
                    )
                )
                result.tokens += ts.num_tokens
                result.positions += len(ts.positions)
                if ts.truncated:
                    result.truncated += 1
                    result.truncated_ids.append(ts.sample_id)
            result.samples_scored += len(batch)
            result.padded_tokens += (sum(t.num_tokens for t in batch) if packed
                                     else len(batch) * max(t.num_tokens for t in batch))
            result.seconds = time.perf_counter() - t0
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{result.tokens_per_s:,.0f}")
            if on_batch is not None:
                on_batch(result)
        if not claim.commit(scored, plan.copies):  # another writer committed this range first: dropped
            scored_here = len(scored) - len(plan.samples)
            result.samples_scored -= scored_here
            result.samples_lost_to_others += scored_here
            result.samples_reused -= reused_here
        else:
            result.shards_copied += len(plan.copies)


# ---------------------------------------------------------------------------- invalid samples


class NonFiniteScores(UserError):
    """Samples whose log-probabilities came back NaN or infinite (typically fp16 overflow in the teacher's
    activations). They are not stored; every other sample of the run is."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "; ".join(str(p) for p in problems[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        super().__init__(
            f"{plural(len(problems), 'sample')} scored non-finite log-probabilities and were not stored: {shown}{more} "
            f"(numeric overflow: with --dtype float16 rerun with --dtype bfloat16 or float32, which scores "
            f"only these; or pass --skip-invalid to leave them out)"
        )


def nonfinite_reason(ts: TokenizedSample, scores: TopK) -> str | None:
    """Why a sample's scores cannot be stored, or None: NaN or positive (+inf) log-probabilities (what an
    fp16 overflow, an activation past 65504, leaves after the final norm and log-softmax). ``-inf`` (a
    masked token: vLLM returns it) and log-probabilities below the store's floor of -2**16 nats are not
    faults: `datastore.codec` stores them at the floor (probability 0 either way)."""
    n = len(ts.positions)
    lp = np.concatenate([scores.topk_logprobs.reshape(n, -1), scores.gold_logprob.reshape(n, 1)], axis=1)
    with np.errstate(invalid="ignore"):
        bad = (np.isnan(lp) | (lp > 0)).any(axis=1)
    if not bad.any():
        return None
    first = int(ts.positions[bad.argmax()])
    return (f"id {ts.sample_id!r}: non-finite log-probabilities at {int(bad.sum())} of {n} positions "
            f"(first at token {first})")


CHECK_CHUNK = 1024  # samples rendered and tokenised together by the input check


def usable_samples(
    dataset: Dataset, tokenizer, template: str | None, settings: ExtractSettings, result: ExtractResult,
    scoring: str,
) -> tuple[list[Sample], dict[str, str]]:
    """The samples of `dataset` this teacher can take, and each one's content key under `scoring`
    (`datastore.reuse.sample_key`, by sample id): each is rendered with `template` and tokenised as
    scoring will (`teacher_server.render.checked_samples`). Raises `UserError` naming the line of every
    sample refused (at most 3 shown) unless `settings.skip_invalid`, which records them in
    `result.skipped` and leaves them out."""
    usable: list[Sample] = []
    keys: dict[str, str] = {}
    problems: list[Problem] = []
    for start in range(0, len(dataset.samples), CHECK_CHUNK):  # only a chunk's tokens are held at once
        chunk = dataset.samples[start : start + CHECK_CHUNK]
        checked = checked_samples(chunk, tokenizer, template, settings.max_length, settings.all_positions)
        for sample, (ts, reason) in zip(chunk, checked, strict=True):
            if ts is not None:
                usable.append(sample)
                keys[sample.id] = sample_key(scoring, ts.text, ts.input_ids, ts.loss_mask, ts.positions)
            else:
                problems.append(Problem(sample.id, f"id {sample.id!r}: {reason}"))
    refuse_or_skip(dataset, problems, bool(usable), settings, result)
    return usable, keys


def refuse_or_skip(dataset: Dataset, problems: list[Problem], any_usable: bool, settings: ExtractSettings,
                   result: ExtractResult) -> None:
    """What `usable_samples` does with the refused samples (`Problem(sample id, reason)`): raise UserError
    naming their lines, or with `settings.skip_invalid` record them in `result.skipped` (and raise only
    when no sample is left)."""
    if not problems:
        return
    problems = _located(dataset, problems)
    if not settings.skip_invalid:
        shown = "; ".join(str(p) for p in problems[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UserError(
            f"{dataset.source or 'dataset'}: {plural(len(problems), 'sample')} the teacher's chat template, tokenizer or "
            f"max_length refuses: {shown}{more} (fix them or pass --skip-invalid)"
        )
    if not any_usable:
        raise UserError(f"{dataset.source or 'dataset'}: no sample the teacher's template and tokenizer accept "
                        f"(first: {problems[0]})")
    result.skipped = problems


def _located(dataset: Dataset, problems: list[Problem]) -> list[Problem]:
    """`problems` keyed by sample id (in `where`) re-keyed by the sample's line/row in the dataset file,
    found by reading the file's records again (only when something is wrong)."""
    wanted = {p.where for p in problems}
    where: dict[str, str] = {}
    if dataset.source:
        for item in iter_records(dataset.source):
            loc, rec = item[0], item[-1]  # (location, [decoded bytes,] record or ValueError)
            sid = rec.get("id") if isinstance(rec, dict) else None
            if sid is not None and str(sid) in wanted and str(sid) not in where:
                where[str(sid)] = loc
                if len(where) == len(wanted):
                    break
    return [Problem(where.get(p.where, "sample"), p.reason) for p in problems]



# ---------------------------------------------------------------------------- store failures


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_store(store_uri: str) -> None:
    """Fail before any work when an S3 store cannot be written: endpoint unreachable or bucket missing
    (one line, `UserError`). A local store is created on first write."""
    filesystem, root = resolve(store_uri)
    if is_local(filesystem):
        check_local_directory(store_uri, "store")
        return
    bucket = root.split("/", 1)[0]
    try:
        info = filesystem.get_file_info(bucket)
    except OSError as e:
        raise UserError(f"store {store_uri}: cannot reach the S3 endpoint ({_first_line(e)})") from None
    if info.type.name == "NotFound":
        raise UserError(f"store {store_uri}: bucket {bucket!r} does not exist (create it, or check the URI and "
                        f"AWS_ENDPOINT_URL)")


@contextmanager
def store_errors(store_uri: str) -> Iterator[None]:
    """Turn a failed store read or write (`OSError`: disk full, S3 unreachable, bucket gone) into one
    `UserError` line naming the store. Shards committed before the failure stay; a rerun resumes."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            what = "no space left on the device (disk full or quota)"
        else:
            what = _first_line(e)
        raise UserError(f"store {store_uri}: {what}; shards committed so far are kept, rerun to resume "
                        f"once the store is writable") from None
