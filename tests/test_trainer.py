"""trainer.train and `logitfuse train`: exact resume, from_pretrained-loadable checkpoints, logs and plot,
one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_data import write_targets
from typer.testing import CliRunner

from datastore.errors import UserError
from trainer.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pivot_dir(trainer_pivot):
    return trainer_pivot


@pytest.fixture
def targets_uri(trainer_targets):
    return trainer_targets


def config(pivot_dir, targets_uri, out, **kw) -> TrainConfig:
    base = dict(targets=targets_uri, model=pivot_dir, out=str(out), max_steps=6, batch_size=2, micro_batch_size=1,
                max_length=48, lr=3e-3, warmup_ratio=0.2, shuffle_buffer=8, chunk_rows=16, tensorboard=True)
    base.update(kw)
    return TrainConfig.parse(**base)


def test_resume_continues_exactly(pivot_dir, targets_uri, tmp_path):
    straight = train(config(pivot_dir, targets_uri, tmp_path / "a"))
    first = train(config(pivot_dir, targets_uri, tmp_path / "b", stop_after=3))
    assert first.steps == 3
    resumed = train(config(pivot_dir, targets_uri, tmp_path / "b"))
    assert straight.steps == resumed.steps == 6
    wa = load_file(f"{straight.final_dir}/model.safetensors")
    wb = load_file(f"{resumed.final_dir}/model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-6, atol=1e-7)
    assert [r["loss"] for r in straight.losses] == pytest.approx([r["loss"] for r in resumed.losses], rel=1e-6)
    # weights moved, and the log / plot / tensorboard files are there
    w0 = load_file(f"{pivot_dir}/model.safetensors")
    assert not torch.equal(w0["model.norm.weight"], wa["model.norm.weight"])
    lines = (tmp_path / "b" / "logs" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "b" / "logs" / "tensorboard").iterdir())
    # the same command once more: it says there is nothing to train and changes nothing
    import contextlib
    import io

    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        again = train(config(pivot_dir, targets_uri, tmp_path / "b"))
    assert f"nothing to train: {tmp_path / 'b'} is already at step 6 of 6" in said.getvalue(), said.getvalue()
    assert again.final_dir == resumed.final_dir and again.steps == 6
    assert load_file(f"{again.final_dir}/model.safetensors").keys() == wb.keys()


def test_checkpoint_loads_with_transformers(pivot_dir, targets_uri, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(config(pivot_dir, targets_uri, tmp_path / "c", max_steps=2, loss="jsd", tail="bucket",
                          temperature=2.0, bf16=True))
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert model.config.vocab_size == len(tok)
    ids = tok("the small fox", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert all(torch.isfinite(torch.tensor([r["loss"], r["sft"], r["fusion"]])).all() for r in result.losses)


def test_loss_goes_down_and_sft_only_ignores_targets(pivot_dir, targets_uri, tmp_path):
    result = train(config(pivot_dir, targets_uri, tmp_path / "d", max_steps=8, plot=False))
    losses = [r["loss"] for r in result.losses]
    assert losses[-1] < losses[0]
    sft_only = train(config(pivot_dir, targets_uri, tmp_path / "e", max_steps=1, plot=False, **{"lambda": 1.0}))
    assert sft_only.losses[0]["loss"] == pytest.approx(sft_only.losses[0]["sft"])


def test_resume_with_other_settings_is_refused(pivot_dir, targets_uri, tmp_path):
    train(config(pivot_dir, targets_uri, tmp_path / "f", max_steps=1, plot=False))
    with pytest.raises(UserError, match="other settings.*lr"):
        train(config(pivot_dir, targets_uri, tmp_path / "f", max_steps=1, lr=1e-4))


def test_preset_fills_only_what_is_not_given():
    cfg = TrainConfig.parse(targets="t", model="m", out="o", preset="fusechat", lr=1e-4)
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.max_length, cfg.lambda_, cfg.warmup_ratio) == (
        1e-4, 3.0, 128, 2048, 0.9, 0.03)


def _cli(args):
    from clients.cli import app

    return CliRunner().invoke(app, ["train", *args])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "mse"], "--loss"),
        (["--lambda", "1.5"], "--lambda"),
        (["--batch-size", "3", "--micro-batch-size", "2"], "multiple of --micro-batch-size"),
        (["--preset", "llama"], "--preset"),
        # non-finite and out-of-range numbers: one line before any work, never a traceback or NaN weights
        (["--lambda", "nan"], "--lambda: Input should be a finite number"),
        (["--epochs", "inf"], "--epochs: Input should be a finite number"),
        (["--lr", "inf"], "--lr: Input should be a finite number"),
        (["--weight-decay", "inf"], "--weight-decay: Input should be a finite number"),
        (["--temperature", "inf"], "--temperature: Input should be a finite number"),
        (["--temperature", "1e-30"], "--temperature: Input should be greater than or equal to 0.01"),
        (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
        (["--seed", "99999999999999999999999"], "--seed"),
        (["--max-length", "100000000000"], "--max-length: Input should be less than or equal to 1048576"),
        (["--report-to", "wandb,foo"], "--report-to: foo is not one of"),
    ],
)
def test_cli_bad_options_exit_2(pivot_dir, targets_uri, tmp_path, extra, message):
    result = _cli(["--targets", targets_uri, "--model", pivot_dir, "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_bad_paths_exit_2(pivot_dir, targets_uri, tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli(["--targets", targets_uri, "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no config.json" in r.output
    r = _cli(["--targets", str(tmp_path / "none"), "--model", pivot_dir, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no targets dataset" in r.output
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out, message in ((a_file, "a file is there, not a directory"), (a_file / "o", f"{a_file} is a file")):
        r = _cli(["--targets", targets_uri, "--model", pivot_dir, "--out", str(out)])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert a_file.read_text() == "keep me"


def test_bad_inputs_with_no_resume_delete_nothing_and_out_stays_apart_from_inputs(pivot_dir, targets_uri, tmp_path):
    """--no-resume starts over only once the inputs are checked: a mistyped --targets or --model is an error
    that leaves the earlier run whole. --out may not be, hold or lie inside --model or --targets."""
    run = tmp_path / "run"
    train(config(pivot_dir, targets_uri, run, max_steps=1, plot=False))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    damaged = tmp_path / "damaged"  # the targets with one shard gone: found only when the shards are read
    shutil.copytree(targets_uri, damaged)
    os.remove(next(damaged.glob("shard-*.parquet")))
    from datastore.targets import TargetsReader, TargetsWriter

    source = TargetsReader(targets_uri)  # two samples committed, the writer never closed: a fuse still running
    partial = TargetsWriter(str(tmp_path / "partial"), source.manifest.meta, shard_rows=2)
    for t in list(source.iter_samples())[:2]:
        partial.write(t)
    for bad, words in ((["--targets", str(tmp_path / "typo"), "--model", pivot_dir], "typo"),
                       (["--targets", targets_uri, "--model", str(tmp_path / "typo")], "typo"),
                       (["--targets", str(damaged), "--model", pivot_dir], "shard"),
                       (["--targets", str(tmp_path / "partial"), "--model", pivot_dir],
                        "incomplete targets dataset (2 samples committed, its fuse has not finished)")):
        r = _cli([*bad, "--out", str(run), "--no-resume", "--max-steps", "1"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and words in r.output, r.output
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    for out, words in ((pivot_dir, "is the --model directory"), (Path(pivot_dir) / "runs", "lies inside the --model"),
                       (targets_uri, "is the --targets directory")):
        r = _cli(["--targets", targets_uri, "--model", pivot_dir, "--out", str(out), "--max-steps", "1"])
        assert r.exit_code == 2 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (Path(pivot_dir) / "runs").exists() and not (Path(targets_uri) / "logs").exists()
    # a model where the run rotates checkpoints is refused; one elsewhere under --out is fine
    shutil.copytree(pivot_dir, tmp_path / "exp" / "checkpoints" / "pivot")
    r = _cli(["--targets", targets_uri, "--model", str(tmp_path / "exp" / "checkpoints" / "pivot"),
              "--out", str(tmp_path / "exp"), "--max-steps", "1"])
    assert r.exit_code == 2 and "holds the --model directory" in r.output, r.output
    shutil.copytree(pivot_dir, tmp_path / "exp2" / "pivot")
    r = _cli(["--targets", targets_uri, "--model", str(tmp_path / "exp2" / "pivot"), "--out", str(tmp_path / "exp2"),
              "--max-steps", "1", "--batch-size", "1", "--max-length", "32", "--report-to", "none"])
    assert r.exit_code == 0 and (tmp_path / "exp2" / "pivot" / "config.json").exists(), r.output


def test_weights_that_become_non_finite_are_not_saved(pivot_dir, targets_uri, tmp_path):
    """A learning rate that blows the weights up ends the run with one line and no checkpoint: the loss of
    the next step is not finite (and the weights are checked before any checkpoint is saved)."""
    r = _cli(["--targets", targets_uri, "--model", pivot_dir, "--out", str(tmp_path / "o"), "--max-steps", "3",
              "--batch-size", "1", "--max-length", "32", "--lr", "1e30", "--warmup-ratio", "0"])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and "the loss is nan" in errors[0], r.output
    assert "lower --lr" in errors[0]
    assert not list((tmp_path / "o").glob("checkpoints/step-*"))


def test_a_checkpoint_with_non_finite_weights_is_refused():
    from accelerate import Accelerator

    from trainer.train import _check_finite_weights

    cfg = TrainConfig.parse(targets="t", model="m", out="o", lr=1e-3)
    layer = torch.nn.Linear(2, 2)
    _check_finite_weights(Accelerator(cpu=True), layer, 1, cfg)  # finite: passes
    layer.weight.data[0, 1] = float("inf")
    with pytest.raises(UserError, match="step 4: the weights became NaN or infinite; no checkpoint is saved"):
        _check_finite_weights(Accelerator(cpu=True), layer, 4, cfg)


def test_cli_trains(pivot_dir, targets_uri, tmp_path):
    r = _cli(["--targets", targets_uri, "--model", pivot_dir, "--out", str(tmp_path / "o"), "--max-steps", "1",
              "--batch-size", "1", "--max-length", "32", "--loss", "kl"])
    assert r.exit_code == 0, r.output
    assert "step 1, loss" in r.output


def _save_model(out, arch, tokenizer, **overrides):
    from clients.tiny_models import build_model

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    model = build_model(arch, tokenizer, seed=0, **{**small, **overrides})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_a_model_that_is_not_the_targets_pivot_is_refused(targets_uri, tmp_path, spm_tokenizer, bpe_tokenizer):
    """Mistral-pivot (32k SentencePiece) targets and a Qwen2 model on the 131k BPE tokenizer: every target id
    fits its vocabulary, yet the targets mean other tokens. One line naming both tokenizers; nothing written."""
    from datastore.tokenizers import tokenizer_fingerprint

    qwen = _save_model(tmp_path / "qwen2", "qwen2", bpe_tokenizer)
    r = _cli(["--targets", targets_uri, "--model", qwen, "--out", str(tmp_path / "o"), "--max-steps", "1"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert f"--model {qwen}: its tokenizer ({tokenizer_fingerprint(bpe_tokenizer)}, {len(bpe_tokenizer)} tokens)" \
        in lines[0]
    assert f"pivot tokenizer ({tokenizer_fingerprint(spm_tokenizer)}, {len(spm_tokenizer)} tokens" in lines[0]
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_tokenizer_longer_than_the_embedding_is_refused(tmp_path, spm_tokenizer):
    """The pivot's own tokenizer, but weights with 1000 embedding rows: one line naming both sizes (before:
    training ran, or an IndexError / a device assert once an id reached the embedding)."""
    uri, _ = write_targets(tmp_path / "t", 8, vocab=1000, pivot_tokenizer=spm_tokenizer)
    model = _save_model(tmp_path / "m", "llama", spm_tokenizer, vocab_size=1000)
    with pytest.raises(UserError) as e:
        train(config(model, uri, tmp_path / "o", max_steps=1))
    assert str(e.value) == (f"--model {model}: its tokenizer has {len(spm_tokenizer)} tokens but the model's "
                            "embedding has 1000 rows: the tokenizer and the weights do not belong together")


def test_warns_when_an_epoch_is_shorter_than_a_step(pivot_dir, targets_uri, tmp_path, capsys):
    """40 short samples pack into fewer rows than a batch of 32: the data cycles within the one step that
    --epochs 1 becomes. Both facts are said on stderr; an ordinary run says nothing."""
    from trainer.data import estimate_rows_per_epoch

    rows = estimate_rows_per_epoch(targets_uri, 48)
    assert rows < 32
    result = train(config(pivot_dir, targets_uri, tmp_path / "w", max_steps=0, epochs=1.0, batch_size=32,
                          micro_batch_size=8, plot=False, tensorboard=False))
    assert result.steps == 1
    err = capsys.readouterr().err
    assert len(result.warnings) == 2
    assert result.warnings[0].startswith(f"one epoch is {rows} packed sequences of 48 tokens, less than one "
                                          "optimizer step (32, --batch-size): the data cycles within every step")
    assert result.warnings[1] == f"--epochs 1 is less than one optimizer step: the run makes 1 step, {32 / rows:.1f} epochs"
    assert all(f"warning: {w}" in err for w in result.warnings)
    ordinary = train(config(pivot_dir, targets_uri, tmp_path / "n", max_steps=1, plot=False, tensorboard=False))
    assert ordinary.warnings == [] and "warning:" not in capsys.readouterr().err


def test_resume_compares_resolved_paths(pivot_dir, targets_uri, tmp_path, monkeypatch):
    """A run started with absolute paths resumes when given the same paths relative to the working
    directory (and through a symlink); before, the strings differed and the resume was refused."""
    first = train(config(pivot_dir, targets_uri, tmp_path / "r", max_steps=2, stop_after=1, plot=False))
    assert first.steps == 1
    (tmp_path / "link").symlink_to(pivot_dir)
    monkeypatch.chdir(targets_uri)
    resumed = train(config(str(tmp_path / "link"), ".", tmp_path / "r", max_steps=2, plot=False))
    assert resumed.steps == 2 and [r["step"] for r in resumed.losses] == [1, 2]
    record = json.loads((tmp_path / "r" / "train_config.json").read_text())  # paths stored resolved
    assert (record["targets"], record["model"]) == (str(Path(targets_uri).resolve()), str(Path(pivot_dir).resolve()))


def test_report_to_tensorboard_and_wandb_offline(pivot_dir, targets_uri, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = _cli(["--targets", targets_uri, "--model", pivot_dir, "--out", str(tmp_path / "o"), "--max-steps", "2",
              "--batch-size", "1", "--max-length", "32", "--report-to", "tensorboard,wandb"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (tmp_path / "o" / "logs" / "train.jsonl").read_text().splitlines()]
    (run,) = (tmp_path / "o" / "logs" / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    data = run.read_bytes()  # protobuf history records: key "train/loss", value_json = the JSON of the value
    assert b"train/loss" in data and all(json.dumps(r["loss"]).encode() in data for r in records)
    events = EventAccumulator(str(tmp_path / "o" / "logs" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])
    bad = _cli(["--targets", targets_uri, "--model", pivot_dir, "--out", str(tmp_path / "p"), "--report-to", "mlflow"])
    assert bad.exit_code == 2 and "--report-to: mlflow is not one of tensorboard, wandb, none" in bad.output


def test_a_checkpoint_of_the_earlier_layout_is_refused(pivot_dir, targets_uri, tmp_path):
    """trainer_state.pt once held a plain optimizer state_dict and one stream state per rank; such a
    checkpoint cannot be resumed exactly (data order and optimizer layout changed): one line, not a KeyError."""
    import shutil

    ckpt = tmp_path / "o" / "checkpoints" / "step-000001"
    shutil.copytree(pivot_dir, ckpt)
    torch.save({"step": 1, "optimizer": {}, "scheduler": {}, "rng": torch.get_rng_state(),
                "data": [{"epoch": 0, "index": 3}]}, ckpt / "trainer_state.pt")
    with pytest.raises(UserError, match=r"step-000001: a checkpoint of an older logitfuse .* --no-resume"):
        train(config(pivot_dir, targets_uri, tmp_path / "o", max_steps=2))
