"""`logitfuse extract` end to end: values through the datastore against float64, resume after kill -9,
and the CLI's error contract."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clients.cli import app
from clients.corpus import chat_samples, text_samples, write_jsonl
from datastore.codec import CodecConfig
from datastore.fs import list_logits
from datastore.reader import LogitsReader
from teacher_server.backends.hf import HFBackend
from teacher_server.extract import ExtractSettings, extract
from tests.test_hf_backend import check_against_float64

BOUND = CodecConfig().max_abs_error + 1e-4  # quantisation bound + fp32 forward vs float64
K = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    records = chat_samples(16, seed=21, max_turns=3) + text_samples(4, seed=4)
    return write_jsonl(records, tmp_path_factory.mktemp("data") / "chats.jsonl")


def _run_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True,
                          env=env, **kw)


def test_stored_values_match_float64_and_batching_changes_nothing(tmp_path, teacher_dir, dataset):
    from datastore.chat import load_dataset
    from teacher_server.render import resolve_template, tokenize_sample

    data = load_dataset(dataset)
    backend = HFBackend(teacher_dir, device="cpu")
    big = extract(backend, data, str(tmp_path / "a"), "t", ExtractSettings(k=K, batch_tokens=8192), progress=False)
    small = extract(backend, data, str(tmp_path / "b"), "t",
                    ExtractSettings(k=K, batch_tokens=64, shard_rows=5), progress=False)
    assert big.logits_id == small.logits_id and big.samples_scored == len(data.samples) == 20
    assert big.tokens <= big.padded_tokens <= 1.25 * big.tokens  # one budget, mixed lengths: split, not padded
    ra, rb = LogitsReader(big.uri), LogitsReader(small.uri)
    assert ra.manifest.complete and len(rb.manifest.shards) == 4
    model64 = copy.deepcopy(backend.model).double()
    template = resolve_template("model", backend.tokenizer)
    by_id = {s.id: s for s in data.samples}
    for stored in ra.iter_samples():
        ts = tokenize_sample(by_id[stored.sample_id], backend.tokenizer, template, 2048, False)
        np.testing.assert_array_equal(stored.input_ids, ts.input_ids)
        np.testing.assert_array_equal(stored.loss_mask, ts.loss_mask)
        np.testing.assert_array_equal(stored.positions, ts.positions)
        with torch.no_grad():
            logits = model64(torch.from_numpy(ts.input_ids.astype(np.int64))[None]).logits[0]
        ref = torch.log_softmax(logits, dim=-1).numpy()[ts.positions]
        check_against_float64(ref, ts.input_ids[ts.positions + 1], stored.topk_ids, stored.topk_logprobs,
                              stored.gold_logprob, atol=BOUND)
        other = rb.get(stored.sample_id)  # other batch composition, other shard layout
        np.testing.assert_allclose(other.topk_logprobs, stored.topk_logprobs, atol=CodecConfig().step + 1e-6)
        tied = np.abs(np.diff(stored.topk_logprobs, axis=1)) < 2 * BOUND
        untied = np.ones_like(stored.topk_ids, dtype=bool)
        untied[:, :-1] &= ~tied
        untied[:, 1:] &= ~tied
        assert np.array_equal(other.topk_ids[untied], stored.topk_ids[untied])
    # The tokenizer travels with the logits: fusion re-tokenises from the store alone.
    assert ra.tokenizer().encode("hello world") == backend.tokenizer.encode("hello world")


def test_kill_9_mid_run_then_rerun_stores_every_sample_once(tmp_path, teacher_dir):
    records = chat_samples(200, seed=3, max_turns=2)
    data = write_jsonl(records, tmp_path / "big.jsonl")
    store = tmp_path / "store"
    args = ["extract", "--teacher", str(teacher_dir), "--dataset", str(data), "--store", str(store),
            "--k", str(K), "--shard-rows", "4", "--batch-tokens", "256", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    dataset_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(store.glob("logits/*/_delta_log"))
        if found and LogitsReader(str(found[0].parent)).manifest.shards:
            dataset_dir = found[0].parent
            break
        time.sleep(0.05)
    assert dataset_dir is not None and proc.poll() is None, "extract finished or failed before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = LogitsReader(str(dataset_dir)).manifest
    assert not first.complete and 0 < first.num_samples < len(records)

    again = _run_cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1", "LOGITFUSE_LEASE_SECONDS": "2"})
    assert again.returncode == 0, again.stderr
    assert "already stored" in again.stdout
    reader = LogitsReader(str(dataset_dir))
    ids = [s.sample_id for s in reader.iter_samples()]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every sample, exactly once
    assert reader.manifest.complete and [s.file for s in first.shards] == \
        [s.file for s in reader.manifest.shards[: len(first.shards)]]  # committed shards untouched
    verify = _run_cli("store", "verify", str(dataset_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # Same values as an uninterrupted run (compared on a sample of ids).
    # (the shard size is not part of the logits id: fewer, larger shards make the reference run quicker)
    clean = _run_cli(*args[:6], str(tmp_path / "clean"), *args[7:], "--shard-rows", "100")
    assert clean.returncode == 0, clean.stderr
    ref = LogitsReader(str(tmp_path / "clean" / "logits" / dataset_dir.name))
    for sid in ids[::37]:
        a, b = reader.get(sid), ref.get(sid)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=CodecConfig().step + 1e-6)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, teacher_dir, dataset):
    runner = CliRunner()
    store = str(tmp_path / "store")

    def run(*args: str):
        return runner.invoke(app, ["extract", *args])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}, '
                   '{"role": "assistant", "content": "hello there"}]}\n{"id": "b"}\n')
    cases = [
        (["--teacher", str(teacher_dir), "--dataset", str(tmp_path / "missing.jsonl"), "--store", store],
         "not found"),
        (["--teacher", str(tmp_path / "no-model"), "--dataset", str(dataset), "--store", store], "no-model"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--k", "0"], "--k"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", "ftp://x/y"], "ftp://x/y"),
        (["--teacher", str(teacher_dir), "--dataset", str(bad), "--store", store], "line 2"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--chat-template",
          "nosuch"], "nosuch"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--backend", "tgi"], "tgi"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--backend", "vllm",
          "--vllm-arg", "enforce_eager"], "--vllm-arg enforce_eager: expected KEY=VALUE"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--vllm-arg",
          "enforce_eager=true"], "only with --backend vllm"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--backend", "vllm",
          "--vllm-scoring", "logits"], "logits"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--vllm-scoring",
          "hidden_states"], "--vllm-scoring hidden_states: only with --backend vllm"),
        (["--teacher", str(teacher_dir), "--dataset", str(dataset), "--store", store, "--backend", "vllm",
          "--vllm-arg", "max_model_len=4096"], "--vllm-arg max_model_len: set by logitfuse"),
    ]
    for args, needle in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert list_logits(store) == []  # nothing stored by a rejected run

    ok = run("--teacher", str(teacher_dir), "--dataset", str(bad), "--store", store, "--skip-invalid",
             "--k", "3")
    assert ok.exit_code == 0, ok.output
    assert "skipped 1 invalid sample" in ok.output
    (m,) = list_logits(store)
    assert m.num_samples == 1 and m.complete


def test_truncation_option_is_part_of_the_logits_id_and_keeps_leading_entries(tmp_path, teacher_dir, dataset):
    """`--top-p` / `--within-nats`: per position only the entries covering the mass / within X nats of the
    top-1 are stored (padding -1 / -inf after them), and the setting is part of the logits id."""
    from datastore.chat import load_dataset

    data = load_dataset(dataset)
    backend = HFBackend(teacher_dir, device="cpu")
    full = extract(backend, data, str(tmp_path / "s"), "t", ExtractSettings(k=K), progress=False)
    cut = extract(backend, data, str(tmp_path / "s"), "t", ExtractSettings(k=K, top_p=0.5, within_nats=2.0),
                  progress=False)
    assert cut.logits_id != full.logits_id
    rc, rf = LogitsReader(cut.uri), LogitsReader(full.uri)
    assert rc.manifest.meta.extra == {"top_p": 0.5, "within_nats": 2.0}
    padded = 0
    for a in rc.iter_samples():
        b = rf.get(a.sample_id)
        kept = a.topk_ids >= 0
        assert kept[:, 0].all()
        padded += int((~kept).sum())
        assert np.all(np.isneginf(a.topk_logprobs[~kept]))
        # the kept entries are the full run's leading ones, to the codec's bound
        np.testing.assert_allclose(a.topk_logprobs[kept], b.topk_logprobs[kept], atol=CodecConfig().step + 1e-6)
        lp = b.topk_logprobs.astype(np.float64)
        before = np.cumsum(np.exp(lp), axis=1) - np.exp(lp)
        needed = (before < 0.5 - 0.05) & (lp >= lp[:, :1] - 2.0 + 0.05)  # clear of the quantisation step
        assert np.all(kept[needed])
        np.testing.assert_array_equal(a.gold_logprob, b.gold_logprob)
    assert padded > 0
    verify = CliRunner().invoke(app, ["store", "verify", cut.uri])  # cut entries (-1, -inf) are no fault
    assert verify.exit_code == 0, verify.output
    no_cut = extract(backend, data, str(tmp_path / "s"), "t", ExtractSettings(k=K, within_nats=float("inf")),
                     progress=False)
    assert no_cut.logits_id == full.logits_id  # a cut that keeps every entry is no cut
    result = CliRunner().invoke(app, ["extract", "--teacher", str(teacher_dir), "--dataset", str(dataset),
                                      "--store", str(tmp_path / "x"), "--top-p", "1.5"])
    assert result.exit_code == 2 and "--top-p 1.5" in result.output
