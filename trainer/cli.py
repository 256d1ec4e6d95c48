"""`logitfuse train`: options -> `trainer.train.TrainConfig` -> `trainer.train.train`.

Registered by clients/cli.py (``trainer.cli:train_command``). An option left out takes the preset's value
(``--preset fusechat``) or the `TrainConfig` default, which is what ``--help`` shows as ``[default: ...]``
(tests/test_cli.py checks the two agree); a bad value is one line and exit status 2. Only typer is imported
here: torch and transformers load when a run starts, so ``--help`` stays fast.
"""

from __future__ import annotations

import os
from typing import Literal

import typer

from datastore.errors import UserError


def _opt(default, help: str, *decls: str) -> typer.models.OptionInfo:  # noqa: A002
    """An option with `TrainConfig`'s default. `train_command` passes on only the options given on the
    command line, so that a ``--preset`` fills the others."""
    return typer.Option(default, *decls, help=help)


def train_command(
    ctx: typer.Context,
    targets: str = typer.Option(..., help="Targets dataset URI (local directory or s3://bucket/prefix)."),
    model: str = typer.Option(..., help="Pivot model directory (config, weights, tokenizer): the targets' pivot."),
    out: str = typer.Option(..., help="Output directory: checkpoints, logs, loss.png."),
    lambda_: float = _opt(0.9, "Weight of SFT in λ·SFT + (1-λ)·fusion.", "--lambda"),
    loss: Literal["ce", "kl", "rkl", "jsd"] = _opt("ce", "Fusion loss: ce (FuseChat), kl, rkl (reverse KL), jsd."),
    temperature: float = _opt(1.0, "Temperature T: targets p^(1/T), student z/T, loss x T²."),
    tail: Literal["renormalise", "bucket"] = _opt("renormalise", "Mass outside the top-k: renormalise or bucket."),
    jsd_beta: float = _opt(0.5, "β of the generalised JSD."),
    preset: Literal["fusechat"] | None = typer.Option(
        None, help="fusechat: lr 5e-6, warmup 0.03, 3 epochs, batch 128, length 2048, λ 0.9 (options given win).",
        show_default=False,
    ),
    lr: float = _opt(1e-5, "Peak learning rate of AdamW."),
    warmup_ratio: float = _opt(0.03, "Linear warmup, as a fraction of the steps."),
    epochs: float = _opt(1.0, "Epochs over the targets."),
    max_steps: int = _opt(0, "Optimizer steps; overrides --epochs unless 0."),
    batch_size: int = _opt(8, "Packed sequences per optimizer step, all processes."),
    micro_batch_size: int = _opt(1, "Packed sequences per forward and process."),
    max_length: int = _opt(2048, "Tokens per packed sequence."),
    weight_decay: float = _opt(0.0, "AdamW weight decay."),
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm, 0 = off."),
    seed: int = _opt(0, "Seed of the data order and the initial RNG."),
    shuffle_buffer: int = _opt(1024, "Samples shuffled together after the shard shuffle."),
    chunk_rows: int = _opt(1024, "Loss rows whose vocabulary logits exist at once."),
    bf16: bool = _opt(False, "bf16 mixed precision (accelerate).", "--bf16/--no-bf16"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations."),
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is there."),
    save_every: int = _opt(0, "Checkpoint every N steps, 0 = only at the end."),
    keep_checkpoints: int = _opt(2, "Checkpoints kept."),
    log_every: int = _opt(1, "Log every N steps."),
    stop_after: int = _opt(0, "Stop (with a checkpoint) after N steps of this run, 0 = run to the end."),
    resume: bool = _opt(True, "Continue from OUT's last checkpoint.", "--resume/--no-resume"),
    report_to: str = _opt("tensorboard", "Loggers, comma-separated: tensorboard, wandb, none."),
) -> None:
    """Train a pivot-shaped model on fused targets with λ·SFT + (1-λ)·fusion (resumable)."""
    given = {name: value for name, value in locals().items()  # first line: only the options
             if name != "ctx" and ctx.get_parameter_source(name).name != "DEFAULT"}
    from trainer.train import TrainConfig, train

    options = {"lambda" if name == "lambda_" else name: value for name, value in given.items()}
    cfg = TrainConfig.parse(**options)
    try:
        result = train(cfg)
    except UserError:
        if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch` every rank fails alike: one line
            raise typer.Exit(2) from None
        raise
    from accelerate import PartialState

    if result.losses and PartialState().is_main_process:  # under `accelerate launch`: one line, not one per rank
        last = result.losses[-1]
        typer.echo(f"{result.final_dir}: step {result.steps}, loss {last['loss']:.4f} (sft {last['sft']:.4f}, "
                   f"fusion {last['fusion']:.4f}); log {result.log_path}")
