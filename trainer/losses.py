"""The training loss: ``λ·SFT + (1-λ)·fusion`` on response positions, from hidden states, in chunks.

Rows. The trainer hands over one row per trained position ``t`` (token ``t + 1`` is a response token): the
final hidden state ``h_t``, the gold next token (SFT) and, where the targets dataset has one, the fused
top-k target distribution of token ``t + 1`` (ids ``-1`` = padding). Position ``t`` predicts token
``t + 1``; the shift happens once, in `trainer.data`.

Fusion loss per row, with student ``s = softmax(z / T)`` over the whole vocabulary (``z = W h``) and the
stored top-k probabilities ``p_1..p_K`` (mass ``m = Σ p``, tail ``1 - m``) made into a target ``p̃``:

- temperature ``T``: ``p_k ← p_k^(1/T)`` (and the tail bucket ``(1 - m)^(1/T)``), then renormalised; the
  loss is multiplied by ``T²`` so gradients keep their scale (Hinton et al.).
- ``tail="renormalise"``: ``p̃_k = p_k / Σ p`` over the top-k; ``tail="bucket"``: K + 1 categories, the
  top-k and one bucket for everything else, ``p̃_tail = 1 - m`` (after temperature, normalised over K + 1).
- ``ce`` (FuseChat): ``-Σ_k p̃_k log s_{i_k}`` (``- p̃_tail log s_tail`` with a bucket, where
  ``s_tail = 1 - Σ_k s_{i_k}`` computed as a log-sum-exp over the other ids).
- ``kl``: forward ``KL(p̃ || s) = ce - H(p̃)``: same gradient as ``ce``, 0 when the student matches.
- ``rkl``: reverse ``KL(s̃ || p̃)``, where ``s̃`` is the student projected on the target's categories: the
  top-k renormalised (``tail="renormalise"``) or the top-k plus its own tail bucket. ``log p̃`` is floored
  at ``log 1e-10`` (a category the target gives 0 would otherwise cost infinity).
- ``jsd``: generalised Jensen-Shannon ``β·KL(p̃ || M) + (1-β)·KL(s̃ || M)``, ``M = β p̃ + (1-β) s̃``.

SFT is ``-log softmax(z)[gold]`` (no temperature). The total is ``w_sft · Σ sft + w_fusion · Σ fusion``
with the weights chosen by the caller (``λ / #sft rows`` and ``(1 - λ) / #target rows`` for means).

Memory. `chunked_head_loss` never builds the ``[rows, vocab]`` logits at once: it walks the rows in
chunks, and for each chunk computes the logits, the losses and their gradient with respect to the logits
right away (autograd over the chunk's logits only), then folds that into ``dL/dh`` and ``dL/dW`` and frees
the chunk. Backward just scales the stored gradients, so nothing is recomputed and the peak is a few
``[chunk, vocab]`` fp32 tensors plus one ``dL/dW`` buffer. Targets stay ``[rows, K]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("ce", "kl", "rkl", "jsd")
TAILS = ("renormalise", "bucket")
LOG_FLOOR = math.log(1e-10)


@dataclass(frozen=True)
class LossConfig:
    """How the fusion term is computed (validated at the edge: `trainer.train.TrainConfig`)."""

    loss: str = "ce"
    temperature: float = 1.0
    tail: str = "renormalise"
    jsd_beta: float = 0.5

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")


def _fp(t: torch.Tensor) -> torch.Tensor:
    """fp32 for the loss math (float64 stays float64, which the reference tests use)."""
    return t if t.dtype == torch.float64 else t.float()


def target_distribution(probs: torch.Tensor, ids: torch.Tensor, cfg: LossConfig):
    """Stored top-k probs ``[R, K]`` -> (``p̃ [R, K]``, ``p̃_tail [R]`` or None, has_target ``[R]``)."""
    valid = ids >= 0
    p = torch.where(valid, _fp(probs).clamp_min(0), 0.0)
    tail = (1.0 - p.sum(-1)).clamp_min(0.0) if cfg.tail == "bucket" else None
    if cfg.temperature != 1.0:
        p = torch.where(p > 0, p.pow(1.0 / cfg.temperature), 0.0)
        if tail is not None:
            tail = torch.where(tail > 0, tail.pow(1.0 / cfg.temperature), 0.0)
    z = p.sum(-1) + (tail if tail is not None else 0.0)
    has = p.sum(-1) > 0
    z = torch.where(has, z, 1.0)
    return p / z[:, None], (tail / z if tail is not None else None), has


def _project(logq: torch.Tensor, ids: torch.Tensor, cfg: LossConfig):
    """Student log-probs on the target's categories: gathered top-k ``[R, K]`` (-inf on padding) and, with
    a bucket, the log-mass of every other id ``[R]``."""
    valid = ids >= 0
    safe = ids.clamp_min(0)
    lk = torch.where(valid, logq.gather(1, safe), -math.inf)
    ltail = None
    if cfg.tail == "bucket":
        others = logq.scatter(1, safe, -math.inf)  # padding maps to id 0; id 0 then counts as top-k only
        if not bool(valid.all()):
            # give back id 0's mass to the tail on rows where 0 is only there as padding
            zero_listed = ((ids == 0) & valid).any(-1)
            others[:, 0] = torch.where(zero_listed, -math.inf, logq[:, 0])
        ltail = torch.logsumexp(others, dim=-1)
    return lk, ltail


def fusion_row_loss(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, cfg: LossConfig):
    """Per-row fusion loss ``[R]`` (0 where a row has no target) and the has_target mask ``[R]``."""
    T = cfg.temperature
    logq = F.log_softmax(_fp(logits) / T, dim=-1)
    pt, tail_t, has = target_distribution(probs, ids, cfg)
    lk, ltail = _project(logq, ids, cfg)
    lk0 = torch.where(ids >= 0, lk, 0.0)  # finite stand-in where padding (its weight is 0)
    if cfg.loss in ("ce", "kl"):
        loss = -(pt * lk0).sum(-1)
        if ltail is not None:
            loss = loss - tail_t * ltail
        if cfg.loss == "kl":
            loss = loss + torch.xlogy(pt, pt).sum(-1)
            if tail_t is not None:
                loss = loss + torch.xlogy(tail_t, tail_t)
    else:
        # student on the target's categories: [R, C] with C = K (+1 with a bucket)
        lk = torch.where(has[:, None], lk, 0.0)  # rows without a target: finite values, weight 0
        if ltail is None:
            ls = lk - torch.logsumexp(lk, dim=-1, keepdim=True)
            pc = pt
        else:
            ls = torch.cat([lk, ltail[:, None]], dim=-1)
            pc = torch.cat([pt, tail_t[:, None]], dim=-1)
        valid = torch.isfinite(ls)
        ls0 = torch.where(valid, ls, 0.0)
        sc = torch.where(valid, ls0.exp(), 0.0)
        if cfg.loss == "rkl":
            lp = pc.clamp_min(1e-10).log()
            loss = (sc * (ls0 - lp)).sum(-1)
        else:
            b = cfg.jsd_beta
            m = b * pc + (1 - b) * sc
            lm = torch.where(m > 0, m, 1.0).log()
            loss = b * (torch.xlogy(pc, pc) - pc * lm).sum(-1) + (1 - b) * (sc * (ls0 - lm)).sum(-1)
    return torch.where(has, loss * (T * T), 0.0), has


def sft_row_loss(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Per-row ``-log softmax(logits)[gold]`` ``[R]``; 0 where ``gold < 0`` (no SFT target)."""
    logp = F.log_softmax(_fp(logits), dim=-1)
    nll = -logp.gather(1, gold.clamp_min(0)[:, None])[:, 0]
    return torch.where(gold >= 0, nll, 0.0)


