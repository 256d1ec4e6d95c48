"""The merge job: check the checkpoints, then merge and write one parameter at a time.

The output is built in a hidden staging directory next to `out` (`datastore.staging`) and renamed into
place only when complete, so an interrupted merge never leaves a half-written `out` or `*.tmp` files that
block the rerun (a stage left by a killed process is removed by the next run); `overwrite=True` replaces an
existing output only once the new one is complete. A merged value that is NaN or infinite in the output
dtype (an fp16 overflow) stops the merge naming the tensor, unless `allow_nonfinite=True`. Configs using a
method or feature only mergekit implements are handed to mergekit (`merge.mergekit_bridge`).

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

from datastore.errors import UserError
from datastore.fs import check_local_directory
from datastore.staging import check_target, staged_directory
from datastore.words import plural
from merge.config import MergeConfig
from merge.errors import MergeError
from merge.parameters import ParameterPlan, count_layers
from merge.registry import MERGEKIT_METHODS, builtin_methods, get_method
from merge.safetensors_io import Checkpoint, ShardedWriter, TensorInfo, copy_side_files, parse_size
from merge.stream import ParameterStream

DEFAULT_CHUNK_ELEMENTS = 1 << 20
_TIED_HEAD, _EMBED = "lm_head.weight", "embed_tokens.weight"


def _ties_embeddings(ckpt: Checkpoint) -> bool:
    return bool(ckpt.config.get("tie_word_embeddings", False))


def _embedding_name(ckpt: Checkpoint) -> str | None:
    return next((n for n in ckpt.tensors if n.endswith(_EMBED)), None)


def _unties_embeddings(ckpt: Checkpoint) -> bool:
    """True when config.json declares an untied head: `tie_word_embeddings: false`, or a *ForCausalLM
    architecture whose model type unties by default (transformers' config class decides)."""
    tie = ckpt.config.get("tie_word_embeddings")
    if tie is None and any(str(a).endswith("ForCausalLM") for a in ckpt.config.get("architectures") or []):
        try:
            from transformers import AutoConfig

            tie = AutoConfig.for_model(ckpt.config["model_type"]).tie_word_embeddings
        except (KeyError, ValueError):
            return False
    return tie is False


def _check(base: Checkpoint, targets: list[Checkpoint]) -> list[dict[str, TensorInfo]]:
    """For every target, the tensor to read for each base tensor; raises MergeError on any mismatch."""
    embedding = _embedding_name(base)
    if embedding and not any(n.endswith(_TIED_HEAD) for n in base.tensors) and _unties_embeddings(base):
        raise MergeError(
            f"{base.dir}: config.json unties the output head (tie_word_embeddings false) but the weights have no "
            f"{_TIED_HEAD}; transformers would load the merge with a random head. Add the head or set "
            "tie_word_embeddings: true"
        )
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
            raise MergeError(f"{who} lacks {plural(len(missing), 'tensor')} the base has, e.g. {missing[0]}")
        extra = [n for n in t.tensors if n not in base.tensors]
        if _ties_embeddings(base):  # a saver may write the tied head anyway
            extra = [n for n in extra if not n.endswith(_TIED_HEAD)]
        if extra:
            raise MergeError(f"{who} has {plural(len(extra), 'tensor')} the base lacks, e.g. {extra[0]}")
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
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Merges `config.models` (onto `config.base_model` for every method but linear) into `out_dir`.

    `out_dir` must be new or empty unless `overwrite`. Raises MergeError (one line) for bad input: an
    unknown method or parameter, missing or mismatched tensors, a bad safetensors header, an untied config
    without a head, a non-finite merged value (unless `allow_nonfinite`). Methods and features only mergekit
    has run through mergekit when it is installed (`pip install 'logitfuse[mergekit]'`).
    """
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    if config.mergekit_features or config.merge_method not in builtin_methods():
        if config.merge_method not in MERGEKIT_METHODS:
            get_method(config.merge_method)  # unknown everywhere: the error names the closest method
        from merge.mergekit_bridge import run_with_mergekit

        inputs = [Path(p) for p in (config.base_model, *(m.model for m in config.models or [])) if p]
        _check_out(out, inputs, overwrite)
        with staged_directory(out, overwrite) as stage:
            run_with_mergekit(config, stage, say, max_shard_size=parse_size(max_shard_size))
        return out

    method = get_method(config.merge_method)
    entries = list(config.models or [])
    base_path = Path(config.base_model) if config.base_model is not None else None
    if base_path is None:
        if method.uses_pivot:
            raise MergeError(f"merge_method {method.name} needs base_model (the pivot the fusion vectors start from)")
        base_path = Path(entries[0].model)  # linear: the first model supplies layout, config and tokenizer
    elif method.uses_pivot:  # as mergekit: the base listed among the models contributes no fusion vector
        entries = [m for m in entries if not _same_path(m.model, base_path)]
        if not entries:
            raise MergeError(f"{config.merge_method} needs at least one model other than base_model")
    layout_entry = next((i for i, m in enumerate(entries) if _same_path(m.model, base_path)), None)
    _check_out(out, [base_path, *(m.model for m in entries)], overwrite)

    base = Checkpoint(base_path)
    targets = [base if i == layout_entry else Checkpoint(m.model) for i, m in enumerate(entries)]
    try:
        mapping = _check(base, targets)
        names = list(base.tensors)
        try:  # every tensor's parameters are checked before writing; an error names the config
            params = ParameterPlan(
                method, config.parameters or {}, [m.parameters or {} for m in entries], count_layers(base.config, names)
            )
            kwargs = {n: params.kwargs(n) for n in names}
            if method.name == "linear":
                for n, kw in kwargs.items():
                    if kw["normalize"] and sum(kw["weight"]) == 0:
                        raise MergeError(f"linear: the weights of {n} sum to 0, so they cannot be normalized; "
                                         "use normalize: false")
        except MergeError as e:
            raise MergeError(f"{config.source}: {e}") from None
        compute = _compute_dtype(base)
        out_dtype = config.output_dtype
        plan = [(n, base.tensors[n].shape, out_dtype or base.tensors[n].torch_dtype) for n in names]
        say(f"merging {plural(len(entries), 'model')} onto {base_path} with {method.name}: {len(names)} tensors, "
            f"computing in {str(compute).removeprefix('torch.')}{' (in memory)' if in_memory else ''}")
        with staged_directory(out, overwrite) as stage:
            writer = _merge_tensors(base, targets, mapping, names, kwargs, method, plan, compute, stage, say,
                                    chunk_elements, parse_size(max_shard_size), in_memory, allow_nonfinite)
            copied = copy_side_files(base_path, stage, out_dtype)
    finally:
        for ckpt in {id(c): c for c in (base, *targets)}.values():
            ckpt.close()
    say(f"wrote {plural(writer.n_shards, 'shard')}, {writer.total_size / 1e9:.2f} GB, and "
        f"{plural(len(copied), 'file')} from the base to {out}")
    return out


def _merge_tensors(base, targets, mapping, names, kwargs, method, plan, compute, out, say, chunk_elements,
                   max_shard_bytes, in_memory, allow_nonfinite) -> ShardedWriter:
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

    writer = ShardedWriter(out, plan, max_shard_bytes)
    t0 = time.perf_counter()
    for i, (name, shape, dtype) in enumerate(plan, 1):
        param = ParameterStream(name, shape, pivot_reader(name), target_readers(name), compute, chunk_elements)
        if param.numel:
            combine = method.fn(param, **kwargs[name])
            for chunk in param.chunks():
                values = combine(chunk).to(dtype)
                if not allow_nonfinite:
                    _check_finite(name, values, chunk.start, dtype)
                writer.write(name, values)
        say(f"[{i}/{len(plan)}] {name} {list(shape)} {time.perf_counter() - t0:.1f}s")
    writer.close()
    return writer


def _check_finite(name: str, values: torch.Tensor, start: int, dtype: torch.dtype) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise MergeError(
            f"merged tensor {name} has {plural(int(bad.sum()), 'non-finite value')} in {str(dtype).removeprefix('torch.')} "
            f"(first: element {start + i} = {values[i].item()}); an overflow of the output dtype or NaN inputs? "
            "Check the weights, choose dtype: float32 or bfloat16, or pass --allow-nonfinite to write it anyway"
        )


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    for path in inputs:
        if _same_path(out, path):
            raise MergeError(f"--out {out} is one of the input models; choose a new directory")
    if out.exists() and not out.is_dir():  # --overwrite replaces a merge directory, never a file
        raise MergeError(f"--out {out} is a file, not a directory; choose a new or empty directory")
    try:
        check_local_directory(str(out), "--out")  # a path under a file cannot be created either
        # nor a folder that holds an input model, or a place inside one (hub ids are not local paths)
        check_target(out, overwrite, inputs=[p for p in inputs if Path(p).exists()])
    except UserError as e:
        raise MergeError(str(e)) from None


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
