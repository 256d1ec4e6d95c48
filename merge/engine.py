"""The merge job: check the checkpoints, then merge and write one parameter at a time.

Peak memory is a few chunks plus, for methods that select the top elements of a matrix (SCE with
select_topk < 1, TIES with density < 1), one float32 score per element of the matrix being merged.
`in_memory=True` is the conventional way kept for comparison: every model is read fully first and each
matrix is merged as a single chunk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from merge.config import MergeConfig
from merge.errors import MergeError
from merge.registry import get_method
from merge.safetensors_io import Checkpoint, ShardedWriter, TensorInfo, copy_side_files, parse_size
from merge.stream import ParameterStream

DEFAULT_CHUNK_ELEMENTS = 1 << 20
_TIED_HEAD, _EMBED = "lm_head.weight", "embed_tokens.weight"


def _ties_embeddings(ckpt: Checkpoint) -> bool:
    return bool(ckpt.config.get("tie_word_embeddings", False))


def _embedding_name(ckpt: Checkpoint) -> str | None:
    return next((n for n in ckpt.tensors if n.endswith(_EMBED)), None)


def _check(base: Checkpoint, targets: list[Checkpoint]) -> list[dict[str, TensorInfo]]:
    """For every target, the tensor to read for each base tensor; raises MergeError on any mismatch."""
    resolved = []
    for t in targets:
        who = str(t.dir)
        for key in ("model_type", "vocab_size", "tie_word_embeddings"):
            if key in base.config and key in t.config and base.config[key] != t.config[key]:
                what = "vocabulary mismatch" if key == "vocab_size" else f"{key} mismatch"
                raise MergeError(f"{what}: {who} has {key}={t.config[key]!r}, the base has {base.config[key]!r}")
        mapping: dict[str, TensorInfo] = {}
        missing = []
        for name in base.tensors:
            if name in t.tensors:
                mapping[name] = t.tensors[name]
            elif name.endswith(_TIED_HEAD) and _ties_embeddings(t) and _embedding_name(t):
                mapping[name] = t.tensors[_embedding_name(t)]  # tied: the head is the embedding
            else:
                missing.append(name)
        if missing:
            raise MergeError(f"{who} lacks {len(missing)} tensor(s) the base has, e.g. {missing[0]}")
        extra = [n for n in t.tensors if n not in base.tensors]
        if _ties_embeddings(base):  # a saver may write the tied head anyway
            extra = [n for n in extra if not n.endswith(_TIED_HEAD)]
        if extra:
            raise MergeError(f"{who} has {len(extra)} tensor(s) the base lacks, e.g. {extra[0]}")
        for name, info in base.tensors.items():
            other = mapping[name]
            if other.shape != info.shape:
                if name.endswith((_EMBED, _TIED_HEAD)) and other.shape[1:] == info.shape[1:]:
                    raise MergeError(
                        f"vocabulary mismatch: {who} has {other.shape[0]} rows in {name}, the base has "
                        f"{info.shape[0]}; targets must use the pivot's vocabulary"
                    )
                raise MergeError(f"shape mismatch for {name}: {who} has {list(other.shape)}, the base has {list(info.shape)}")
            if other.dtype != info.dtype:
                raise MergeError(
                    f"mixed dtypes: {who} stores {name} as {other.dtype}, the base as {info.dtype}; "
                    "convert the checkpoints to one dtype first"
                )
        resolved.append(mapping)
    return resolved


def _compute_dtype(base: Checkpoint) -> torch.dtype:
    # Wider than storage: float32 is exact for bf16/fp16 inputs; fp32 inputs are merged in float64 so that
    # rounding the result back gives exactly the input when all models agree.
    wide = any(info.dtype in ("F32", "F64") for info in base.tensors.values())
    return torch.float64 if wide else torch.float32


def _loaded(ckpt: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: ckpt.read(ckpt.tensors[name]) for name in names}


def run_merge(
    config: MergeConfig,
    out_dir: Path | str,
    *,
    progress: Callable[[str], None] | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    max_shard_size: str | int = "5GB",
    in_memory: bool = False,
) -> Path:
    """Merges `config.models` onto `config.base_model` into `out_dir` (created; must be new or empty)."""
    say = progress or (lambda _msg: None)
    method = get_method(config.merge_method)
    out = Path(out_dir)
    base_path = Path(config.base_model)
    entries = list(config.models)
    if method.uses_pivot:  # as mergekit: the base listed among the models contributes no fusion vector
        entries = [m for m in entries if not _same_path(m.model, base_path)]
        if not entries:
            raise MergeError(f"{config.merge_method} needs at least one model other than base_model")
    kwargs = method.bind(config.parameters, [m.parameters for m in entries])
    if config.merge_method == "linear" and kwargs["normalize"] and sum(kwargs["weight"]) == 0:
        raise MergeError("linear: the weights sum to 0, so they cannot be normalized; use normalize: false")
    for path in [base_path, *(m.model for m in entries)]:
        if _same_path(out, path):
            raise MergeError(f"--out {out} is one of the input models; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not an empty directory")

    base = Checkpoint(base_path)
    targets = [Checkpoint(m.model) for m in entries]
    mapping = _check(base, targets)
    names = list(base.tensors)
    compute = _compute_dtype(base)
    out_dtype = config.output_dtype
    plan = [(n, base.tensors[n].shape, out_dtype or base.tensors[n].torch_dtype) for n in names]
    say(f"merging {len(entries)} model(s) onto {base_path} with {method.name}: {len(names)} tensors, "
        f"computing in {str(compute).removeprefix('torch.')}{' (in memory)' if in_memory else ''}")

    if in_memory:
        base_data = _loaded(base, names)
        target_data = [{n: t.read(mapping[j][n]) for n in names} for j, t in enumerate(targets)]
        chunk_elements = max((base.tensors[n].numel for n in names), default=1)

        def reader(data: dict[str, torch.Tensor], name: str):
            flat = data[name].reshape(-1)
            return lambda start, end: flat[start:end]

        pivot_reader = lambda n: reader(base_data, n)  # noqa: E731
        target_readers = lambda n: [reader(d, n) for d in target_data]  # noqa: E731
    else:

        def reader(ckpt: Checkpoint, info: TensorInfo):
            return lambda start, end: ckpt.read(info, start, end)

        pivot_reader = lambda n: reader(base, base.tensors[n])  # noqa: E731
        target_readers = lambda n: [reader(t, mapping[j][n]) for j, t in enumerate(targets)]  # noqa: E731

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, plan, parse_size(max_shard_size))
    t0 = time.perf_counter()
    try:
        for i, name in enumerate(names, 1):
            info = base.tensors[name]
            param = ParameterStream(name, info.shape, pivot_reader(name), target_readers(name), compute, chunk_elements)
            if param.numel:
                combine = method.fn(param, **kwargs)
                for chunk in param.chunks():
                    writer.write(name, combine(chunk))
            say(f"[{i}/{len(names)}] {name} {list(info.shape)} {time.perf_counter() - t0:.1f}s")
        writer.close()
    finally:
        base.close()
        for t in targets:
            t.close()
    copied = copy_side_files(base_path, out, out_dtype)
    say(f"wrote {writer.n_shards} shard(s), {writer.total_size / 1e9:.2f} GB, and {len(copied)} file(s) "
        f"from the base to {out} in {time.perf_counter() - t0:.1f}s")
    return out


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
