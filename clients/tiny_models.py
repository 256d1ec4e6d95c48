"""Tiny models of real architectures (Llama, Mistral, Mixtral, Qwen2) on the real tokenizers that ship
in the mistral_common wheel, trained for seconds on the project's own text so their distributions
mean something. Used by the demo, the tests and the benchmarks; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from datastore.fs import honour_umask

TOKENIZER_FILES = {
    # kind: (file in mistral_common/data, name AutoTokenizer looks for)
    "spm32k": ("tokenizer.model.v1", "tokenizer.model"),
    "bpe131k": ("tekken_240911.json", "tekken.json"),
}
ARCHS = ("llama", "mistral", "mixtral", "qwen2")


def _mistral_common_data() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


TOKENIZER_CACHE_ENV = "LOGITFUSE_TOKENIZER_CACHE"
_process_cache: tempfile.TemporaryDirectory | None = None


def tokenizer_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where converted tokenizers are kept: `cache_dir`, else ``$LOGITFUSE_TOKENIZER_CACHE`` (the tests set
    it to a directory under pytest's tmp path), else a temporary directory of this process, removed when
    the process exits. Nothing is written to a fixed path."""
    global _process_cache
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(TOKENIZER_CACHE_ENV):
        return Path(os.environ[TOKENIZER_CACHE_ENV])
    if _process_cache is None:
        _process_cache = tempfile.TemporaryDirectory(prefix="logitfuse-tokenizers-")
    return Path(_process_cache.name)


def load_tokenizer(kind: str, chat_template: str | None = None, cache_dir: str | Path | None = None):
    """A real fast tokenizer from the mistral_common wheel: `spm32k` (SentencePiece, 32k) or
    `bpe131k` (byte-level BPE, 131k), with BOS/EOS/PAD set and an optional chat template.

    Converting the wheel's file takes seconds (tens for bpe131k on a busy CPU), so the converted tokenizer
    is saved once under `tokenizer_cache_dir(cache_dir)` and loaded from there. Raises ValueError for an
    unknown `kind`."""
    from transformers import AutoTokenizer

    if kind not in TOKENIZER_FILES:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(TOKENIZER_FILES)}")
    src, name = TOKENIZER_FILES[kind]
    root = tokenizer_cache_dir(cache_dir)
    cache = root / kind
    if not (cache / "tokenizer.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tok-{kind}-", dir=root))
        with tempfile.TemporaryDirectory(prefix=f".raw-{kind}-", dir=root) as raw:
            shutil.copy(_mistral_common_data() / src, Path(raw) / name)
            tok = AutoTokenizer.from_pretrained(raw)
            tok.bos_token, tok.eos_token, tok.unk_token = "<s>", "</s>", "<unk>"
            tok.save_pretrained(tmp)
        honour_umask(tmp)  # mkdtemp made it 0700; the cache is shared
        try:
            tmp.rename(cache)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(cache)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_config(arch: str, vocab_size: int, bos_token_id: int, eos_token_id: int, **overrides):
    """A small config of the real architecture: head size 64 (vLLM's minimum), 2 layers."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")


def build_model(arch: str, tokenizer, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    vocab_size = overrides.pop("vocab_size", len(tokenizer))  # fewer rows than tokens: a broken model for tests
    config = tiny_config(arch, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def train_lm(
    model,
    tokenizer,
    texts: Iterable[str],
    steps: int,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Plain next-token training on packed texts (BOS-separated); returns the loss per step."""
    ids: list[int] = []
    for t in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    data = torch.tensor(ids, dtype=torch.long)
    n_windows = (len(data) - 1) // seq_len
    if n_windows < 1:
        raise ValueError("not enough text for one training window")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, n_windows, (batch_size,), generator=g) * seq_len
        batch = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if log and (step % 20 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {losses[-1]:.3f}")
    model.eval()
    return losses


def make_teacher(
    out_dir: str | Path,
    arch: str,
    tokenizer_kind: str,
    chat_template: str | None = None,
    steps: int = 150,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 3e-3,
    log: Callable[[str], None] | None = None,
    tokenizer_cache: str | Path | None = None,
    texts: list[str] | None = None,
    **config_overrides,
) -> Path:
    """Build, train and save a tiny teacher (model + tokenizer) loadable by `from_pretrained`.

    A directory already holding a teacher made with the same settings is reused as it is.
    `tokenizer_cache`: where the converted tokenizer is kept (`tokenizer_cache_dir`).
    `texts`: what it trains on (default: 400 of `clients.corpus.training_texts`, the project's prose).
    """
    from clients.corpus import training_texts

    out = Path(out_dir)
    default_texts = list(training_texts(400, seed=seed + 1))
    texts = default_texts if texts is None else list(texts)
    settings = {
        "arch": arch,
        "tokenizer": tokenizer_kind,
        "template": chat_template,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "overrides": config_overrides,
        "version": 1,
    }
    if texts != default_texts:  # the default keeps the keys of existing caches
        settings["texts"] = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    marker = out / "logitfuse_teacher.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return out
    tok = load_tokenizer(tokenizer_kind, chat_template, cache_dir=tokenizer_cache)
    model = build_model(arch, tok, seed=seed, **config_overrides)
    t0 = time.perf_counter()
    losses = train_lm(model, tok, texts, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    honour_umask(out)  # safetensors writes through a private 0600 temp file
    marker.write_text(
        json.dumps({"key": key, "settings": settings, "final_loss": losses[-1], "train_s": time.perf_counter() - t0})
    )
    return out
