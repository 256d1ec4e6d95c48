"""Extraction on a Ray cluster (`extract --ray`, `engine: ray`): real replica processes on the session's
local cluster (`ray_cluster`, conftest), the tiny trained teacher, real kills.

What a user relies on: the store holds every sample exactly once whatever dies (a replica mid-job, the
driver), `store verify` passes, and the stored values are the ones a single-process `extract` stores.
A replica running the vLLM backend is tested with the other vLLM runs, in tests/test_vllm_backend.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_service import tiny_teacher

from clients.corpus import chat_samples, write_jsonl
from datastore.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"k": 8, "max_length": 256, "shard_rows": 4, "batch_tokens": 512}
BATCH_S = 0.6  # seconds a slowed replica's batch lasts at least (the mid-job kill)


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _same_values(a_uri: str, b_uri: str, n: int) -> None:
    """Both datasets hold the same `n` sample ids once each with identical logical values."""
    from datastore.cli import verify_dataset
    from datastore.reader import LogitsReader

    for uri in (a_uri, b_uri):
        problems, _, complete = verify_dataset(uri)
        assert problems == [] and complete
    a, b = LogitsReader(a_uri), LogitsReader(b_uri)
    ids = [s.sample_id for s in a.iter_samples()]
    assert len(ids) == len(set(ids)) == n == len(b)
    for s in a.iter_samples():
        t = b.get(s.sample_id)
        for field in ("input_ids", "loss_mask", "positions", "topk_ids", "topk_logprobs", "gold_logprob"):
            np.testing.assert_array_equal(getattr(s, field), getattr(t, field), err_msg=f"{s.sample_id} {field}")


def _cli(*args: str, store: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "clients.cli", "extract", "--teacher", str(tiny_teacher()), "--dataset", str(data),
            "--store", str(store), *(f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()), *args]


# ------------------------------------------------------------------------------------------ fast


def test_ray_flag_without_ray_is_one_line_naming_the_extra(tmp_path):
    """A user without Ray who passes --ray: exit 2, one line, the pip command; nothing stored."""
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    data = write_jsonl(chat_samples(2, seed=1), tmp_path / "d.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "clients.cli", "extract", "--teacher", str(tmp_path / "none"), "--dataset", str(data),
         "--store", str(tmp_path / "store"), "--ray", "local"],
        cwd=REPO, env=_env(PYTHONPATH=f"{tmp_path / 'shim'}{os.pathsep}{REPO}"), capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'logitfuse[ray]'" in lines[0], proc.stderr
    assert not (tmp_path / "store").exists()


def test_teachers_yaml_engine_ray_is_validated():
    from teacher_server.config import parse_config

    cfg = parse_config({"teachers": [{"name": "t", "model": "m", "engine": "ray",
                                      "ray": {"address": "10.0.0.1:6379", "replicas": 4, "num_cpus": 0.5,
                                              "num_gpus": 0.25, "env": {"OMP_NUM_THREADS": "4"}}}]})
    ray = cfg.teachers[0].ray
    assert (ray.address, ray.replicas, ray.num_cpus, ray.num_gpus) == ("10.0.0.1:6379", 4, 0.5, 0.25)
    assert ray.env == {"OMP_NUM_THREADS": "4"}
    local = parse_config({"teachers": [{"name": "t", "model": "m"}]}).teachers[0]
    assert local.engine == "local"
    # what the service hands its worker processes: the dumped config, defaults and all, validates again
    assert type(local).model_validate_json(local.model_dump_json()) == local
    assert type(cfg.teachers[0]).model_validate_json(cfg.teachers[0].model_dump_json()) == cfg.teachers[0]
    for teacher, words in (
        ({"engine": "ray", "ray": {"num_cpus": 0}}, ["teachers.0.ray.num_cpus", "greater than 0"]),
        ({"engine": "ray", "ray": {"replicas": 0}}, ["teachers.0.ray.replicas"]),
        ({"engine": "ray", "ray": {"gpus": 1}}, ["teachers.0.ray.gpus", "Extra inputs"]),
        ({"ray": {"replicas": 2}}, ["engine is 'local'", "engine: ray"]),
        ({"engine": "ray", "devices": ["cuda:0"]}, ["ray.num_gpus"]),
        ({"engine": "spark"}, ["teachers.0.engine"]),
        ({"engine": "ray", "ray": {"env": ["OMP_NUM_THREADS=4"]}}, ["teachers.0.ray.env"]),
    ):
        with pytest.raises(UserError) as e:
            parse_config({"teachers": [{"name": "t", "model": "m", **teacher}]}, "teachers.yaml")
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_cli_rejects_bad_replica_settings_in_one_line(tmp_path):
    """Checked before the model or the cluster is touched."""
    from typer.testing import CliRunner

    from clients.cli import app

    pytest.importorskip("ray")
    data = write_jsonl(chat_samples(2, seed=1), tmp_path / "d.jsonl")
    for flag, value in (("--replicas", "0"), ("--replica-cpus", "0"), ("--replica-gpus", "-1"),
                        ("--replica-env", "OMP_NUM_THREADS"), ("--replica-env", "=1")):
        res = CliRunner().invoke(app, ["extract", "--teacher", str(tmp_path), "--dataset", str(data), "--store",
                                       str(tmp_path / "s"), "--ray", "local", flag, value])
        assert res.exit_code == 2, res.output
        assert f"{flag} {value}" in res.output and len(res.output.strip().splitlines()) == 1, res.output


# ------------------------------------------------------------------------------------------ on the cluster


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(chat_samples(36, seed=23), tmp_path_factory.mktemp("ray-data") / "chat.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    """The same dataset extracted by a plain single-process `extract` (HF backend, same settings)."""
    from datastore.chat import load_dataset
    from teacher_server.backends.hf import HFBackend
    from teacher_server.extract import ExtractSettings, extract

    store = tmp_path_factory.mktemp("ref-store")
    backend = HFBackend(tiny_teacher())
    settings = ExtractSettings(**SETTINGS)
    return extract(backend, load_dataset(dataset), str(store), "llama-spm", settings, progress=False)


def _pool(address: str, replicas: int, env: dict | None = None, **teacher):
    from teacher_server.config import RayConfig, TeacherConfig
    from teacher_server.ray_engine import RayPool

    options = RayConfig(address=address, replicas=replicas, num_cpus=0.5, tokenize_cpus=0.25, max_restarts=0,
                        env=env or {})
    spec = TeacherConfig(name="llama-spm", model=str(tiny_teacher()), max_k=SETTINGS["k"],
                         max_length=SETTINGS["max_length"], engine="ray", ray=options, **teacher)
    return RayPool(spec, options)


def _slow_replicas(tmp_path: Path) -> dict[str, str]:
    """`ray.env` for replicas whose every batch lasts at least BATCH_S. The tiny teacher scores the whole
    dataset within one progress tick (replicas report about twice a second), so "mid-job" — a kill, a
    status with some samples done — would race the job's end. The replicas (only they) import a
    sitecustomize that wraps the HF backend's `score`."""
    hook = tmp_path / "slow"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\nfrom teacher_server.backends.hf import HFBackend\n_score = HFBackend.score\n"
        f"def score(self, batch, k):\n    time.sleep({BATCH_S})\n    return _score(self, batch, k)\n"
        "HFBackend.score = score\n")
    return {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}


