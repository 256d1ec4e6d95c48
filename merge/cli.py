"""`logitfuse merge`: a mergekit-shaped YAML config, or the same merge given as flags.

Registered by the CLI as `app.command("merge")(merge_command)`; bad input raises `MergeError`, which the
CLI prints as one line and turns into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from merge.errors import MergeError


def merge_command(
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty)."),
    config: Path | None = typer.Option(None, "--config", help="mergekit-shaped YAML merge config."),
    method: str | None = typer.Option(None, "--method", help="sce | varm | linear | task_arithmetic | ties | dare."),
    base: Path | None = typer.Option(None, "--base", help="The pivot (base) model directory."),
    models: list[Path] | None = typer.Option(
        None, "--models", "--model", help="Target model directories: --models A B C or --models A --models B."
    ),
    more_models: list[Path] | None = typer.Argument(None, hidden=True, help="Further model dirs after --models."),
    weight: list[float] | None = typer.Option(None, "--weight", help="One weight for all models, or one per model."),
    density: list[float] | None = typer.Option(None, "--density", help="One density for all models, or one per model."),
    select_topk: float | None = typer.Option(None, "--select-topk", help="SCE: fraction tau of elements selected."),
    sce_variant: str | None = typer.Option(None, "--sce-variant", help="SCE: fusechat (default) | mergekit."),
    normalize: bool | None = typer.Option(None, "--normalize/--no-normalize", help="Override the method default."),
    seed: int | None = typer.Option(None, "--seed", help="DARE: seed of the drop masks."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype: bfloat16 | float16 | float32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 2GB."),
) -> None:
    """Merge target models onto the pivot in parameter space (FuseChat uses sce), streaming tensor by tensor."""
    from merge.config import load_config, parse_config  # torch: imported when a merge runs, not for --help
    from merge.engine import run_merge

    targets = [*(models or []), *(more_models or [])]
    flags: dict[str, Any] = {"select_topk": select_topk, "variant": sce_variant, "normalize": normalize, "seed": seed}
    flags = {k: v for k, v in flags.items() if v is not None}
    if config is not None:
        given = [n for n, v in [("--method", method), ("--base", base), ("--dtype", dtype), ("--weight", weight),
                                ("--density", density)] if v] + [f"--{k.replace('_', '-')}" for k in flags]
        if targets or given:
            raise MergeError(f"--config cannot be combined with {', '.join(given + ['--models'] * bool(targets))}; "
                             "put those settings in the config")
        cfg = load_config(config)
    else:
        if not (method and base and targets):
            raise MergeError("give --config FILE, or --method, --base and --models DIR [DIR ...]")
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
        data = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(t), "parameters": p} for t, p in zip(targets, per_model, strict=True)],
            "parameters": flags,
        }
        if dtype:
            data["dtype"] = dtype
        cfg = parse_config(data, "flags")
    run_merge(cfg, out, progress=lambda msg: typer.echo(msg, err=True), max_shard_size=max_shard_size)
