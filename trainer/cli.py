"""`logitfuse train`: options -> `trainer.train.TrainConfig` -> `trainer.train.train`.

Registered by clients/cli.py (``trainer.cli:train_command``). Options left out take the preset's value
(``--preset fusechat``) or the `TrainConfig` default; a bad value is one line and exit status 2.
"""

from __future__ import annotations

import typer


def train_command(
    targets: str = typer.Option(..., help="Targets dataset URI (local directory or s3://bucket/prefix)."),
    model: str = typer.Option(..., help="Pivot model directory (config, weights, tokenizer)."),
    out: str = typer.Option(..., help="Output directory: checkpoints, logs, loss.png."),
    lambda_: float = typer.Option(None, "--lambda", help="Weight of SFT in λ·SFT + (1-λ)·fusion [0.9]."),
    loss: str = typer.Option(None, help="Fusion loss: ce (FuseChat), kl, rkl (reverse KL), jsd [ce]."),
    temperature: float = typer.Option(None, help="Temperature T: targets p^(1/T), student z/T, loss x T² [1]."),
    tail: str = typer.Option(None, help="Mass outside the top-k: renormalise or bucket [renormalise]."),
    jsd_beta: float = typer.Option(None, help="β of the generalised JSD [0.5]."),
    preset: str = typer.Option(None, help="fusechat: lr 5e-6, warmup 0.03, 3 epochs, batch 128, length 2048, λ 0.9."),
    lr: float = typer.Option(None, help="Peak learning rate of AdamW [1e-5]."),
    warmup_ratio: float = typer.Option(None, help="Linear warmup, as a fraction of the steps [0.03]."),
    epochs: float = typer.Option(None, help="Epochs over the targets [1]."),
    max_steps: int = typer.Option(None, help="Optimizer steps (overrides --epochs) [0]."),
    batch_size: int = typer.Option(None, help="Packed sequences per optimizer step, all processes [8]."),
    micro_batch_size: int = typer.Option(None, help="Packed sequences per forward and process [1]."),
    max_length: int = typer.Option(None, help="Tokens per packed sequence [2048]."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay [0]."),
    max_grad_norm: float = typer.Option(None, help="Gradient clipping norm, 0 = off [1]."),
    seed: int = typer.Option(None, help="Seed of the data order and the initial RNG [0]."),
    shuffle_buffer: int = typer.Option(None, help="Samples shuffled together after the shard shuffle [1024]."),
    chunk_rows: int = typer.Option(None, help="Loss rows whose vocabulary logits exist at once [1024]."),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 mixed precision (accelerate) [off]."),
    gradient_checkpointing: bool = typer.Option(None, "--gradient-checkpointing", help="Recompute activations."),
    cpu: bool = typer.Option(None, "--cpu", help="Train on the CPU even when a GPU is there."),
    save_every: int = typer.Option(None, help="Checkpoint every N steps, 0 = only at the end [0]."),
    keep_checkpoints: int = typer.Option(None, help="Checkpoints kept [2]."),
    log_every: int = typer.Option(None, help="Log every N steps [1]."),
    stop_after: int = typer.Option(None, help="Stop (with a checkpoint) after N steps of this run [0 = no]."),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from OUT's last checkpoint [yes]."),
    report_to: str = typer.Option(None, help="Loggers, comma-separated: tensorboard, wandb, none [tensorboard]."),
) -> None:
    """Train a pivot-shaped model on fused targets with λ·SFT + (1-λ)·fusion (resumable)."""
    options = dict(locals())  # first line: only the options
    from trainer.train import TrainConfig, train

    options["lambda"] = options.pop("lambda_")
    cfg = TrainConfig.parse(**options)
    result = train(cfg)
    if result.losses:
        last = result.losses[-1]
        typer.echo(f"{result.final_dir}: step {result.steps}, loss {last['loss']:.4f} (sft {last['sft']:.4f}, "
                   f"fusion {last['fusion']:.4f}); log {result.log_path}")
