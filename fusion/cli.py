"""`logitfuse fuse`: parse and check the options, run `fusion.pipeline.fuse_logits`, print its report.
Registered by clients/cli.py (``fusion.cli:fuse_command``); a `UserError` becomes one line and exit 2."""

from __future__ import annotations

from typing import Literal

import typer

from datastore.errors import UserError


def fuse_command(
    pivot: str = typer.Option(
        ..., help="Pivot logits dataset URI (STORE/logits/ID): its tokens and shape are the targets'."
    ),
    source: list[str] = typer.Option(
        ..., metavar="<str>", help="Source logits dataset URI (STORE/logits/ID); repeat for several."
    ),
    out: str = typer.Option(
        ...,
        help="Targets URI (local directory or s3://bucket/prefix). Pairwise with several sources: one "
        "targets dataset per source under OUT/<targets id>; a store's STORE/targets folder always gets "
        "STORE/targets/<targets id>.",
    ),
    align: Literal["offsets", "dtw", "dtw2"] = typer.Option(
        "offsets",
        help="Sequence alignment: offsets (exact, from character offsets), dtw (FuseChat-1.0's DTW: edit "
        "distance of canonical token bytes, x0.1 when one contains the other) or dtw2 (FuseChat-2.0's: "
        "tokens decoded one by one, no discount).",
    ),
    vocab_map: Literal["ms", "mined", "em"] = typer.Option(
        "ms",
        help="Vocabulary mapping: ms (mapping statistics over the dataset), mined (min edit distance), em (exact).",
    ),
    fusion: Literal["mince", "avgce"] = typer.Option(
        "mince", help="Fusion: mince (lowest CE on the gold response) or avgce (CE-weighted average)."
    ),
    avgce_weights: Literal["softmax-ce", "fusellm"] | None = typer.Option(
        None,
        help="AvgCE weights (with --fusion avgce): softmax-ce (w = softmax(-CE), the default) or fusellm "
        "(FuseLLM's w = softmax(exp(-CE))).",
    ),
    mode: Literal["pairwise", "multi"] = typer.Option(
        "pairwise",
        help="pairwise: pivot + one source per targets dataset (FuseChat); multi: all sources in one (FuseLLM).",
    ),
    k: int = typer.Option(0, help="Entries per target position, 0 = the pivot's k."),
    shard_rows: int = typer.Option(512, help="Samples per targets shard."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Align source logits to the pivot and fuse them into training targets (resumable: re-run to finish)."""
    from fusion.pipeline import fuse_logits

    if shard_rows < 1:
        raise UserError(f"--shard-rows {shard_rows}: must be at least 1")
    if avgce_weights is not None and fusion != "avgce":
        raise UserError(f"--avgce-weights {avgce_weights}: only with --fusion avgce (MinCE picks one "
                        "distribution, it weights none)")
    if k < 0:
        raise UserError(f"--k {k}: must be 0 (the pivot's k) or a positive number of entries")
    report = fuse_logits(
        pivot,
        source,
        out,
        align=align,
        vocab_map=vocab_map,
        fusion=fusion,
        mode=mode,
        k=k or None,
        avgce_weights=avgce_weights or "softmax-ce",
        shard_rows=shard_rows,
        progress=not quiet,
    )
    for line in report.lines():
        typer.echo(line)
