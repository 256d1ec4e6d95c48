"""The thin trainer: a pivot-shaped causal LM trained on fused targets with ``λ·SFT + (1-λ)·fusion``.

`train(TrainConfig) -> TrainResult` is the whole job (the CLI and the demo call it). The loop below reads top
to bottom: batches from `trainer.data`, the loss from `trainer.losses`, accelerate for devices (CPU, one
GPU, DDP, FSDP via ``accelerate launch --config_file``) and bf16, AdamW with warmup + cosine decay.

Output directory::

    OUT/train_config.json                 the run's config (a resume must match it)
    OUT/checkpoints/step-NNNNNN/          model.safetensors + config + the pivot's tokenizer (from_pretrained),
                                          optimizer/ (AdamW state: torch.distributed.checkpoint, each rank
                                          writes its shard under FSDP), trainer_state.pt (step, scheduler,
                                          RNG, the data stream's `StreamState`)
    OUT/logs/train.jsonl, OUT/logs/tensorboard/, OUT/loss.png

Resume is exact: weights, AdamW moments, schedule position, RNG and the stream position are in the
checkpoint, so N steps straight and N/2 + resume + N/2 give the same weights (tests/test_trainer.py). The
global batches do not depend on the number of processes (`trainer.data`), and the optimizer state is saved
by parameter name and resharded on load (torch.distributed.checkpoint), so a run may resume on another
number of processes, or move between one process, DDP and FSDP (tests/test_trainer_ddp.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datastore.errors import UserError
from datastore.fs import check_local_directory, honour_umask
from datastore.targets import TargetsMeta, TargetsReader
from datastore.words import plural
from trainer.data import DataConfig, StreamState, TargetStream, estimate_rows_per_epoch
from trainer.losses import LossConfig, chunked_head_loss

PRESETS: dict[str, dict] = {
    # FuseChat (Wan et al., 2024) / FuseLLM training setup
    "fusechat": dict(lr=5e-6, warmup_ratio=0.03, epochs=3.0, batch_size=128, max_length=2048, lambda_=0.9),
}
STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"
#: trainer_state.pt layout; 1 (before this) held a plain optimizer state_dict and one stream state per rank
STATE_FORMAT = 2
# fields that may change between a run and its resume without changing the trajectory
_RESUME_FREE = {"out", "resume", "stop_after", "save_every", "keep_checkpoints", "log_every", "tensorboard", "plot",
                "report_to", "cpu"}  # cpu: like the number of processes, where the run goes on is free
REPORTERS = ("tensorboard", "wandb")
# fields naming a file or directory: a resume compares them as resolved paths (./t and /abs/t are one run)
_PATH_FIELDS = ("targets", "model")


class TrainConfig(BaseModel):
    """Everything a training run needs; validated here, trusted below."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    targets: str = Field(description="targets dataset URI (local directory or s3://)")
    model: str = Field(description="pivot model directory: config, weights, tokenizer")
    out: str = Field(description="output directory (local)")
    preset: Literal["fusechat"] | None = None
    lambda_: float = Field(0.9, alias="lambda", ge=0.0, le=1.0)
    loss: Literal["ce", "kl", "rkl", "jsd"] = "ce"
    temperature: float = Field(1.0, ge=0.01, le=100)
    tail: Literal["renormalise", "bucket"] = "renormalise"
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0: from epochs")
    batch_size: int = Field(8, ge=1, description="packed sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(1, ge=1, description="packed sequences per forward, per rank")
    max_length: int = Field(2048, ge=2, le=1 << 20)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, ge=0, description="0: no clipping")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    shuffle_buffer: int = Field(1024, ge=1)
    chunk_rows: int = Field(1024, ge=1, description="loss rows whose logits are built at once")
    bf16: bool = False
    gradient_checkpointing: bool = False
    cpu: bool = False
    save_every: int = Field(0, ge=0, description="checkpoint every N steps; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    stop_after: int = Field(0, ge=0, description="stop after N steps of this invocation (as if interrupted)")
    resume: bool = True
    tensorboard: bool = True
    plot: bool = True
    report_to: str = Field("tensorboard", description="comma-separated: tensorboard, wandb, or none")

    @field_validator("report_to")
    @classmethod
    def _reporters(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        bad = [n for n in names if n not in (*REPORTERS, "none")]
        if bad or not names:
            raise ValueError(f"{', '.join(bad) or 'nothing'} is not one of {', '.join(REPORTERS)}, none "
                             "(comma-separated)")
        return ",".join(n for n in names if n != "none")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset"):
            preset = PRESETS.get(data["preset"])
            if preset is None:
                return data  # the Literal check reports it
            given = {k for k, v in data.items() if v is not None}
            if "lambda" in given:
                given.add("lambda_")
            data = {**{k: v for k, v in preset.items() if k not in given}, **data}
        return data

    @classmethod
    def parse(cls, **kwargs) -> TrainConfig:
        """Build from keyword options (None = not given); a bad value is one UserError line."""
        try:
            return cls(**{k: v for k, v in kwargs.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            raise UserError(f"--{where.replace('_', '-').rstrip('-')}: {msg}") from None

    def loss_config(self) -> LossConfig:
        return LossConfig(loss=self.loss, temperature=self.temperature, tail=self.tail, jsd_beta=self.jsd_beta)


class TrainResult(BaseModel):
    final_dir: str  # the last checkpoint: loadable with from_pretrained
    steps: int
    losses: list[dict]  # one record per logged step (step, loss, sft, fusion, lr, ...)
    log_path: str
    plot_path: str | None = None
    warnings: list[str] = []  # what `train` printed as "warning: ..." on stderr (see `data_warnings`)


class FusionLM(torch.nn.Module):
    """The pivot model plus the loss, so that accelerate/DDP/FSDP see one module whose forward is the loss."""

    def __init__(self, model, loss_cfg: LossConfig, chunk_rows: int):
        super().__init__()
        self.model, self.loss_cfg, self.chunk_rows = model, loss_cfg, chunk_rows
        # what accelerate's FSDP TRANSFORMER_BASED_WRAP wraps (the decoder layers), read from this module
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    def forward(self, input_ids, position_ids, row_index, gold, topk_ids, topk_probs, w_sft, w_fusion):
        base = getattr(self.model, self.model.base_model_prefix)
        # no attention mask and restarting position ids: transformers builds the block-diagonal mask
        hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, row_index)
        weight = self.model.get_output_embeddings().weight
        return chunked_head_loss(rows, weight, gold, topk_ids, topk_probs, self.loss_cfg, w_sft, w_fusion,
                                 self.chunk_rows)


def load_pivot(model_dir: str, targets: TargetsMeta | None = None):
    """The pivot model and tokenizer from `model_dir`.

    Raises `UserError` (one line) when the directory is not a causal LM we can train, when its tokenizer
    is not the one the targets were made in (`check_pivot_tokenizer`, checked before the weights load),
    or when the tokenizer has more tokens than the model's embedding has rows.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model {model_dir}: not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if targets is not None:
            check_pivot_tokenizer(tokenizer, targets, model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"--model {model_dir}: cannot load a causal LM and tokenizer ({e})") from None
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        raise UserError(f"--model {model_dir}: logit soft-capping/scaling ({cfg.model_type}) is not supported")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UserError(f"--model {model_dir}: needs a bias-free linear LM head")
    rows = min(head.weight.shape[0], model.get_input_embeddings().weight.shape[0])
    if len(tokenizer) > rows:
        raise UserError(
            f"--model {model_dir}: its tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{rows} rows: the tokenizer and the weights do not belong together"
        )
    return model, tokenizer


def check_pivot_tokenizer(tokenizer, targets: TargetsMeta, model_dir: str) -> None:
    """Raise `UserError` unless `tokenizer` is the pivot tokenizer the targets were fused in: the same
    fingerprint (`datastore.tokenizers.tokenizer_fingerprint`: vocabulary and special tokens) and the
    same ``len(tokenizer)``. Targets written before these were recorded are not checked."""
    from datastore.tokenizers import tokenizer_fingerprint

    if not targets.pivot_tokenizer:
        return
    mine = tokenizer_fingerprint(tokenizer)
    if mine != targets.pivot_tokenizer or len(tokenizer) != targets.pivot_vocab_size:
        raise UserError(
            f"--model {model_dir}: its tokenizer ({mine}, {len(tokenizer)} tokens) is not the targets' pivot "
            f"tokenizer ({targets.pivot_tokenizer}, {targets.pivot_vocab_size} tokens, pivot logits "
            f"{targets.pivot}): train the pivot model, or one with the pivot's tokenizer"
        )


def data_warnings(rows_per_epoch: int, cfg: TrainConfig, total_steps: int) -> list[str]:
    """Warnings about a run whose optimizer steps are long against its data (`rows_per_epoch` packed
    sequences of ``cfg.max_length`` tokens per epoch, all ranks together):

    - one optimizer step (``--batch-size`` packed sequences) is longer than one epoch: every step sees some
      samples more than once, so the gradient of a step is not a mean over distinct samples;
    - ``--epochs`` asks for less data than one optimizer step: the run still makes a whole step, i.e.
      more epochs than asked.
    """
    out = []
    if rows_per_epoch < cfg.batch_size:
        out.append(
            f"one epoch is {plural(rows_per_epoch, 'packed sequence')} of {cfg.max_length} tokens, less than one "
            f"optimizer step ({cfg.batch_size}, --batch-size): the data cycles within every step, each sample "
            f"about {cfg.batch_size / max(rows_per_epoch, 1):.1f} times; lower --batch-size or add samples"
        )
    if not cfg.max_steps and cfg.epochs * rows_per_epoch < cfg.batch_size:
        seen = total_steps * cfg.batch_size / max(rows_per_epoch, 1)
        out.append(
            f"--epochs {cfg.epochs:g} is less than one optimizer step: the run makes {plural(total_steps, 'step')}, "
            f"{seen:.1f} epochs"
        )
    return out


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _resolved(uri: str) -> str:
    """A local path made absolute with symlinks resolved; a URI (s3://...) without its trailing slash."""
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def _config_record(cfg: TrainConfig) -> dict:
    """What `OUT/train_config.json` holds: the config, with `--targets` and `--model` resolved when the run
    starts (a relative path means nothing once the working directory has changed)."""
    record = json.loads(cfg.model_dump_json(by_alias=True))
    return {**record, **{key: _resolved(record[key]) for key in _PATH_FIELDS}}


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume the run in `out` with settings that change its trajectory (`UserError`); paths are
    compared resolved, so ``--targets ./t`` resumes a run started with ``--targets /abs/t``."""
    path = out / "train_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        new = _config_record(cfg)
        for key in _PATH_FIELDS:  # a record written before paths were resolved: resolve it now
            if isinstance(old.get(key), str):
                old[key] = _resolved(old[key])
        diffs = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if k not in _RESUME_FREE and old.get(k) != new[k]]
        if diffs:
            raise UserError(
                f"{out} holds a run with other settings ({'; '.join(diffs)}): use another --out or --no-resume"
            )


def _check_out_apart(cfg: TrainConfig) -> None:
    """Raise `UserError` when --out is or lies inside the --model directory or a local --targets dataset, or
    when an input lies where the run writes and deletes (``OUT/checkpoints``, ``OUT/logs``): checkpoints
    rotate and --no-resume clears those two folders, and they must never touch an input. An input elsewhere
    under --out (``--out exp --model exp/pivot``) is fine."""
    out = Path(cfg.out).resolve()
    for option, value in (("--model", cfg.model), ("--targets", cfg.targets)):
        if "://" in value or not Path(value).exists():
            continue
        path = Path(value).resolve()
        owned = (out / "checkpoints", out / "logs")
        if out == path or path in out.parents or any(path == o or o in path.parents for o in owned):
            relation = "is" if out == path else ("lies inside" if path in out.parents else "holds")
            raise UserError(f"--out {cfg.out}: {relation} the {option} directory {value}; give a directory of "
                            "its own for the run's checkpoints and logs")


def _check_finite_weights(accelerator, wrapped, step: int, cfg: TrainConfig) -> None:
    """Raise `UserError` (on every rank) when any weight is NaN or infinite after `step`: such a checkpoint
    would load and produce NaN, so none is saved."""
    bad = any(not bool(torch.isfinite(p).all()) for p in wrapped.parameters())
    flag = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), reduction="sum")
    if float(flag[0]) > 0:
        raise UserError(f"step {step}: the weights became NaN or infinite; no checkpoint is saved: lower --lr "
                        f"({cfg.lr:g}) or --weight-decay ({cfg.weight_decay:g})")


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) one training job. Returns the final checkpoint directory and the logged losses."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    out = Path(cfg.out)
    if "://" in cfg.out:
        raise UserError(f"--out {cfg.out}: must be a local directory")
    check_local_directory(cfg.out, "--out")  # a file there (or above) fails now, not after the data loads
    _check_out_apart(cfg)
    accelerator = _accelerator(Accelerator, cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise UserError(
            f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {cfg.micro_batch_size} "
            f"x {plural(world, 'process', 'processes')}"
        )
    accum = cfg.batch_size // (cfg.micro_batch_size * world)

    checkpoints = _checkpoints(out) if cfg.resume else []
    if checkpoints:
        _check_resume_config(out, cfg)
    resume_dir = checkpoints[-1] if checkpoints else None

    targets_manifest = TargetsReader(cfg.targets).manifest
    if not targets_manifest.complete:  # as fuse refuses incomplete logits: never train on part of a fusion
        raise UserError(f"--targets {cfg.targets}: incomplete targets dataset ({plural(targets_manifest.num_samples, 'sample')} "
                        "committed, its fuse has not finished): re-run that fuse, then train")
    targets_meta = targets_manifest.meta
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_pivot(str(resume_dir or cfg.model), targets_meta)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    vocab = model.get_output_embeddings().weight.shape[0]

    stream_state = StreamState()
    state = None
    if resume_dir is not None:
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"{resume_dir}: a checkpoint of an older logitfuse (its data order and optimizer "
                            "state are stored otherwise): use another --out or --no-resume")
        stream_state = StreamState.from_dict(state["data"])
    data_cfg = DataConfig(seq_len=cfg.max_length, batch_size=cfg.micro_batch_size, shuffle_buffer=cfg.shuffle_buffer,
                          seed=cfg.seed, rank=rank, world_size=world, pad_id=tokenizer.pad_token_id or 0)
    stream = TargetStream(cfg.targets, data_cfg, stream_state)
    stream.check_vocab(vocab)
    rows_per_epoch = estimate_rows_per_epoch(cfg.targets, cfg.max_length)  # reads every shard's lengths
    if accelerator.is_main_process and out.exists() and cfg.resume is False:
        # --no-resume starts over, but only once every input has been read and checked: a typo in
        # --targets or --model, or a missing shard, is an error that deletes nothing
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "logs", ignore_errors=True)
    accelerator.wait_for_everyone()
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * rows_per_epoch / cfg.batch_size))
    warnings = data_warnings(rows_per_epoch, cfg, total_steps)
    if accelerator.is_main_process:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)

    wrapped = FusionLM(model, cfg.loss_config(), cfg.chunk_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    start_step = 0
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    if state is not None:
        _load_optimizer(wrapped, optimizer, resume_dir / OPTIMIZER_DIR)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step = int(state["step"])

    log_dir = out / "logs"
    lam = cfg.lambda_
    log_path = log_dir / "train.jsonl"
    history = _load_history(log_path, start_step)
    reporters: list = []
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(_config_record(cfg), indent=2))
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        reporters = _reporters(log_dir, cfg)
        accelerator.print(f"training {out} (lambda {lam:g}): {plural(total_steps, 'step')} "
                          f"({plural(accum, 'micro-batch', 'micro-batches')} x {cfg.micro_batch_size} x "
                          f"{plural(world, 'process', 'processes')} per step) from step {start_step}")

    batches = iter(stream)
    step = start_step
    ran = 0
    t_start = time.perf_counter()
    wrapped.train()
    while step < total_steps and not (cfg.stop_after and ran >= cfg.stop_after):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        counts = torch.tensor([sum(len(b.gold) for b in micro), sum(b.num_targets for b in micro),
                               sum(b.num_tokens for b in micro)], dtype=torch.float64, device=accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum")  # means over the whole global batch
        n_sft, n_fus, tokens = float(counts[0]), float(counts[1]), int(counts[2])
        # DDP averages gradients over ranks, hence the factor `world`
        w_sft = lam * world / n_sft if n_sft else 0.0
        w_fus = (1 - lam) * world / n_fus if n_fus else 0.0
        sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(micro):
            batch.to(accelerator.device)
            sync = accelerator.no_sync(wrapped) if i < accum - 1 else _nullcontext()
            with sync, accelerator.autocast():
                total, sft_sum, fus_sum = wrapped(batch.input_ids, batch.position_ids, batch.row_index, batch.gold,
                                                  batch.topk_ids, batch.topk_probs, w_sft, w_fus)
                accelerator.backward(total)
            sums += torch.stack([sft_sum.double(), fus_sum.double()])
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ran += 1

        sums = accelerator.reduce(sums, reduction="sum")
        sft = float(sums[0]) / n_sft if n_sft else 0.0
        fus = float(sums[1]) / n_fus if n_fus else 0.0
        seconds = time.perf_counter() - t0
        if not math.isfinite(lam * sft + (1 - lam) * fus):
            raise UserError(f"step {step}: the loss is {lam * sft + (1 - lam) * fus} (sft {sft}, fusion {fus}); "
                            f"nothing of this step is saved: lower --lr ({cfg.lr:g}) or check --temperature")
        record = {"step": step, "loss": lam * sft + (1 - lam) * fus, "sft": sft, "fusion": fus,
                  "lr": scheduler.get_last_lr()[0], "tokens": tokens, "targets": int(n_fus),
                  "seconds": round(seconds, 4), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
                  "epoch": micro[-1].state.epoch}
        if step % cfg.log_every == 0 or step == total_steps:
            history.append(record)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                for report in reporters:
                    report.log({f"train/{key}": record[key] for key in ("loss", "sft", "fusion", "lr", "tokens_per_s")},
                               step)
                # a term with weight 0 is not computed: "-", not a loss of 0
                parts = " ".join(f"{key} {value:.4f}" if weight else f"{key} -"
                                 for key, value, weight in (("sft", sft, lam), ("fusion", fus, 1 - lam)))
                accelerator.print(f"step {step}/{total_steps} loss {record['loss']:.4f} {parts} "
                                  f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s")
        if step == total_steps or (cfg.save_every and step % cfg.save_every == 0) or (
            cfg.stop_after and ran >= cfg.stop_after
        ):
            _check_finite_weights(accelerator, wrapped, step, cfg)
            _save_checkpoint(accelerator, wrapped, tokenizer, optimizer, scheduler, stream, step, out,
                             cfg.keep_checkpoints)

    final = _checkpoints(out)[-1] if _checkpoints(out) else None
    plot_path = None
    if accelerator.is_main_process:
        for report in reporters:
            report.close()
        if cfg.plot and history:
            plot_path = str(plot_losses(history, out / "loss.png"))
        if ran:
            accelerator.print(f"done: {plural(ran, 'step')} in {time.perf_counter() - t_start:.1f}s (step {step} of "
                              f"{total_steps}); checkpoint {final}")
        else:
            accelerator.print(f"nothing to train: {out} is already at step {step} of {total_steps}; checkpoint {final}")
    accelerator.wait_for_everyone()
    return TrainResult(final_dir=str(final) if final else "", steps=step, losses=history, log_path=str(log_path),
                       plot_path=plot_path, warnings=warnings)


def _accelerator(accelerator_cls, cfg: TrainConfig):
    """The run's `accelerate.Accelerator`. Launched as several processes on a machine without a GPU, it
    is told ``cpu=True`` (gloo): accelerate would otherwise make every process a separate one-process run,
    all writing the same --out."""
    precision = "bf16" if cfg.bf16 else "no"
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = cfg.cpu or (launched > 1 and not torch.cuda.is_available())
    try:
        accelerator = accelerator_cls(mixed_precision=precision, cpu=cpu)
    except ValueError:
        # accelerate keeps one state per process; a second in-process run (tests, the demo) with another
        # precision resets it. Never reached under `accelerate launch`, where one run owns the process.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = accelerator_cls(mixed_precision=precision, cpu=cpu)
    if accelerator.num_processes != launched:
        raise UserError(f"launched as {plural(launched, 'process', 'processes')} (WORLD_SIZE) but accelerate "
                        f"formed a group of {accelerator.num_processes}: check the accelerate config")
    return accelerator


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _optimizer_state(wrapped, optimizer) -> dict:
    """AdamW's state keyed by parameter name (torch.distributed.checkpoint.state_dict): the same keys with one
    process, DDP or FSDP; under FSDP each rank holds DTensor shards of it. An optimizer that has not stepped
    yet gets zero moments first (torch does it), so the result is also the template a load fills."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the AdamW
    return get_optimizer_state_dict(wrapped, inner)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _dcp_call(fn, state: dict, path: Path) -> None:
    """`torch.distributed.checkpoint.save` / `load` of `state` at `path`; with no process group (one
    process) it runs without one, and its warning that it assumes so is not printed."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        fn(state, checkpoint_id=str(path), no_dist=not _distributed())


def _load_optimizer(wrapped, optimizer, path: Path) -> None:
    """Load the optimizer state `_save_checkpoint` wrote to `path` with torch.distributed.checkpoint, which
    reshards it: the checkpoint may come from another number of processes, or from DDP when this is FSDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    state = {"optimizer": _optimizer_state(wrapped, optimizer)}
    _dcp_call(dcp.load, state, path)
    set_optimizer_state_dict(wrapped, inner, optim_state_dict=state["optimizer"])


def _save_checkpoint(accelerator, wrapped, tokenizer, optimizer, scheduler, stream, step, out: Path, keep: int):
    """Model (safetensors, from_pretrained-loadable) + tokenizer + optimizer (torch.distributed.checkpoint,
    every rank writes its part) + trainer state, written to a temporary directory and renamed, so a
    checkpoint directory with trainer_state.pt in it is always whole. The data position is the stream's
    state after this step: the same on every rank (`trainer.data`)."""
    import torch.distributed.checkpoint as dcp

    root = out / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _dcp_call(dcp.save, {"optimizer": _optimizer_state(wrapped, optimizer)}, tmp / OPTIMIZER_DIR)
    state_dict = accelerator.get_state_dict(wrapped)  # gathered to full tensors under FSDP
    model = accelerator.unwrap_model(wrapped).model
    # tied weights (lm_head = embed_tokens) come back as two copies from FSDP's gather: keep one name
    aliases = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
               - {n for n, _ in model.named_parameters()})
    prefix = "model."
    state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if k not in aliases}
    if accelerator.is_main_process:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"format": STATE_FORMAT, "step": step, "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "data": stream.state.to_dict()}, tmp / STATE_FILE)
        honour_umask(tmp)  # safetensors writes through a private 0600 temp file; checkpoints are shared
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_history(path: Path, upto: int) -> list[dict]:
    """Logged records of steps <= upto (a resumed run rewrites the log from its checkpoint on)."""
    if upto == 0 or not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r["step"] <= upto:
                out.append(r)
    return out


class _TensorBoard:
    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """Weights & Biases: a run under OUT/logs/wandb; WANDB_MODE=offline keeps it on disk (`wandb sync` later)."""

    def __init__(self, path: Path, cfg: TrainConfig):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb: wandb is not installed (pip install wandb)") from None
        path.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "logitfuse"), dir=str(path),
                              name=Path(cfg.out).name, config=cfg.model_dump(mode="json", by_alias=True))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _reporters(log_dir: Path, cfg: TrainConfig) -> list:
    """Where step records go besides OUT/logs/train.jsonl (`--report-to`); tensorboard is skipped when it is
    not installed or `tensorboard` is off."""
    names = [n for n in cfg.report_to.split(",") if n]
    out: list = []
    if "tensorboard" in names and cfg.tensorboard:
        try:
            out.append(_TensorBoard(log_dir / "tensorboard"))
        except ImportError:  # tensorboard not installed: JSONL only
            pass
    if "wandb" in names:
        out.append(_WandB(log_dir, cfg))
    return out


def plot_losses(history: list[dict], path: Path) -> Path:
    """Total, SFT and fusion loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "total λ·SFT + (1-λ)·fusion"), ("sft", "SFT"), ("fusion", "fusion")):
        ax.plot(steps, [r[key] for r in history], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
