"""Extraction driver: one teacher over one dataset into the datastore, resumable.

Samples are tokenised a window at a time, sorted by length and cut into batches under a token budget
(bucketing, so padding wastes little compute), scored by a `Backend`, and streamed into a
`LogitsWriter`. The writer knows which samples are already committed; a re-run after an interruption
scores only the rest, so every sample lands exactly once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from datastore.chat import Dataset
from datastore.codec import truncate_topk
from datastore.errors import UserError
from datastore.fs import save_tokenizer
from datastore.manifest import LogitsMeta, logits_id
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
    shard_rows: int = 512
    window: int = 4096  # samples tokenised and sorted together
    # truncation (`datastore.codec.truncate_topk`): per position keep only the entries covering this
    # probability mass / within this many nats of the top-1; part of the logits id when set
    top_p: float | None = None
    within_nats: float | None = None

    def truncation(self) -> dict:
        """The truncation settings that are set, as recorded in `LogitsMeta.extra` (empty: none)."""
        return {name: v for name, v in (("top_p", self.top_p), ("within_nats", self.within_nats)) if v is not None}


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
    """Score every sample of `dataset` not yet stored and commit them under `STORE/logits/<id>`."""
    settings = settings or ExtractSettings()
    if settings.k < 1:
        raise UserError(f"k={settings.k}: must be at least 1")
    if settings.max_length < 2:
        raise UserError(f"max_length={settings.max_length}: must be at least 2")
    if settings.top_p is not None and not 0.0 < settings.top_p <= 1.0:
        raise UserError(f"top_p={settings.top_p}: must be in (0, 1]")
    if settings.within_nats is not None and not settings.within_nats >= 0.0:
        raise UserError(f"within_nats={settings.within_nats}: must be >= 0")
    tok = backend.tokenizer
    template = None
    if any(s.is_chat for s in dataset.samples):
        template = resolve_template(settings.chat_template, tok)
    meta = logits_meta(backend, dataset, teacher_name, settings)
    lid = logits_id(meta)
    uri = f"{store_uri.rstrip('/')}/logits/{lid}"
    result = ExtractResult(uri=uri, logits_id=lid)
    t0 = time.perf_counter()
    with LogitsWriter(uri, meta, shard_rows=settings.shard_rows) as writer:
        save_tokenizer(uri, tok)
        done = writer.done_ids
        todo = [s for s in dataset.samples if s.id not in done]
        result.samples_already_stored = len(dataset.samples) - len(todo)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(dataset.samples), initial=result.samples_already_stored, unit="sample",
                       desc=f"{teacher_name}", file=sys.stderr, dynamic_ncols=True)
        for w in range(0, len(todo), settings.window):
            window = [
                tokenize_sample(s, tok, template, settings.max_length, settings.all_positions)
                for s in todo[w : w + settings.window]
            ]
            for idx in plan_batches([t.num_tokens for t in window], settings.batch_tokens):
                batch: list[TokenizedSample] = [window[i] for i in idx]
                scores = backend.score(batch, settings.k)
                for ts, sc in zip(batch, scores, strict=True):
                    if settings.truncation():
                        sc.topk_ids, sc.topk_logprobs = truncate_topk(
                            sc.topk_ids, sc.topk_logprobs, settings.top_p, settings.within_nats
                        )
                    writer.write(
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
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    return result