def _closed_form_chunk(z, gold, ids, probs, cfg: LossConfig, w_sft: float, w_fusion: float, need: bool):
    """``ce``/``kl`` with a renormalised target: losses and ``dL/dz`` in closed form, in place, so the fusion
    term costs a few ``[rows, K]`` operations on top of SFT's ``[rows, V]`` softmax. With ``s = softmax(z)``,
    ``q = softmax(z / T)``: ``dSFT/dz = s - onehot(gold)``, ``d(T²·CE)/dz = T·(q·Σp̃ - p̃)`` (scattered)."""
    T = cfg.temperature
    rows = torch.arange(z.shape[0], device=z.device)
    has_gold = gold >= 0
    logp = torch.log_softmax(z, dim=-1)
    sft = torch.where(has_gold, -logp[rows, gold.clamp_min(0)], 0.0) if w_sft else logp.new_zeros(())
    fus = logp.new_zeros(())
    pt = has = logq = None
    if w_fusion:
        pt, _, has = target_distribution(probs, ids, cfg)
        logq = logp if T == 1.0 else torch.log_softmax(z / T, dim=-1)
        lk = logq.gather(1, ids.clamp_min(0))
        fus = -(pt * lk).sum(-1)
        if cfg.loss == "kl":
            fus = fus + torch.xlogy(pt, pt).sum(-1)
        fus = torch.where(has, fus * (T * T), 0.0)
    del z
    if not need:
        return sft, fus, None
    # gradient, reusing the softmax buffers
    coef_s = has_gold.to(logp.dtype) * w_sft if w_sft else None  # (a python-float where() would be fp32)
    if w_fusion and T != 1.0:
        g = logq.exp_().mul_((w_fusion * T) * has.to(logq.dtype)[:, None])
        if w_sft:
            g.add_(logp.exp_().mul_(coef_s[:, None]))
    else:
        coef = coef_s if coef_s is not None else torch.zeros_like(logp[:, 0])
        if w_fusion:
            coef = coef + (w_fusion * T) * has.to(logp.dtype)
        g = logp.exp_().mul_(coef[:, None])
    if w_sft:
        g[rows, gold.clamp_min(0)] -= coef_s
    if w_fusion:
        g.scatter_add_(1, ids.clamp_min(0), -(w_fusion * T) * pt.to(g.dtype))
    return sft, fus, g


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, gold, ids, probs, cfg, w_sft, w_fusion, chunk_rows):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need else None
        grad_w = torch.zeros(weight.shape, dtype=_fp(weight).dtype, device=weight.device) if need else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        sft_sum = hidden.new_zeros((), dtype=acc)
        fus_sum = hidden.new_zeros((), dtype=acc)
        w = weight.detach()
        fast = cfg.loss in ("ce", "kl") and cfg.tail == "renormalise"
        for s in range(0, hidden.shape[0], chunk_rows):
            h = hidden[s : s + chunk_rows].detach()
            sl = slice(s, s + chunk_rows)
            if fast:
                sft, fus, gz = _closed_form_chunk(_fp(h @ w.T), gold[sl], ids[sl], probs[sl], cfg, w_sft, w_fusion,
                                                  need)
            else:
                with torch.enable_grad():
                    z = _fp(h @ w.T).detach().requires_grad_(need)
                    sft = sft_row_loss(z, gold[sl]) if w_sft else z.new_zeros(())
                    fus = fusion_row_loss(z, ids[sl], probs[sl], cfg)[0] if w_fusion else z.new_zeros(())
                    total = w_sft * sft.sum() + w_fusion * fus.sum()
                    gz = torch.autograd.grad(total, z)[0] if need else None
                del z
            sft_sum += sft.detach().sum()
            fus_sum += fus.detach().sum()
            if need:
                gz = gz.to(w.dtype)
                grad_h[sl] = (gz @ w).to(hidden.dtype)
                grad_w += _fp(gz.T @ h.to(w.dtype))
            del gz
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(sft_sum, fus_sum)
        return w_sft * sft_sum + w_fusion * fus_sum, sft_sum, fus_sum

    @staticmethod
    def backward(ctx, g_total, _g_sft, _g_fus):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * g_total.to(grad_h.dtype), (grad_w * g_total).to(ctx.weight_dtype),
                None, None, None, None, None, None, None)


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    gold: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_probs: torch.Tensor,
    cfg: LossConfig,
    w_sft: float,
    w_fusion: float,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w_sft·Σ sft + w_fusion·Σ fusion`` over rows, logits ``hidden @ weight.T`` built one chunk at a time.

    Args:
        hidden: ``[R, H]`` final hidden states of the trained positions.
        weight: ``[V, H]`` the LM head (output embedding) weight.
        gold: int64 ``[R]`` next token per row, ``-100`` (any negative) = no SFT term.
        topk_ids: int64 ``[R, K]`` fused target ids, ``-1`` = padding (a row of -1: no fusion term).
        topk_probs: float32 ``[R, K]`` their probabilities.
    Returns:
        (total differentiable scalar, Σ sft, Σ fusion) — the sums detached, for logging.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _ChunkedHeadLoss.apply(
        hidden, weight, gold, topk_ids, topk_probs, cfg, float(w_sft), float(w_fusion), int(chunk_rows)
    )
