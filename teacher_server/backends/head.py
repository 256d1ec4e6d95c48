"""The LM head at the scored positions only: final-norm hidden states in, top-k log-probabilities out.

Shared by the HF backend (hidden states from `transformers`' decoder) and the vLLM backend's
`hidden_states` scoring (hidden states from vLLM's pooling runner). The `[positions, vocab]` fp32
logits exist `chunk_positions` rows at a time, never for a whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from teacher_server.backends.base import TopK
from teacher_server.render import TokenizedSample

__all__ = ["head_topk", "split_per_sample"]


@torch.inference_mode()
def head_topk(
    hidden: torch.Tensor,
    gold: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
    k: int,
    chunk_positions: int = 1024,
    softcap: float | None = None,
    before_chunk: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of `log_softmax(head(hidden))` over the full vocabulary, and the gold token's log-probability.

    hidden: `[N, H]` final-norm hidden states (any float dtype, on the head's device), one row per
    scored position t; gold: int64 `[N]`, the token that followed (`input_ids[t + 1]`); head: a `[V, H]`
    weight matrix (logits `hidden @ head.T`) or a module mapping `[n, H]` to `[n, V]` logits; softcap:
    Gemma-2's `final_logit_softcapping` (`tanh(z / c) * c`) or None; before_chunk: called before each
    chunk (`Backend.before_chunk`: a cancelled job raises from it). Log-probabilities are computed in
    fp32, in nats, as `z - (m + log Σ exp(z - m))` with m the row's largest logit (the log-sum-exp of
    `torch.log_softmax`).

    The fp32 logits of one chunk are the only `[n, V]` tensor: the top-k and the gold logit are read from
    them, then the log-sum-exp is taken in place. A float32 weight matrix writes every chunk's logits
    into one buffer, so the pages are touched once per call, not once per chunk. (`bench/bench_head.py`,
    SmolLM2's 49k-row head, 4,096 real positions, one thread: 0.77x the CPU time of `log_softmax` +
    top-k on a fresh tensor per chunk, the same as the matmul alone.)

    Returns `(topk_ids int32 [N, k], topk_logprobs float32 [N, k], gold_logprob float32 [N])`, ids by
    descending log-probability.
    """
    n = hidden.shape[0]
    top_ids = torch.empty((n, k), dtype=torch.int32)
    top_lp = torch.empty((n, k), dtype=torch.float32)
    gold_lp = torch.empty((n,), dtype=torch.float32)
    matrix = head if isinstance(head, torch.Tensor) else None
    buffer = None
    if matrix is not None and matrix.dtype == torch.float32 and n:
        buffer = torch.empty((min(n, chunk_positions), matrix.shape[0]), dtype=torch.float32, device=matrix.device)
    for start in range(0, n, chunk_positions):
        sl = slice(start, min(n, start + chunk_positions))
        if before_chunk is not None:
            before_chunk()
        if buffer is not None:
            logits = torch.matmul(hidden[sl].to(torch.float32), matrix.T, out=buffer[: sl.stop - sl.start])
        elif matrix is not None:
            logits = torch.nn.functional.linear(hidden[sl].to(matrix.dtype), matrix).float()
        else:
            logits = head(hidden[sl]).float()
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        values, indices = torch.topk(logits, k, dim=-1)
        gold_logit = logits.gather(1, gold[sl, None]).squeeze(1)
        peak = values[:, :1]
        lse = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_().add_(peak)  # logits are spent
        top_ids[sl] = indices.to(torch.int32).cpu()
        top_lp[sl] = (values - lse).cpu()
        gold_lp[sl] = (gold_logit - lse.squeeze(1)).cpu()
        del logits
    return top_ids.numpy(), top_lp.numpy(), gold_lp.numpy()


def split_per_sample(batch: list[TokenizedSample], top_ids: np.ndarray, top_lp: np.ndarray,
                     gold_lp: np.ndarray) -> list[TopK]:
    """Cut `head_topk`'s rows, laid out sample after sample in `batch` order, into one `TopK` each."""
    results, offset = [], 0
    for s in batch:
        m = len(s.positions)
        sl = slice(offset, offset + m)
        results.append(TopK(topk_ids=top_ids[sl], topk_logprobs=top_lp[sl], gold_logprob=gold_lp[sl]))
        offset += m
    return results
