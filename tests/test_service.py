"""The teacher service through a real `logitfuse serve` process on a free port (httpx): auth, bad input
(4xx JSON naming the problem, never a 500, nothing partial stored), a job end to end, the same job on
resubmission, `/v1/topk`, `/metrics`, and `logitfuse submit`."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import cache_dir
from typer.testing import CliRunner

from clients.cli import app as cli_app
from clients.client import ServiceError, TeacherClient, free_port, run_local_service
from clients.corpus import chat_samples, write_jsonl

REPO = Path(__file__).resolve().parents[1]

WRITE_TOKEN, READ_TOKEN = "write-token-research", "read-token-viewers"
TEACHER_STEPS = 40


def tiny_teacher() -> Path:
    """A tiny trained Llama on the 32k SentencePiece tokenizer with the [INST] template (cached for the
    session under pytest's tmp path)."""
    from clients.tiny_models import make_teacher
    from teacher_server.render import TEMPLATE_DIR

    return make_teacher(cache_dir("teachers") / "llama-spm", "llama", "spm32k",
                        (TEMPLATE_DIR / "inst.jinja").read_text(encoding="utf-8"), steps=TEACHER_STEPS)


def service_config(root: Path, teachers: list[dict], **extra) -> dict:
    return {
        "store": str(root / "store"),
        "state_dir": str(root / "state"),
        "teachers": teachers,
        **extra,
    }


def teacher_entry(name: str, model: Path, **extra) -> dict:
    return {"name": name, "model": str(model), "backend": "hf", "max_k": 16, "max_length": 256,
            "shard_rows": 8, "batch_tokens": 2048, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    cfg = service_config(
        root, [teacher_entry("tiny", tiny_teacher())], max_upload_bytes=100_000, max_topk_samples=3,
        tokens=[{"team": "research", "sha256": hashlib.sha256(WRITE_TOKEN.encode()).hexdigest(), "scope": "write"},
                {"team": "viewers", "sha256": hashlib.sha256(READ_TOKEN.encode()).hexdigest(), "scope": "read"}],
    )
    path = root / "teachers.yaml"  # kept, so that a test can start a second server on the same config
    path.write_text(yaml.safe_dump(cfg))
    with run_local_service(path, log_path=root / "serve.log") as url:
        yield url, root


@pytest.fixture(scope="module")
def http(server):
    url, _ = server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {WRITE_TOKEN}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory) -> Path:
    return write_jsonl(chat_samples(24, seed=5), tmp_path_factory.mktemp("data") / "chat.jsonl")


def _err(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    for w in words:
        assert w.lower() in body["error"].lower(), (w, body["error"])
    return body["error"]


def _stored(root: Path) -> tuple[list[str], list[str]]:
    datasets = sorted(p.name for p in (root / "state" / "datasets").iterdir())
    logits = sorted(p.name for p in (root / "store" / "logits").iterdir()) if (root / "store" / "logits").exists() else []
    return datasets, logits


# ------------------------------------------------------------------------------------------ service


def test_health_docs_and_openapi(server):
    url, _ = server
    assert httpx.get(f"{url}/healthz").json()["teachers"] == {"tiny": "ready"}
    assert httpx.get(f"{url}/docs").status_code == 200
    spec = httpx.get(f"{url}/openapi.json").json()
    for route in ("/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/topk", "/v1/teachers"):
        assert route in spec["paths"]


def test_auth(server):
    url, _ = server
    _err(httpx.get(f"{url}/v1/teachers"), 401, "bearer")
    _err(httpx.get(f"{url}/v1/teachers", headers={"Authorization": "Bearer nope"}), 401, "unknown")
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    teachers = httpx.get(f"{url}/v1/teachers", headers=read)
    assert teachers.status_code == 200 and teachers.json()[0]["name"] == "tiny"
    _err(httpx.post(f"{url}/v1/datasets", headers=read, content=b'{"id": 1, "text": "x"}\n'), 403, "write")
    _err(httpx.post(f"{url}/v1/jobs", headers=read, json={"dataset": "x", "teacher": "tiny"}), 403, "write")
    _err(httpx.delete(f"{url}/v1/jobs/abc", headers=read), 403, "write")
    _err(httpx.get(f"{url}/v1/jobs/abc", headers=read), 404, "abc")


def test_bad_uploads_store_nothing(server, http):
    _, root = server
    before = _stored(root)
    good = json.dumps(chat_samples(1, seed=1)[0])
    _err(http.post("/v1/datasets", content=f"{good}\n{{not json\n".encode()), 400, "line 2", "json")
    no_assistant = json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]})
    _err(http.post("/v1/datasets", content=no_assistant.encode()), 400, "assistant")
    empty_turn = json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "  "}]})
    _err(http.post("/v1/datasets", content=empty_turn.encode()), 400, "empty")
    _err(http.post("/v1/datasets", content=b""), 400, "empty upload")
    dup = f"{good}\n{good}\n".encode()
    _err(http.post("/v1/datasets", content=dup), 400, "duplicate id")
    _err(http.post("/v1/datasets", content=b"PAR1 this is no parquet"), 400, "parquet")
    big = (good + "\n") * (200_000 // len(good))
    _err(http.post("/v1/datasets", content=big.encode()), 413, "limit")

    def streamed():  # no Content-Length: the limit is enforced while streaming
        for _ in range(40):
            yield (good + "\n").encode() * 10

    _err(http.post("/v1/datasets", content=streamed()), 413, "limit")
    assert _stored(root) == before
    assert not list((root / "state" / "datasets").glob(".upload-*"))


def test_upload_by_store_uri(server, http, good_dataset, tmp_path):
    _, root = server
    inside = root / "store" / "datasets-in" / "chat.jsonl"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(good_dataset.read_bytes())
    r = http.post("/v1/datasets", params={"uri": str(inside)})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == http.post("/v1/datasets", content=good_dataset.read_bytes()).json()["id"]
    _err(http.post("/v1/datasets", params={"uri": str(good_dataset)}), 400, "not inside")
    _err(http.post("/v1/datasets", params={"uri": str(root / "store" / "../state/jobs.sqlite")}), 400, "not inside")
    _err(http.post("/v1/datasets", params={"uri": str(inside) + ".missing"}), 400, "no such file")


def test_bad_job_requests(server, http, good_dataset):
    ds = http.post("/v1/datasets", content=good_dataset.read_bytes())
    assert ds.status_code == 201, ds.text
    did = ds.json()["id"]
    _, root = server
    before = _stored(root)
    _err(http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 422, "json")
    _err(http.post("/v1/jobs", json=["a list"]), 422)
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "colour": "red"}), 422, "colour")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "k": "many"}), 422, "k")
    _err(http.post("/v1/jobs", json={"dataset": did}), 422, "teacher")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "gpt-9"}), 400, "unknown teacher", "gpt-9", "tiny")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "k": 17}), 400, "k=17", "max_k=16")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "k": 0}), 422, "k")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "max_length": 100000}), 400, "max_length")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "chat_template": "/etc/passwd"}), 400,
         "chat_template")
    _err(http.post("/v1/jobs", json={"dataset": "0123456789abcdef", "teacher": "tiny"}), 400, "unknown dataset")
    # strict types: a JSON `true` is no k and "yes" no boolean (they made a job with k=1, all_positions=True)
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "k": True}), 422, "k: ", "valid integer")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "all_positions": "yes"}), 422,
         "all_positions: ", "valid boolean")
    _err(http.post("/v1/jobs", json={"dataset": did, "teacher": "tiny", "max_length": 64.0}), 422, "max_length: ",
         "valid integer")
    _err(http.post("/v1/topk", json={"teacher": "tiny", "samples": [{"id": "a", "text": "x"}], "k": True}), 422,
         "k: ", "valid integer")
    # a JSON object is expected, as UTF-8, sent as application/json
    as_text = json.dumps({"dataset": did, "teacher": "tiny"}).encode()
    _err(http.post("/v1/jobs", content=as_text, headers={"Content-Type": "text/plain"}), 422,
         "body: expected a JSON object sent with Content-Type: application/json, got Content-Type: text/plain")
    _err(http.post("/v1/jobs", json=["a list"]), 422, "body: expected a JSON object, got an array")
    latin1 = '{"dataset": "caf\u00e9", "teacher": "tiny"}'.encode("latin-1")
    _err(http.post("/v1/jobs", content=latin1, headers={"Content-Type": "application/json"}), 400,
         f"body: not UTF-8 JSON (byte 0xe9 at offset {latin1.index(0xE9)} is invalid)")
    # list filters name what they accept
    _err(http.get("/v1/jobs", params={"state": "bogus"}), 400, "state 'bogus': expected one of queued, running, "
         "done, failed, cancelled")
    assert http.get("/v1/jobs", params={"state": "done"}).status_code == 200
    _err(http.get("/v1/jobs/does-not-exist"), 404, "does-not-exist")
    _err(http.delete("/v1/jobs/does-not-exist"), 404, "does-not-exist")
    _err(http.get("/v1/jobs/does-not-exist/manifest"), 404)
    _err(http.get("/v1/no-such-route"), 404)
    assert http.get("/v1/jobs").json() == []  # no job was created by any of these
    assert _stored(root) == before