@pytest.mark.slow
def test_two_replicas_one_killed_mid_job_store_every_sample_once(ray_cluster, tmp_path, dataset, reference):
    from datastore.chat import load_dataset
    from teacher_server.extract import ExtractSettings

    pool = _pool(ray_cluster, replicas=2, env=_slow_replicas(tmp_path))
    killed: dict = {}
    seen: list[tuple[int, int]] = []
    try:
        pids = pool.pids()
        assert len(set(pids)) == 2 and os.getpid() not in pids

        def on_batch(res) -> None:
            done = res.samples_scored + res.samples_already_stored
            seen.append((done, res.tokens))
            if not killed and done >= SETTINGS["shard_rows"]:  # mid-job: both replicas hold ranges
                os.kill(pids[1], signal.SIGKILL)
                killed["at"] = done

        res = pool.run(load_dataset(dataset), str(tmp_path / "store"), ExtractSettings(**SETTINGS), progress=False,
                       on_batch=on_batch)
    finally:
        pool.close()
    assert killed and killed["at"] < 36, (killed, seen)
    assert not Path(f"/proc/{pids[1]}").exists() or "Z" in Path(f"/proc/{pids[1]}/stat").read_text().split()[2]
    assert res.logits_id == reference.logits_id and res.samples_scored == 36 and res.samples_already_stored == 0
    assert res.tokens >= reference.tokens and res.tokens_per_s > 0  # the killed range was scored again
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:], strict=False))  # progress never goes back
    _same_values(res.uri, reference.uri, 36)


