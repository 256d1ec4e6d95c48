"""The trainer on several processes, for real: `accelerate launch` with 2 CPU processes (gloo).

- DDP (trainer/configs/ddp_cpu.yaml): the same global batch and seed give the loss curve and weights of a
  one-process run.
- FSDP2 (trainer/configs/fsdp.yaml) through bench/_cpu_fsdp.py, which lets accelerate use FSDP on CPU
  processes (it allows FSDP only on accelerator devices): parameters and AdamW state sharded, the optimizer
  state saved as torch.distributed.checkpoint shards and loaded back on resume.
- Resume across processes: a 2-process DDP run stopped at a checkpoint resumes under 2-process FSDP, whose
  checkpoint resumes on 2 FSDP processes and on 1 plain process.

Tolerance. The runs differ only in the order of fp32 sums: each rank sums the loss gradient of its half of
the global batch and DDP's all-reduce (FSDP's reduce-scatter) adds the halves, where one process adds its
micro-batches one after the other. Relative differences of ~1e-7 per sum; AdamW divides by sqrt(v), which
magnifies them where a gradient entry is near 0. Measured here over 6 steps at lr 3e-3: weights 1.3e-6
apart at most (|w| <= 1), losses 5e-8 relative. Checked: weights within 2e-5 absolute, losses within 1e-6
relative. A data order or optimizer state that is wrong moves them by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
STEPS = 6
OPTIONS = dict(max_steps=STEPS, batch_size=4, micro_batch_size=1, max_length=48, lr=3e-3, warmup_ratio=0.2,
               shuffle_buffer=8, chunk_rows=16, save_every=2, keep_checkpoints=3, report_to="none", plot=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, processes: int, pivot: str, targets: str, out: Path, *extra: str,
           fsdp_on_cpu: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file trainer/configs/CONFIG -m clients.cli train ...` as a user runs it."""
    args = ["--targets", targets, "--model", pivot, "--out", str(out), "--report-to", "none"]
    for key, value in OPTIONS.items():
        if key not in ("report_to", "plot"):
            args += [f"--{key.replace('_', '-')}", str(value)]
    shim = ["bench._cpu_fsdp"] if fsdp_on_cpu else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "trainer/configs" / config),
           "--num_processes", str(processes), "--main_process_port", str(_free_port()),
           "-m", *shim, "clients.cli", "train", *args, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out)]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


def assert_same_run(out: Path, reference: Path, step: int = STEPS) -> None:
    """Loss curve up to `step` and the weights at `step` equal the reference's, within fp32 reassociation."""
    assert losses(out)[:step] == pytest.approx(losses(reference)[:step], rel=1e-6)
    # the same global batches: tokens and fusion targets of every step, summed over the processes
    assert [(r["tokens"], r["targets"]) for r in records(out)[:step]] == [
        (r["tokens"], r["targets"]) for r in records(reference)[:step]]
    mine, ref = weights(out, step), weights(reference, step)
    assert mine.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], rtol=0, atol=2e-5, msg=name)


@pytest.fixture(scope="module")
def one_process(trainer_pivot, trainer_targets, tmp_path_factory) -> Path:
    """The reference: one process, checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(TrainConfig.parse(targets=trainer_targets, model=trainer_pivot, out=str(out), **OPTIONS))
    return out


def resume_in_process(pivot: str, targets: str, out: Path) -> None:
    train(TrainConfig.parse(targets=targets, model=pivot, out=str(out), **OPTIONS))


def optimizer_chunks(out: Path, step: int) -> int:
    """How many pieces one AdamW moment is stored in (torch.distributed.checkpoint metadata)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(out / "checkpoints" / f"step-{step:06d}" / "optimizer")).read_metadata()
    (key,) = [k for k in meta.state_dict_metadata if k.endswith("layers.0.mlp.down_proj.weight.exp_avg")]
    return len(meta.state_dict_metadata[key].chunks)


def test_two_processes_match_one_and_resume_across_ddp_fsdp_and_process_counts(trainer_pivot, trainer_targets,
                                                                              one_process, tmp_path):
    """Global batch 4 = 2 processes x 2 micro-batches of 1 row: the rows one process trains on, split.

    DDP 2 processes, steps 1-2 -> FSDP 2 processes resumes, steps 3-4 -> FSDP 2 processes resumes its own
    sharded optimizer state, steps 5-6; and the FSDP checkpoint of step 4 resumed by one process. Every
    stretch's losses and the weights at steps 2, 4 and 6 equal the one-process run's."""
    out = tmp_path / "run"
    ddp = launch("ddp_cpu.yaml", 2, trainer_pivot, trainer_targets, out, "--cpu", "--stop-after", "2")
    assert "2 micro-batches x 1 x 2 processes per step" in ddp.stdout
    assert ddp.stdout.count("step 2, loss") == 1  # the CLI's last line, from the main process only
    assert optimizer_chunks(out, 2) == 1  # DDP: every rank holds the whole AdamW state, stored once
    assert_same_run(out, one_process, step=2)

    launch("fsdp.yaml", 2, trainer_pivot, trainer_targets, out, "--cpu", "--stop-after", "2", fsdp_on_cpu=True)
    assert optimizer_chunks(out, 4) == 2  # FSDP: AdamW state sharded over the 2 ranks
    assert_same_run(out, one_process, step=4)
    shutil.copytree(out, tmp_path / "one-more")

    # no --cpu: without a GPU the trainer asks accelerate for CPU processes itself
    launch("fsdp.yaml", 2, trainer_pivot, trainer_targets, out, fsdp_on_cpu=True)
    steps = [json.loads(line)["step"] for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert_same_run(out, one_process)

    # the FSDP shards of step 4 loaded into one process's optimizer
    resume_in_process(trainer_pivot, trainer_targets, tmp_path / "one-more")
    assert_same_run(tmp_path / "one-more", one_process)
