"""The HF backend against an independent float64 full-vocabulary computation, sample by sample, on
tiny Llama, Mistral, Mixtral (MoE) and Qwen2 models with the real 32k and 131k tokenizers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clients.corpus import chat_samples, text_samples
from clients.tiny_models import build_model
from datastore.chat import parse_record
from teacher_server.backends.hf import HFBackend
from teacher_server.render import tokenize_sample

K = 8
TIE_GAP = 1e-4  # float64 log-prob gaps below this count as ties: fp32 may order them either way


def _samples(tok, template, all_positions=False):
    records = chat_samples(4, seed=11, max_turns=3) + text_samples(2, seed=5)
    return [tokenize_sample(parse_record(r), tok, template, 256, all_positions) for r in records]


def _reference(model64, ts):
    with torch.no_grad():
        logits = model64(torch.from_numpy(ts.input_ids.astype(np.int64))[None]).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()[ts.positions]


def check_against_float64(ref: np.ndarray, gold_ids: np.ndarray, ids: np.ndarray, lp: np.ndarray,
                          gold: np.ndarray, atol: float) -> None:
    """Stored (ids, lp, gold) agree with a float64 full-vocabulary log-softmax `ref` [N, V]."""
    k = ids.shape[1]
    order = np.argsort(-ref, axis=1, kind="stable")[:, : k + 1]
    ref_sorted = np.take_along_axis(ref, order, axis=1)
    # Every stored log-prob is the float64 value of the stored id.
    np.testing.assert_allclose(lp, np.take_along_axis(ref, ids.astype(np.int64), axis=1), atol=atol, rtol=0)
    # The stored ids are a true top-k: their log-probs match the float64 top-k values rank by rank.
    np.testing.assert_allclose(lp, ref_sorted[:, :k], atol=atol, rtol=0)
    # Ids are equal wherever the float64 ranking is not tied on either side.
    gaps = -np.diff(ref_sorted, axis=1)  # [N, k]
    untied = np.ones_like(ids, dtype=bool)
    untied[:, :] &= gaps[:, :k] > TIE_GAP
    untied[:, 1:] &= gaps[:, : k - 1] > TIE_GAP
    assert untied.mean() > 0.5, "test models too flat to check ids"
    assert np.array_equal(ids[untied], order[:, :k][untied])
    np.testing.assert_allclose(gold, ref[np.arange(len(gold_ids)), gold_ids], atol=atol, rtol=0)


CASES = [("llama", "spm_tokenizer"), ("mistral", "spm_tokenizer"), ("mixtral", "spm_tokenizer"),
         ("qwen2", "bpe_tokenizer"), ("mixtral", "bpe_tokenizer")]


@pytest.mark.parametrize("arch, tok_name", CASES)
def test_topk_matches_float64_and_batching_changes_nothing(request, arch, tok_name, inst_template):
    tok = request.getfixturevalue(tok_name)
    model = build_model(arch, tok, seed=3, initializer_range=0.2)
    backend = HFBackend(f"tiny-{arch}", model_obj=model, tokenizer=tok, device="cpu", chunk_positions=13)
    samples = _samples(tok, inst_template, all_positions=(arch == "llama"))
    batched = backend.score(samples, K)
    model64 = copy.deepcopy(model).double()
    if arch == "mixtral":  # grouped_mm has no float64 kernel; the eager expert loop is a second code path
        model64.config._experts_implementation = "eager"
    for ts, got in zip(samples, batched, strict=True):
        assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
        assert got.topk_ids.shape == (len(ts.positions), K)
        ref = _reference(model64, ts)
        check_against_float64(ref, ts.input_ids[ts.positions + 1], got.topk_ids, got.topk_logprobs,
                              got.gold_logprob, atol=1e-4)
        # Alone in its batch (no padding, other matmul shapes): the same values up to fp32 reassociation,
        # far below the storage quantisation step, and the same ids wherever not tied.
        single = backend.score([ts], K)[0]
        np.testing.assert_allclose(single.topk_logprobs, got.topk_logprobs, atol=2e-5, rtol=0)
        np.testing.assert_allclose(single.gold_logprob, got.gold_logprob, atol=2e-5, rtol=0)
        gaps = np.abs(np.diff(got.topk_logprobs, axis=1))
        untied = np.ones_like(got.topk_ids, dtype=bool)
        untied[:, :-1] &= gaps > TIE_GAP
        untied[:, 1:] &= gaps > TIE_GAP
        assert np.array_equal(single.topk_ids[untied], got.topk_ids[untied])


@pytest.mark.parametrize("form", ["fp32 matrix", "bf16 matrix", "module"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_head_topk_matches_float64_on_every_path(form, softcap):
    """`head_topk` against a float64 log-softmax of the same head, over several chunks and a short last one:
    the fp32 matrix path (one reused logits buffer), a bf16 matrix and a module (fresh logits per chunk),
    with and without Gemma-2's softcap."""
    from teacher_server.backends.head import head_topk

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(5000, 64, generator=gen) * 0.3
    hidden = torch.randn(37, 64, generator=gen) * 2.0
    gold = torch.randint(0, 5000, (37,), generator=gen)
    if form == "bf16 matrix":
        weight = weight.to(torch.bfloat16)
        hidden = hidden.to(torch.bfloat16)
    head = weight
    if form == "module":
        head = torch.nn.Linear(64, 5000, bias=False)
        head.weight.data.copy_(weight)
    # bf16: the head's own bf16 logits, then float64 (the products' rounding is the model's, not ours)
    logits64 = (hidden @ weight.T).double() if form == "bf16 matrix" else hidden.double() @ weight.double().T
    if softcap:
        logits64 = torch.tanh(logits64 / softcap) * softcap
    ref = torch.log_softmax(logits64, dim=-1).numpy()
    ids, lp, gold_lp = head_topk(hidden, gold, head, K, chunk_positions=16, softcap=softcap)
    assert ids.dtype == np.int32 and lp.dtype == np.float32 and gold_lp.dtype == np.float32
    assert ids.shape == lp.shape == (37, K) and gold_lp.shape == (37,)
    check_against_float64(ref, gold.numpy(), ids, lp, gold_lp, atol=2e-4)
    empty = head_topk(hidden[:0], gold[:0], head, K, chunk_positions=16, softcap=softcap)
    assert [a.shape for a in empty] == [(0, K), (0, K), (0,)]