def test_topk(server, http):
    sample = chat_samples(1, seed=3)[0]
    r = http.post("/v1/topk", json={"teacher": "tiny", "samples": [sample], "k": 4})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["id"] == str(sample["id"]) and len(res["topk_ids"]) == len(res["positions"]) > 0
    for row in res["topk_logprobs"]:
        assert len(row) == 4 and row == sorted(row, reverse=True) and row[0] <= 0
    long_text = {"id": "long", "text": "the cat sat on the mat. " * 200}
    _err(http.post("/v1/topk", json={"teacher": "tiny", "samples": [long_text]}), 400, "above max_length=256")
    _err(http.post("/v1/topk", json={"teacher": "tiny", "samples": [{"id": "e", "text": ""}]}), 400, "samples[0]")
    _err(http.post("/v1/topk", json={"teacher": "tiny", "samples": []}), 422, "samples")
    _err(http.post("/v1/topk", json={"teacher": "tiny", "samples": [sample] * 4}), 400, "at most 3")
    _err(http.post("/v1/topk", json={"teacher": "tiny", "samples": [sample], "k": 99}), 400, "max_k")


def test_job_end_to_end_and_resubmission(server, good_dataset):
    from datastore.reader import LogitsReader

    url, root = server
    with TeacherClient(url, WRITE_TOKEN) as client:
        ds = client.upload(good_dataset)
        job = client.submit(ds["id"], "tiny", k=5)
        done = client.wait(job["id"], progress=False, timeout=300)
        assert done["state"] == "done", done
        assert done["samples_done"] == done["samples_total"] == done["samples_scored"] == 24 and done["errors"] == []
        again = client.submit(ds["id"], "tiny", k=5)
        assert again["id"] == job["id"] and again["existing"] is True
        # a job that ended cannot be cancelled: 409 naming its state, the job unchanged (was: 200)
        r = httpx.delete(f"{url}/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
        _err(r, 409, f"job {job['id']} already ended (state done)")
        assert r.json()["state"] == "done" and client.job(job["id"]) == done
        manifest = client.manifest(job["id"])
        assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == 24
        assert len(manifest["shards"]) == 3  # shard_rows 8
    reader = LogitsReader(done["uri"])
    ids = [s.sample_id for s in reader.iter_samples()]
    assert sorted(ids) == sorted(str(s["id"]) for s in chat_samples(24, seed=5))
    verify = CliRunner().invoke(cli_app, ["store", "verify", done["uri"]])
    assert verify.exit_code == 0, verify.output
    # the same data product as `logitfuse extract`: same logits id, so the CLI finds everything stored
    cli = CliRunner().invoke(cli_app, ["extract", "--teacher", str(tiny_teacher()), "--name", "tiny", "--dataset",
                                       str(good_dataset), "--store", str(root / "store"), "--k", "5",
                                       "--max-length", "256"])
    assert cli.exit_code == 0, cli.output
    assert f"{done['uri']}: 0 samples scored, 24 already stored" in cli.output
    metrics = httpx.get(f"{url}/metrics").text
    assert 'logitfuse_samples_done_total{teacher="tiny"} 24' in metrics
    assert 'logitfuse_queue_depth{teacher="tiny"} 0' in metrics
    assert "logitfuse_http_errors_total" in metrics


def test_submit_command_and_cancel(server, tmp_path):
    url, _ = server
    data = write_jsonl(chat_samples(10, seed=9), tmp_path / "small.jsonl")
    out = CliRunner().invoke(cli_app, ["submit", "--server", url, "--dataset", str(data), "--teacher", "tiny",
                                       "--k", "3", "--wait", "--token", WRITE_TOKEN])
    assert out.exit_code == 0, out.output
    job = json.loads(out.stdout.strip().splitlines()[-1])
    assert job["state"] == "done" and job["samples_done"] == 10
    bad = CliRunner().invoke(cli_app, ["submit", "--server", url, "--dataset", str(data), "--teacher", "nope",
                                       "--token", WRITE_TOKEN])
    assert bad.exit_code == 2 and "unknown teacher" in bad.output
    with TeacherClient(url, WRITE_TOKEN) as client:
        many = client.extract_many(data, ["tiny"], k=6, progress=False)
        assert many["tiny"]["state"] == "done" and many["tiny"]["samples_done"] == 10
        ds = client.upload(data)
        job = client.submit(ds["id"], "tiny", k=2)
        try:
            cancelled = client.cancel(job["id"])["state"]
        except ServiceError as e:  # it finished first: 409, left done
            assert e.status == 409 and "already ended (state done)" in e.message, e
            cancelled = "done"
        assert cancelled in ("cancelled", "done")
        final = client.wait(job["id"], progress=False, timeout=120)
        assert final["state"] == cancelled


def test_done_job_whose_logits_were_removed_is_computed_again(server, tmp_path):
    """`logitfuse store rm` of a done job's logits: resubmitting the same settings queues the work again
    (was: 200 `existing: true` with the deleted URI, then /manifest 404)."""
    url, root = server
    data = write_jsonl(chat_samples(6, seed=77), tmp_path / "rm.jsonl")
    with TeacherClient(url, WRITE_TOKEN) as client:
        did = client.upload(data)["id"]
        first = client.wait(client.submit(did, "tiny", k=3)["id"], progress=False, timeout=300)
        assert first["state"] == "done", first
        rm = CliRunner().invoke(cli_app, ["store", "rm", first["uri"]])
        assert rm.exit_code == 0 and not Path(first["uri"]).exists(), rm.output
        r = httpx.post(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {WRITE_TOKEN}"},
                       json={"dataset": did, "teacher": "tiny", "k": 3})
        assert r.status_code == 201, r.text
        again = r.json()
        assert again["existing"] is False and again["id"] != first["id"] and again["replaces"] == first["id"]
        assert again["state"] in ("queued", "running") and "no longer in the store" in again["note"]
        redone = client.wait(again["id"], progress=False, timeout=300)
        assert redone["state"] == "done" and redone["uri"] == first["uri"], redone
        assert redone["samples_done"] == redone["samples_scored"] == 6
        assert sum(s["rows"] for s in client.manifest(again["id"])["shards"]) == 6
        # the dataset is back: the next submission is the new job, existing
        third = client.submit(did, "tiny", k=3)
        assert third["id"] == again["id"] and third["existing"] is True and "replaces" not in third
        assert client.job(first["id"])["state"] == "done"  # the old job's record stays as it was


def _serve_once(config: Path, port: int, *args: str) -> subprocess.CompletedProcess:
    """`logitfuse serve` that is expected to refuse at once (a server that starts instead is killed after
    a minute: the test fails on its timeout rather than hanging)."""
    cmd = [sys.executable, "-m", "clients.cli", "serve", "--config", str(config), "--port", str(port), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def _one_line_error(out: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (out.returncode, lines)
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_second_server_on_the_same_state_dir_refuses_before_touching_anything(server, tmp_path):
    """A second `logitfuse serve` on the same config used to requeue the running jobs and SIGKILL the live
    server's workers, even when it then failed to bind its port (exit 3). Now it refuses first."""
    from teacher_server.jobs import JobDB

    url, root = server
    port = int(url.rsplit(":", 1)[1])
    state = root / "state"
    db = JobDB(state / "jobs.sqlite")
    worker = db.workers()["tiny"]
    assert worker["state"] == "ready" and worker["pid"], worker
    server_pid = _ppid(worker["pid"])
    # a job the live server is running (another team's, so no other test sees it)
    ghost, _ = db.create_job("ghost-key", "tiny", "ghost-dataset", 1, "model", 8, False, "ghost-team", 1)
    with sqlite3.connect(db.path) as con:
        con.execute("UPDATE jobs SET state='running', attempts=1 WHERE id=?", (ghost.id,))
    try:
        for second_port in (port, free_port()):  # its own port or the live one: the state dir is named first
            out = _serve_once(root / "teachers.yaml", second_port)
            _one_line_error(out, f"state_dir {state} is in use by another logitfuse serve (pid {server_pid})")
            assert "resuming" not in out.stderr
        after = db.job(ghost.id)
        assert (after.state, after.attempts) == ("running", 1)
        assert db.workers()["tiny"] == worker  # same worker, same pid, not marked stopped
        assert Path(f"/proc/{worker['pid']}").exists() and _ppid(worker["pid"]) == server_pid
        assert httpx.get(f"{url}/healthz").json()["teachers"] == {"tiny": "ready"}
        assert (state / "serve.lock").read_text().strip() == str(server_pid)  # the holder, for the message
    finally:
        db.cancel(ghost.id)

    # another state dir, the live server's port: refused before the jobs left running there are resumed
    cfg = yaml.safe_load((root / "teachers.yaml").read_text())
    cfg["state_dir"] = str(tmp_path / "state")
    other = JobDB(tmp_path / "state" / "jobs.sqlite")
    left, _ = other.create_job("left-key", "tiny", "d", 1, "model", 8, False, "research", 1)
    with sqlite3.connect(other.path) as con:
        con.execute("UPDATE jobs SET state='running', attempts=1 WHERE id=?", (left.id,))
    (tmp_path / "teachers.yaml").write_text(yaml.safe_dump(cfg))
    out = _serve_once(tmp_path / "teachers.yaml", port)
    _one_line_error(out, f"cannot listen on 127.0.0.1:{port}: the port is already in use")
    assert (other.job(left.id).state, other.job(left.id).attempts) == ("running", 1)
    assert httpx.get(f"{url}/healthz").json()["teachers"] == {"tiny": "ready"}


def test_serve_refuses_a_store_or_state_dir_that_is_a_file(tmp_path):
    """`store:` naming a file made every client request a 400 and every job fail; now `serve` refuses."""
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    cases = [({"store": str(a_file)}, [], f"store {a_file}: a file is there, not a directory"),
             ({"store": str(a_file / "sub")}, [], f"store {a_file / 'sub'}: {a_file} is a file, not a directory"),
             ({}, ["--store", str(a_file)], f"--store {a_file}: a file is there"),
             ({"state_dir": str(a_file)}, [], f"state_dir {a_file}: a file is there, not a directory")]
    for extra, args, words in cases:
        cfg = {**service_config(tmp_path, [teacher_entry("tiny", tmp_path / "no-model")]), **extra}
        path = tmp_path / "teachers.yaml"
        path.write_text(yaml.safe_dump(cfg))
        _one_line_error(_serve_once(path, free_port(), *args), words)
    assert not (tmp_path / "state" / "jobs.sqlite").exists()  # refused before the job database is opened


def test_samples_stream_of_a_damaged_dataset(tmp_path):
    """`GET /v1/logits/{id}/samples` over a truncated shard was 200, then a dropped connection. Now: a
    missing or truncated shard is a 500 naming it before the stream starts; a shard of the right size whose
    bytes changed ends the stream with one `{"error": ...}` line naming it."""
    from fastapi.testclient import TestClient

    from datastore import LogitsReader, LogitsWriter, logits_id, logits_uri
    from teacher_server.app import create_app
    from teacher_server.config import parse_config
    from tests.test_datastore import meta, sample

    store = str(tmp_path / "store")
    lid = logits_id(meta())
    uri = logits_uri(store, lid)
    with LogitsWriter(uri, meta(), shard_rows=3) as w:
        for i in range(7):
            w.write(sample(i))
    shards = LogitsReader(uri).manifest.shards
    second = Path(uri) / shards[1].file
    good = second.read_bytes()
    cfg = parse_config(service_config(tmp_path, [teacher_entry("tiny", tmp_path / "no-model")]))
    with TestClient(create_app(cfg, start_workers=False)) as client:
        def stream():
            r = client.get(f"/v1/logits/{lid}/samples")
            return r, [json.loads(line) for line in r.text.splitlines()]

        r, lines = stream()
        assert r.status_code == 200 and [x["id"] for x in lines] == [f"sample-{i:03d}" for i in range(7)]
        second.write_bytes(good[: len(good) // 2])  # truncated after the commit
        r, _ = stream()
        _err(r, 500, shards[1].file, f"is {len(good) // 2} bytes, the dataset log records {len(good)}")
        r = client.get(f"/v1/logits/{lid}/samples/sample-004")  # the single-sample route, as before
        _err(r, 500, shards[1].file)
        second.unlink()
        _err(client.get(f"/v1/logits/{lid}/samples"), 500, shards[1].file, "missing")
        altered = bytearray(good)
        altered[100] ^= 0xFF  # same size, other bytes: found only when the shard is read, mid-stream
        second.write_bytes(bytes(altered))
        r, lines = stream()
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        assert [x.get("id") for x in lines[:3]] == ["sample-000", "sample-001", "sample-002"] and len(lines) == 4
        assert set(lines[3]) == {"error"} and shards[1].file in lines[3]["error"], lines[3]
        assert "sha256" in lines[3]["error"] and "store verify" in lines[3]["error"]


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("content, words", [
    (None, ["not found"]),
    ("store: [unclosed", ["not valid yaml"]),
    ("- a list", ["expected a mapping"]),
    ("store: ./s\nteachers: []", ["teachers", "at least 1"]),
    ("teachers:\n  - {name: a, model: m, backend: tensorrt}", ["teachers.0.backend"]),
    ("teachers:\n  - {name: a, model: m, max_k: 0}", ["teachers.0.max_k"]),
    ("teachers:\n  - {name: a, model: m}\n  - {name: a, model: n}", ["unique", "a"]),
    ("teachers:\n  - {name: 'a b', model: m}", ["teachers.0.name"]),
    ("teachers:\n  - {name: a, model: m, colour: red}", ["colour"]),
    ("teachers:\n  - {name: a, model: m}\ntokens:\n  - {team: t, sha256: abc, scope: write}", ["sha256"]),
    ("teachers:\n  - {name: a, model: m}\ntokens:\n  - {team: t, sha256: " + "0" * 64 + ", scope: root}",
     ["scope"]),
    ("teachers:\n  - {name: a, model: m}\nteam_queue_limits: {research: 0}", ["team_queue_limits", "research"]),
    ("teachers:\n  - {name: a, model: m}\nmax_json_bytes: 10", ["max_json_bytes", "1024"]),
])
def test_bad_config_is_one_line_exit_2(tmp_path, content, words):
    path = tmp_path / "teachers.yaml"
    if content is not None:
        path.write_text(content)
    out = CliRunner().invoke(cli_app, ["serve", "--config", str(path)])
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.output
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def test_config_paths_are_relative_to_the_file(tmp_path):
    from teacher_server.config import load_config

    (tmp_path / "models" / "t").mkdir(parents=True)
    path = tmp_path / "teachers.yaml"
    path.write_text("store: ./store\nteachers:\n  - {name: t, model: models/t}\n")
    cfg = load_config(path)
    assert cfg.store == str(tmp_path / "store") and cfg.teachers[0].model == str(tmp_path / "models" / "t")
    assert cfg.state_dir == str(tmp_path / ".logitfuse-service") and cfg.tokens is None
    assert load_config(path, store="s3://bucket/prefix").store == "s3://bucket/prefix"


def test_resubmission_after_retraining_at_the_same_path_is_a_new_job(tmp_path):
    """A service restarted on its state directory must not hand back the old job's logits when the
    teacher's weights were rewritten at the same path (the demo retrains its teachers in place)."""
    import shutil
    import time

    from teacher_server.config import parse_config
    from teacher_server.jobs import DatasetRecord, JobService

    model = tmp_path / "teacher"
    shutil.copytree(tiny_teacher(), model)
    cfg = parse_config(service_config(tmp_path, [teacher_entry("tiny", model)]))
    service = JobService(cfg)
    service.db.add_dataset(DatasetRecord("d1", str(tmp_path / "d.jsonl"), "jsonl", 3, 0, False, 10, time.time()))
    first, created = service.submit("d1", "tiny", 5, None, None, False, team="research")
    assert created
    again, created = JobService(cfg).submit("d1", "tiny", 5, None, None, False, team="research")
    assert (again.id, created) == (first.id, False)  # same weights: the existing job
    weights = next(model.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # retrained in place (same bytes suffice: a rewrite is a new file)
    retrained, created = JobService(cfg).submit("d1", "tiny", 5, None, None, False, team="research")
    assert created and retrained.id != first.id
