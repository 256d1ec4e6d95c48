"""Extraction driver: one teacher over one dataset into the datastore, resumable.

Any number of `extract` processes (CLI runs, service workers) may work on the same logits dataset at
once: the writer hands out ranges of the input's samples under expiring leases
(`datastore.shards.ShardedWriter.claims`), each range is tokenised, sorted by length and cut into
batches under a token budget (bucketing, so padding wastes little compute), scored by a `Backend`, and
committed as one shard. A range whose holder died is taken over once its lease expires; a re-run after an
interruption scores only what is not committed, so every sample lands exactly once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from datastore.chat import Dataset
from datastore.errors import UserError
from datastore.fs import save_tokenizer
from datastore.manifest import LogitsMeta, logits_id
from datastore.reuse import ReuseIndex, sample_key, scoring_key
from datastore.sample import ScoredSample
from datastore.writer import LogitsWriter
from teacher_server.backends.base import Backend
from teacher_server.batching import plan_batches
from teacher_server.render import TokenizedSample, resolve_template, tokenize_sample, tokenizer_fingerprint


@dataclass
class ExtractSettings:
    k: int = 10
    chat_template: str = "model"
    max_length: int = 2048
    all_positions: bool = False
    batch_tokens: int = 16384  # padded tokens per forward batch
    shard_rows: int = 512  # samples per shard and claimed range, when this run creates the dataset
    lease_seconds: float = field(default_factory=lambda: float(os.environ.get("LOGITFUSE_LEASE_SECONDS", "60")))
    team: str | None = None  # recorded in the dataset's log (default $LOGITFUSE_TEAM)
    reuse: bool = True  # copy samples that earlier datasets of the store scored with the same settings


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
    samples_lost_to_others: int = 0  # scored here, but another writer committed their range first
    samples_reused: int = 0  # copied from an earlier dataset of the store with the same scoring settings

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
    complete. Raises UserError for bad settings or a dataset that holds other logits."""
    settings = settings or ExtractSettings()
    if settings.k < 1:
        raise UserError(f"k={settings.k}: must be at least 1")
    if settings.max_length < 2:
        raise UserError(f"max_length={settings.max_length}: must be at least 2")
    tok = backend.tokenizer
    template = None
    if any(s.is_chat for s in dataset.samples):
        template = resolve_template(settings.chat_template, tok)
    meta = logits_meta(backend, dataset, teacher_name, settings)
    lid = logits_id(meta)
    uri = f"{store_uri.rstrip('/')}/logits/{lid}"
    result = ExtractResult(uri=uri, logits_id=lid)
    t0 = time.perf_counter()
    with LogitsWriter(uri, meta, shard_rows=settings.shard_rows, team=settings.team,
                      lease_seconds=settings.lease_seconds) as writer:
        save_tokenizer(uri, tok)
        by_id = {s.id: s for s in dataset.samples}
        done = writer.done_ids
        result.samples_already_stored = sum(1 for sid in by_id if sid in done)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(dataset.samples), initial=result.samples_already_stored, unit="sample",
                       desc=f"{teacher_name}", file=sys.stderr, dynamic_ncols=True)
        reuse = ReuseIndex.build(store_uri, meta, exclude_uri=uri) if settings.reuse else None
        scoring = scoring_key(meta)
        for claim in writer.claims(list(by_id)):
            window = [
                tokenize_sample(by_id[sid], tok, template, settings.max_length, settings.all_positions)
                for sid in claim.sample_ids
            ]
            scored: list[ScoredSample] = []
            reused_here = 0
            if reuse is not None and len(reuse):  # samples an earlier dataset already scored: copied
                keys = {sample_key(scoring, ts.text, ts.input_ids, ts.loss_mask, ts.positions): ts.sample_id
                        for ts in window}
                found = reuse.fetch(keys)
                if found:
                    scored.extend(found.values())
                    reused_here = len(found)
                    result.samples_reused += reused_here
                    result.samples_already_stored += reused_here  # progress counts them as stored
                    window = [ts for ts in window if ts.sample_id not in found]
                    if bar is not None:
                        bar.update(reused_here)
                    if on_batch is not None:
                        on_batch(result)
            for idx in plan_batches([t.num_tokens for t in window], settings.batch_tokens):
                batch: list[TokenizedSample] = [window[i] for i in idx]
                scores = backend.score(batch, settings.k)
                for ts, sc in zip(batch, scores, strict=True):
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
                result.padded_tokens += len(batch) * max(t.num_tokens for t in batch)
                result.seconds = time.perf_counter() - t0
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{result.tokens_per_s:,.0f}")
                if on_batch is not None:
                    on_batch(result)
            if not claim.commit(scored):  # another writer committed this range first: ours is dropped
                result.samples_scored -= len(scored) - reused_here
                result.samples_lost_to_others += len(scored) - reused_here
                result.samples_reused -= reused_here
        if bar is not None:
            bar.close()
        result.samples_already_stored = len(dataset.samples) - result.samples_scored  # incl. reused ones
    result.seconds = time.perf_counter() - t0
    return result
