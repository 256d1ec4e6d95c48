"""Shared fixtures: the real tokenizers from the mistral_common wheel and tiny models built from configs."""

from __future__ import annotations

import pytest


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
def smollm2_tokenizer():
    """The real chat model's tokenizer (49,152-token byte-level BPE, ChatML; converted once into the cache)."""
    from transformers import AutoTokenizer

    from clients.smollm2 import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())
