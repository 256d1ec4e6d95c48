"""Scored samples from a tiny teacher that has learned something, for benchmarks that depend on what
the distributions look like (compression, fusion): a Mistral-shaped model on the real 32k SentencePiece
tokenizer, trained on the project's generated text, scoring held-out generated chats.

The trained teacher is cached under the system temp dir, so only the first run pays for training.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from datastore.sample import ScoredSample

TEACHER_STEPS = 300


def trained_teacher_dir() -> Path:
    from clients.tiny_models import make_teacher
    from teacher_server.render import TEMPLATE_DIR

    template = (TEMPLATE_DIR / "inst.jinja").read_text(encoding="utf-8")
    out = Path(tempfile.gettempdir()) / "logitfuse-bench-teacher"
    return make_teacher(out, "mistral", "spm32k", template, steps=TEACHER_STEPS, seed=11, lr=3e-3)


def load_samples(n: int = 400, k: int = 10, all_positions: bool = False, seed: int = 777) -> tuple[list[ScoredSample], float]:
    """`n` held-out chat samples scored at top-k, and the teacher's mean full-vocabulary entropy (nats)
    over the scored positions."""
    from clients.corpus import chat_samples
    from datastore.chat import parse_record
    from teacher_server.backends.hf import HFBackend
    from teacher_server.render import resolve_template, tokenize_sample

    backend = HFBackend(trained_teacher_dir(), device="cpu")
    tok = backend.tokenizer
    template = resolve_template("model", tok)
    tokenized = [
        tokenize_sample(parse_record(r), tok, template, 2048, all_positions)
        for r in chat_samples(n, seed=seed, max_turns=4)
    ]
    return score_with_entropy(backend, tokenized, k, 8192)


def score_with_entropy(
    backend, tokenized: list, k: int, batch_tokens: int, entropy_positions: int | None = None
) -> tuple[list[ScoredSample], float]:
    """Score `TokenizedSample`s with an `HFBackend` at top-`k` (fp32, before any storage) and return them
    with the model's mean full-vocabulary entropy (nats) over the scored positions (over the first
    samples' `entropy_positions` positions when set: a second full-vocabulary pass costs a forward)."""
    from teacher_server.batching import plan_batches

    out: list[ScoredSample | None] = [None] * len(tokenized)
    entropy_sum, count = 0.0, 0
    for idx in plan_batches([t.num_tokens for t in tokenized], batch_tokens):
        batch = [tokenized[i] for i in idx]
        for i, ts, sc in zip(idx, batch, backend.score(batch, k), strict=True):
            out[i] = ScoredSample(ts.sample_id, ts.input_ids, ts.loss_mask, ts.positions, sc.topk_ids,
                                  sc.topk_logprobs, sc.gold_logprob, ts.text, ts.assistant_spans, ts.truncated)
        with torch.inference_mode():
            for ts in batch:
                if entropy_positions is not None and count >= entropy_positions:
                    break
                logits = backend.model(torch.from_numpy(ts.input_ids.astype(np.int64))[None]).logits[0].float()
                lp = torch.log_softmax(logits[torch.from_numpy(ts.positions.astype(np.int64))], -1)
                entropy_sum += float(-(lp.exp() * lp).sum())
                count += len(ts.positions)
    return [s for s in out if s is not None], entropy_sum / max(1, count)
