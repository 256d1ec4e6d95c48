"""trainer.losses against a dense float64 reference written here independently: values and gradients of
every loss x tail x temperature, chunked, on random inputs; and the pieces the trainer relies on."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.losses import LossConfig, chunked_head_loss

R, H, V, K = 11, 6, 37, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, H, generator=g, dtype=dtype) * 2
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    gold = torch.randint(0, V, (R,), generator=g)
    gold[3] = -100  # a row with a fusion target and no SFT term
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(R)])
    raw = torch.rand(R, K, generator=g, dtype=torch.float64) ** 2
    probs = raw / raw.sum(1, keepdim=True) * (0.3 + 0.7 * torch.rand(R, 1, generator=g, dtype=torch.float64))
    ids[1, 3:] = -1  # padding
    probs[1, 3:] = 0
    ids[2] = -1  # no target on this row
    probs[2] = 0
    ids[4, 0], ids[5, -1] = 0, -1  # id 0 listed on one row; padding (clamped to 0) on another
    probs[5, -1] = 0
    probs[6, 2] = 0  # a listed id with probability 0
    return hidden, weight, gold, ids, probs.to(torch.float32 if dtype == torch.float32 else torch.float64)


def dense_reference(hidden, weight, gold, ids, probs, cfg: LossConfig, w_sft, w_fus):
    """Straightforward dense float64 definitions over the whole vocabulary."""
    T, beta = cfg.temperature, cfg.jsd_beta
    z = hidden @ weight.T
    sft = -torch.log_softmax(z, -1).gather(1, gold.clamp_min(0)[:, None])[:, 0]
    sft = torch.where(gold >= 0, sft, torch.zeros_like(sft))
    s = torch.softmax(z / T, -1)
    total_f = torch.zeros((), dtype=torch.float64)
    for r in range(R):
        listed = ids[r][ids[r] >= 0]
        p_dense = torch.zeros(V, dtype=torch.float64)
        p_dense[listed] = probs[r][ids[r] >= 0].double()
        if p_dense.sum() <= 0:
            continue
        support = torch.zeros(V, dtype=torch.bool)
        support[listed] = True
        tail = (1 - p_dense.sum()).clamp_min(0)
        p_dense = p_dense ** (1 / T) * (p_dense > 0)
        tail = tail ** (1 / T) if tail > 0 else tail
        if cfg.tail == "bucket":
            zsum = p_dense.sum() + tail
            pt, ptail = p_dense / zsum, tail / zsum
            s_cat = torch.cat([s[r][support], s[r][~support].sum()[None]])
            p_cat = torch.cat([pt[support], ptail[None]])
        else:
            pt, ptail = p_dense / p_dense.sum(), None
            s_cat = s[r][support] / s[r][support].sum()
            p_cat = pt[support]
        if cfg.loss in ("ce", "kl"):
            loss = -(pt * torch.log(s[r])).sum()
            if ptail is not None:
                loss = loss - ptail * torch.log(s[r][~support].sum())
            if cfg.loss == "kl":
                loss = loss + sum(x * torch.log(x) for x in p_cat if x > 0)
        elif cfg.loss == "rkl":
            loss = (s_cat * (torch.log(s_cat) - torch.log(p_cat.clamp_min(1e-10)))).sum()
        else:
            m = beta * p_cat + (1 - beta) * s_cat
            kl_pm = sum(p * torch.log(p / mm) for p, mm in zip(p_cat, m, strict=True) if p > 0)
            loss = beta * kl_pm + (1 - beta) * (s_cat * torch.log(s_cat / m)).sum()
        total_f = total_f + loss * T * T
    return w_sft * sft.sum() + w_fus * total_f


CASES = list(itertools.product(["ce", "kl", "rkl", "jsd"], ["renormalise", "bucket"], [1.0, 2.0]))


@pytest.mark.parametrize("loss,tail,temperature", CASES)
def test_matches_dense_float64_reference(loss, tail, temperature):
    cfg = LossConfig(loss=loss, tail=tail, temperature=temperature, jsd_beta=0.3)
    for seed in range(2):
        hidden, weight, gold, ids, probs = make_inputs(seed)
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        total, _, _ = chunked_head_loss(h1, w1, gold, ids, probs, cfg, 0.7, 0.3, chunk_rows=3)
        total.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = dense_reference(h2, w2, gold, ids, probs, cfg, 0.7, 0.3)
        ref.backward()
        torch.testing.assert_close(total, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("loss", ["ce", "jsd"])
def test_float32_close_to_reference(loss):
    cfg = LossConfig(loss=loss, tail="bucket", temperature=1.5)
    hidden, weight, gold, ids, probs = make_inputs(7, torch.float32)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, _, _ = chunked_head_loss(h1, w1, gold, ids, probs, cfg, 0.9, 0.1, chunk_rows=4)
    total.backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = dense_reference(h2, w2, gold, ids, probs.double(), cfg, 0.9, 0.1)
    ref.backward()
    torch.testing.assert_close(total.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=1e-3, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    cfg = LossConfig()
    hidden, weight, gold, ids, probs = make_inputs(3)
    outs = []
    for chunk in (1, 4, 100):
        h = hidden.clone().requires_grad_()
        total, sft, fus = chunked_head_loss(h, weight, gold, ids, probs, cfg, 0.9, 0.1, chunk_rows=chunk)
        total.backward()
        outs.append((total.detach(), sft, fus, h.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kl_is_zero_when_student_matches_target_and_has_ce_gradient():
    # a student whose softmax is exactly the (renormalised) target on its support and ~0 elsewhere
    ids = torch.tensor([[2, 5, 7]])
    probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    z = torch.full((1, 9), -60.0, dtype=torch.float64)
    z[0, ids[0]] = probs[0].log()
    eye = torch.eye(9, dtype=torch.float64)
    kl, _, _ = chunked_head_loss(z.clone(), eye, torch.tensor([-100]), ids, probs, LossConfig(loss="kl"), 0, 1)
    assert abs(float(kl)) < 1e-12
    for name in ("ce", "kl"):
        h = z.clone().requires_grad_()
        chunked_head_loss(h, eye, torch.tensor([-100]), ids, probs, LossConfig(loss=name), 0, 1)[0].backward()
        if name == "ce":
            g_ce = h.grad
    torch.testing.assert_close(h.grad, g_ce)


def test_no_grad_path_and_bad_config():
    hidden, weight, gold, ids, probs = make_inputs(1)
    with torch.no_grad():
        total, sft, fus = chunked_head_loss(hidden, weight, gold, ids, probs, LossConfig(), 0.5, 0.5)
    assert torch.isfinite(total) and float(sft) > 0 and float(fus) > 0
    for bad in (dict(loss="mse"), dict(tail="drop"), dict(temperature=0.0), dict(jsd_beta=1.0)):
        with pytest.raises(ValueError):
            LossConfig(**bad)
