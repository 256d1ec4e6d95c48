"""Python client of the teacher service: upload a dataset, submit a job, wait for it with progress, fetch
its manifest. Also `run_local_service`, which runs `logitfuse serve` in a subprocess on a free port (the
demo, the tests and the benchmarks use it).

Every error the server reports comes back as a `ServiceError` (a `UserError`, so the CLI prints it as
one line) carrying the HTTP status and the server's message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from datastore.errors import UserError

TERMINAL = ("done", "failed", "cancelled")


class ServiceError(UserError):
    def __init__(self, status: int, message: str):
        super().__init__(f"server said {status}: {message}")
        self.status = status
        self.message = message


class TeacherClient:
    """A thin, synchronous client; one instance per server (reuses its HTTP connection)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> dict | list:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise UserError(f"{self.base_url}: cannot reach the teacher service ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text[:200]
            raise ServiceError(r.status_code, message)
        return r.json()

    # -------------------------------------------------------------- calls

    def teachers(self) -> list[dict]:
        return self._call("GET", "/v1/teachers")

    def upload(self, path: str | Path, skip_invalid: bool = False, chunk_bytes: int = 1 << 20) -> dict:
        """Stream a dataset file to the server; returns {id, samples, skipped, ...}."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: dataset file not found")

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(chunk_bytes):
                    yield chunk

        return self._call("POST", "/v1/datasets", params={"skip_invalid": str(skip_invalid).lower()},
                          content=chunks(), headers={"Content-Type": "application/octet-stream",
                                                     "Content-Length": str(path.stat().st_size)})

    def submit(self, dataset: str, teacher: str, k: int = 10, chat_template: str | None = None,
               max_length: int | None = None, all_positions: bool = False) -> dict:
        body = {"dataset": dataset, "teacher": teacher, "k": k, "all_positions": all_positions}
        if chat_template:
            body["chat_template"] = chat_template
        if max_length:
            body["max_length"] = max_length
        return self._call("POST", "/v1/jobs", json=body)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("DELETE", f"/v1/jobs/{job_id}")

    def manifest(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}/manifest")

    def topk(self, teacher: str, samples: list[dict], k: int = 10, **options) -> dict:
        return self._call("POST", "/v1/topk", json={"teacher": teacher, "samples": samples, "k": k, **options})

    def wait(self, job_id: str, progress: bool = True, poll_s: float = 1.0, timeout: float | None = None) -> dict:
        """Poll a job until it is done, failed or cancelled; a tqdm bar shows samples and tokens/s.

        Polls often at first and then every 2% of the time waited so far (at most every `poll_s`), so a
        short job is seen finishing promptly and a long one is not slowed by status requests.
        """
        bar = None
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            while True:
                job = self.job(job_id)
                if progress:
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(total=job["samples_total"], unit="sample", desc=f"{job['teacher']} {job_id}",
                                   file=sys.stderr, dynamic_ncols=True)
                    bar.n = job["samples_done"]
                    bar.set_postfix(state=job["state"], tok_s=f"{job['tokens_per_s']:,.0f}")
                if job["state"] in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f}s")
                time.sleep(min(poll_s, max(0.02, 0.02 * (time.monotonic() - started))))
        finally:
            if bar is not None:
                bar.close()

    def extract(self, dataset_path: str | Path, teacher: str, k: int = 10, progress: bool = True, **options) -> dict:
        """Upload, submit and wait: the service's equivalent of `teacher_server.extract.extract`."""
        ds = self.upload(dataset_path)
        job = self.submit(ds["id"], teacher, k, **options)
        job = self.wait(job["id"], progress=progress)
        if job["state"] != "done":
            raise UserError(f"job {job['id']} {job['state']}: {'; '.join(job['errors']) or 'no error recorded'}")
        return job

    def extract_many(self, dataset_path: str | Path, teachers: list[str], k: int = 10, progress: bool = True,
                     **options) -> dict[str, dict]:
        """Upload once, submit to every teacher at once (their queues run in parallel), wait for all."""
        ds = self.upload(dataset_path)
        jobs = {t: self.submit(ds["id"], t, k, **options) for t in teachers}
        done = {}
        for t, job in jobs.items():
            done[t] = self.wait(job["id"], progress=progress)
            if done[t]["state"] != "done":
                raise UserError(f"job {job['id']} ({t}) {done[t]['state']}: "
                                f"{'; '.join(done[t]['errors']) or 'no error recorded'}")
        return done


# -------------------------------------------------------------------------- a local server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base_url: str, proc: subprocess.Popen, timeout: float, teachers_ready: bool) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"logitfuse serve exited with status {proc.returncode} before it was ready")
        try:
            r = httpx.get(f"{base_url}/healthz", timeout=2)
            if r.status_code == 200:
                states = r.json().get("teachers", {})
                last = str(states)
                if not teachers_ready or all(s in ("ready", "busy") for s in states.values()):
                    return
                if any(s == "failed" for s in states.values()):
                    raise UserError(f"a teacher failed to load: {states}")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"logitfuse serve at {base_url} not ready after {timeout:.0f}s ({last})")


@contextmanager
def run_local_service(
    config: str | Path | dict,
    store: str | None = None,
    port: int | None = None,
    timeout: float = 180,
    teachers_ready: bool = True,
    log_path: str | Path | None = None,
) -> Iterator[str]:
    """Run `logitfuse serve` in a subprocess on a free local port; yield its base URL, stop it on exit.

    `config` is a teachers.yaml path or the same content as a dict. With `teachers_ready` the URL is
    yielded once every teacher's worker has loaded its model (so a timed job does not include loading).
    """
    tmpdir = None
    if isinstance(config, dict):
        tmpdir = tempfile.mkdtemp(prefix="logitfuse-serve-")
        path = Path(tmpdir) / "teachers.yaml"
        path.write_text(yaml.safe_dump(config))
        config = path
    port = port or free_port()
    cmd = [sys.executable, "-m", "clients.cli", "serve", "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port)]
    if store:
        cmd += ["--store", store]
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=log or None,
                            cwd=str(Path(__file__).resolve().parents[1]), env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, timeout, teachers_ready)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if log:
            log.close()
        if tmpdir:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
