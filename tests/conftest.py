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