@pytest.mark.slow
def test_driver_killed_then_the_same_command_resumes(ray_cluster, tmp_path, dataset, reference):
    from datastore.table import DeltaDataset

    store = tmp_path / "store"
    cmd = _cli("--ray", ray_cluster, "--replicas", "1", "--replica-cpus", "0.5", store=store, data=dataset)
    log = tmp_path / "log"
    uri = store / "logits" / reference.logits_id
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if DeltaDataset(str(uri)).exists() and len(DeltaDataset(str(uri)).snapshot().shards) >= 2:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    shards = len(DeltaDataset(str(uri)).snapshot().shards)
    assert 2 <= shards < 9  # 36 samples in ranges of 4: killed mid-job
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    stored_before = int(again.stdout.split(" scored, ")[1].split(" already")[0])
    assert stored_before >= 4 * shards - 4, again.stdout  # committed ranges are not scored again
    _same_values(str(uri), reference.uri, 36)


@pytest.mark.slow
def test_service_teacher_with_engine_ray_runs_its_jobs_on_the_cluster(ray_cluster, tmp_path, dataset, reference):
    """teachers.yaml `engine: ray`: the job runs on a replica (the shards' writer is a Ray actor process,
    not the service's worker), its status shows progress and tokens/s as it runs, /v1/topk answers."""
    from test_service import service_config, teacher_entry

    from clients.client import TeacherClient, run_local_service
    from datastore.reader import LogitsReader

    entry = teacher_entry("llama-spm", tiny_teacher(), engine="ray", shard_rows=SETTINGS["shard_rows"],
                          batch_tokens=SETTINGS["batch_tokens"], max_length=SETTINGS["max_length"],
                          ray={"address": ray_cluster, "replicas": 1, "num_cpus": 0.5, "tokenize_cpus": 0.25,
                               "env": _slow_replicas(tmp_path)})
    cfg = service_config(tmp_path, [entry])
    statuses = []
    with run_local_service(cfg, log_path=tmp_path / "serve.log") as url, TeacherClient(url) as client:
        top = client.topk("llama-spm", chat_samples(1, seed=2), k=3)
        assert len(top["results"][0]["topk_ids"][0]) == 3
        ds = client.upload(dataset)
        job = client.submit(ds["id"], "llama-spm", k=SETTINGS["k"])
        while job["state"] in ("queued", "running"):
            statuses.append(job)
            time.sleep(0.1)
            job = client.job(job["id"])
        uri = str(tmp_path / "store" / "logits" / reference.logits_id)
        writers = {int(s.writer.split(":")[1]) for s in LogitsReader(uri).manifest.shards}
        assert len(writers) == 1  # one replica wrote every shard, the service's worker process none
        (pid,) = writers
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Replica"), pid
    assert job["state"] == "done", job
    assert job["samples_done"] == job["samples_total"] == 36 and job["tokens_per_s"] > 0
    assert any(0 < s["samples_done"] < 36 and s["tokens_per_s"] > 0 for s in statuses), statuses
    _same_values(uri, reference.uri, 36)


def test_a_pool_the_cluster_cannot_hold_is_refused_in_one_line():
    """Replicas keep their CPUs for the whole job and tokenising needs some beside them: on 2 CPUs, two
    1-CPU replicas would wait forever (Ray deadlocks); fractions fit."""
    from teacher_server.config import RayConfig
    from teacher_server.ray_engine import check_fits

    two_cpus = {"CPU": 2.0}
    with pytest.raises(UserError, match=r"2 replicas x 1 CPU \+ 0.5 CPU for tokenising = 2.5 CPUs, but the "
                                        r"cluster has 2: .*fractions"):
        check_fits(two_cpus, RayConfig(replicas=2, num_cpus=1))
    check_fits(two_cpus, RayConfig(replicas=2, num_cpus=0.75))
    check_fits(two_cpus, RayConfig(replicas=3, num_cpus=0.5, tokenize_cpus=0.25))
    with pytest.raises(UserError, match="1 GPU = 2 GPUs, but the cluster has 1"):
        check_fits({"CPU": 64.0, "GPU": 1.0}, RayConfig(replicas=2, num_gpus=1))
    check_fits({"CPU": 64.0, "GPU": 1.0}, RayConfig(replicas=2, num_gpus=0.5))
