"""Crash safety and teacher rotation with real processes.

* kill -9 `logitfuse serve` in the middle of a job (after at least one shard is committed), start it
  again: the job resumes and finishes, every sample is stored exactly once, `store verify` passes.
* `max_resident: 1` with two teachers: both queues are served, never two models loaded at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_service import service_config, teacher_entry, tiny_teacher
from typer.testing import CliRunner

from clients.cli import app as cli_app
from clients.client import TeacherClient, _wait_ready, free_port, run_local_service
from clients.corpus import chat_samples, write_jsonl

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _serve(config: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clients.cli", "serve", "--config", str(config), "--port", str(port)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115


def _children(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def test_kill_9_mid_job_then_resume(tmp_path):
    from datastore.reader import LogitsReader

    # small shards and batches so that a kill lands between commits, long samples so the job takes a while
    teacher = teacher_entry("tiny", tiny_teacher(), shard_rows=4, batch_tokens=1024)
    cfg_path = tmp_path / "teachers.yaml"
    cfg_path.write_text(yaml.safe_dump(service_config(tmp_path, [teacher])))
    records = chat_samples(80, seed=21, max_turns=3)
    data = write_jsonl(records, tmp_path / "chat.jsonl")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(cfg_path, port, tmp_path / "serve.log")
    try:
        _wait_ready(url, proc, 180, teachers_ready=True)
        with TeacherClient(url) as client:
            job = client.submit(client.upload(data)["id"], "tiny", k=4)
            deadline = time.monotonic() + 240
            while True:
                state = client.job(job["id"])
                log = Path(state["uri"] or "/nonexistent") / "_delta_log"
                if log.is_dir() and len(LogitsReader(state["uri"]).manifest.shards) >= 2:
                    break
                assert state["state"] in ("queued", "running"), state
                assert time.monotonic() < deadline, "no shard committed in time"
                time.sleep(0.05)
        children = _children(proc.pid)  # the teacher worker and the upload validation process
        assert len(children) >= 2, children
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Workers and validators die with the server (PR_SET_PDEATHSIG); give the kernel a moment to reap them.
    time.sleep(1)
    assert not {c for c in children if Path(f"/proc/{c}").exists() and
                Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}, "orphaned processes"
    killed_at = len(LogitsReader(state["uri"]).manifest.shards)
    assert killed_at < 20, "the job finished before the kill; make it longer"

    proc = _serve(cfg_path, port, tmp_path / "serve.log")
    try:
        _wait_ready(url, proc, 180, teachers_ready=True)
        with TeacherClient(url) as client:
            done = client.wait(job["id"], progress=False, timeout=300)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert done["state"] == "done", done
    assert done["attempts"] == 2 and done["samples_done"] == done["samples_total"] == 80
    ids = [s.sample_id for s in LogitsReader(done["uri"]).iter_samples()]
    assert len(ids) == len(set(ids)) == 80
    assert set(ids) == {str(r["id"]) for r in records}
    verify = CliRunner().invoke(cli_app, ["store", "verify", done["uri"]])
    assert verify.exit_code == 0, verify.output


def test_max_resident_loads_teachers_in_turn(tmp_path):
    model = tiny_teacher()
    cfg = service_config(tmp_path, [teacher_entry("first", model), teacher_entry("second", model)], max_resident=1)
    data = write_jsonl(chat_samples(12, seed=4), tmp_path / "chat.jsonl")
    seen_loaded: list[int] = []
    with run_local_service(cfg, teachers_ready=False) as url, TeacherClient(url) as client:
        did = client.upload(data)["id"]
        jobs = [client.submit(did, name, k=k)["id"] for name, k in (("first", 3), ("second", 3), ("first", 4))]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = httpx.get(f"{url}/healthz").json()["teachers"]
            seen_loaded.append(sum(s in ("loading", "ready", "busy") for s in states.values()))
            if all(client.job(j)["state"] in ("done", "failed", "cancelled") for j in jobs):
                break
            time.sleep(0.1)
        finals = [client.job(j) for j in jobs]
    assert [j["state"] for j in finals] == ["done"] * 3, finals
    assert max(seen_loaded) == 1
