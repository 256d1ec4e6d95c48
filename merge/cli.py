"""`logitfuse merge`: a mergekit-shaped YAML config, or the same merge given as flags.

Registered by the CLI as `app.command("merge", cls=MergeCommand)(merge_command)`; bad input raises
`MergeError`, which the CLI prints as one line and turns into exit status 2. `--models`, `--weight` and
`--density` take several values after one flag (`--weight 0.3 0.7`), or the flag repeated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from merge.errors import MergeError

_LIST_OPTIONS = ("--models", "--model", "--weight", "--density")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def expand_list_options(args: list[str]) -> list[str]:
    """`--weight 0.3 0.7` -> `--weight 0.3 --weight 0.7` for the list options; a value ends at the next token
    that starts with '-' and is not a number (so negative weights work)."""
    out: list[str] = []
    current, fresh = None, False
    for token in args:
        if token in _LIST_OPTIONS:
            current, fresh = token, True
            out.append(token)
        elif current and token != "--" and (not token.startswith("-") or _NUMBER.match(token)):
            out += [token] if fresh else [current, token]
            fresh = False
        else:
            current = None
            out.append(token)
    return out


class MergeCommand(TyperCommand):
    """The merge command: list options take several values after one flag (`expand_list_options`)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # noqa: ANN001 (click Context)
        return super().parse_args(ctx, expand_list_options(args))


COMMAND_CLS = MergeCommand


def merge_command(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty; see --overwrite)."),
    config: Path | None = typer.Option(None, "--config", help="mergekit-shaped YAML merge config."),
    method: str | None = typer.Option(
        None, "--method", metavar="<sce|varm|linear|task_arithmetic|ties|dare|dare_linear|dare_ties>",
        help="Merge method; other mergekit methods (slerp, ...) need a --config and the mergekit extra.",
    ),
    base: Path | None = typer.Option(None, "--base", help="The pivot (base) model directory; optional for linear."),
    models: list[Path] | None = typer.Option(
        None, "--models", "--model", help="Target model directories: --models A B C (or --models A --models B)."
    ),
    weight: list[float] | None = typer.Option(
        None, "--weight", help="One weight for all models, or one per model: --weight 0.3 0.7 (1.0 when not given)."
    ),
    density: list[float] | None = typer.Option(
        None, "--density", help="TIES/DARE: one density for all models, or one per model (1.0 when not given)."
    ),
    select_topk: float = typer.Option(
        1.0, "--select-topk", help="SCE: fraction tau of elements selected (FuseChat used 0.1)."
    ),
    sce_variant: str = typer.Option("fusechat", "--sce-variant", metavar="<fusechat|mergekit>",
                                    help="SCE: FuseChat's variant or mergekit's."),
    normalize: bool | None = typer.Option(None, "--normalize/--no-normalize", help="Override the method default."),
    seed: int = typer.Option(0, "--seed", help="DARE: seed of the drop masks."),
    dtype: str | None = typer.Option(
        None, "--dtype", metavar="<bfloat16|float16|float32>", help="Output dtype (the base model's when not given)."
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 2GB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out once the merge is complete."),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Write merged tensors holding NaN/Inf instead of failing."
    ),
) -> None:
    """Merge target models onto the pivot in parameter space (FuseChat uses sce), streaming tensor by tensor."""
    from merge.config import load_config, parse_config  # torch: imported only when the command runs
    from merge.engine import run_merge
    from merge.safetensors_io import parse_size

    parse_size(max_shard_size)  # a bad --max-shard-size fails before any checkpoint is read
    targets = list(models or [])
    def given(param: str) -> bool:  # options left at their defaults are not passed: the method's defaults apply
        source = ctx.get_parameter_source(param)  # typer's own click: compare the enum by name
        return source is not None and source.name != "DEFAULT"

    flags: dict[str, Any] = {"select_topk": select_topk, "variant": sce_variant, "normalize": normalize, "seed": seed}
    names = {"select_topk": "select_topk", "variant": "sce_variant", "normalize": "normalize", "seed": "seed"}
    flags = {k: v for k, v in flags.items() if v is not None and given(names[k])}
    if config is not None:
        mixed = [n for n, v in [("--method", method), ("--base", base), ("--dtype", dtype), ("--weight", weight),
                                ("--density", density)] if v] + [f"--{names[k].replace('_', '-')}" for k in flags]
        if targets or mixed:
            raise MergeError(f"--config cannot be combined with {', '.join(mixed + ['--models'] * bool(targets))}; "
                             "put those settings in the config")
        cfg = load_config(config)
    else:
        if method:
            from merge.registry import MERGEKIT_METHODS, get_method

            if method not in MERGEKIT_METHODS:  # those go to mergekit itself
                get_method(method)  # an unknown name: one line with the closest known one
        if not (method and targets and (base or method == "linear")):
            raise MergeError("give --config FILE, or --method, --base and --models DIR [DIR ...] (--base is optional "
                             "for linear)")
        per_model: list[dict[str, Any]] = [{} for _ in targets]
        for name, values in (("weight", weight), ("density", density)):
            if not values:
                continue
            if len(values) == 1:
                flags[name] = values[0]
            elif len(values) == len(targets):
                for row, v in zip(per_model, values, strict=True):
                    row[name] = v
            else:
                raise MergeError(f"--{name}: give one value or one per model ({len(targets)}), not {len(values)}")
        data: dict[str, Any] = {
            "merge_method": method,
            "models": [{"model": str(t), "parameters": p} for t, p in zip(targets, per_model, strict=True)],
            "parameters": flags,
        }
        if base:
            data["base_model"] = str(base)
        if dtype:
            data["dtype"] = dtype
        cfg = parse_config(data, "flags")
    run_merge(cfg, out, progress=lambda msg: typer.echo(msg, err=True), max_shard_size=max_shard_size,
              overwrite=overwrite, allow_nonfinite=allow_nonfinite)
