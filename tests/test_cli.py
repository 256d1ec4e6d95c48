"""The `logitfuse` command line itself: help that loads no torch, --version, choices and defaults in the
standard form, one-line usage errors, plurals, a missing local model directory named as such."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from clients.cli import app
from datastore.words import plural

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["extract"], ["demo"], ["fuse"], ["train"], ["merge"], ["serve"], ["submit"], ["store"],
            ["store", "ls"], ["store", "show"], ["store", "verify"]]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), prog_name="logitfuse", terminal_width=100)


def test_help_imports_neither_torch_nor_transformers():
    """Every command's --help, in a fresh interpreter, leaves torch, transformers and pyarrow unimported
    (they cost seconds; `logitfuse --help` must answer at once)."""
    script = (
        "import json, sys\n"
        "import typer\n"
        "from clients.cli import app\n"
        "group = typer.main.get_command(app)\n"
        f"for args in {COMMANDS!r}:\n"
        "    group.main([*args, '--help'], prog_name='logitfuse', standalone_mode=False)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: logitfuse train" in proc.stdout and "Usage: logitfuse store verify" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_version():
    r = _invoke("--version")
    assert r.exit_code == 0
    assert r.output.strip() == f"logitfuse {importlib.metadata.version('logitfuse')}"


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "logitfuse")
def test_help_is_in_the_standard_form(args):
    r = _invoke(*args, "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output and "╭" not in r.output  # plain click help, flags without a type
    assert "[default: (" not in r.output  # a default is a value, not a description


def test_train_help_shows_choices_and_the_config_defaults():
    from trainer.train import TrainConfig

    r = _invoke("train", "--help")
    for text in ("--loss <ce|kl|rkl|jsd>", "--tail <renormalise|bucket>", "--preset <fusechat>",
                 "--bf16 / --no-bf16", "[default: 0.9]", "[default: ce]"):
        assert text in r.output, text
    # each default shown is the one TrainConfig applies when neither the option nor a preset sets it
    command = typer.main.get_command(app).commands["train"]
    fields = TrainConfig.model_fields
    checked = 0
    for param in command.params:
        if param.name in fields and not param.required:
            expected = fields[param.name].default
            assert param.default == expected, (param.name, param.default, expected)
            checked += 1
    assert checked >= 25


def test_fuse_choices_are_the_pipeline_methods():
    from fusion.align import ALIGN_METHODS
    from fusion.fuse import FUSION_METHODS
    from fusion.pipeline import MODES, VOCAB_MAPS

    r = _invoke("fuse", "--help")
    for option, values in (("--align", ALIGN_METHODS), ("--vocab-map", VOCAB_MAPS), ("--fusion", FUSION_METHODS),
                           ("--mode", MODES)):
        assert f"{option} <{'|'.join(values)}>" in r.output


def test_train_passes_on_only_the_options_given(monkeypatch):
    """Options keep their defaults in the help, yet a preset still fills every option not given."""
    import trainer.train

    seen = []
    monkeypatch.setattr(trainer.train, "train", lambda cfg: seen.append(cfg) or trainer.train.TrainResult(
        final_dir="x", steps=0, losses=[], log_path="x"))
    base = ["train", "--targets", "t", "--model", "m", "--out", "o"]
    assert _invoke(*base, "--preset", "fusechat", "--lr", "1e-4").exit_code == 0
    assert _invoke(*base, "--batch-size", "4").exit_code == 0
    preset, plain = seen
    assert (preset.lr, preset.epochs, preset.batch_size, preset.max_length, preset.lambda_) == (1e-4, 3.0, 128,
                                                                                                 2048, 0.9)
    assert (plain.lr, plain.epochs, plain.batch_size, plain.max_length) == (1e-5, 1.0, 4, 2048)


@pytest.mark.parametrize(
    "args, line",
    [
        (["train", "--targets", "t", "--model", "m", "--out", "o", "--loss", "mse"],
         "error: --loss 'mse': expected one of ce, kl, rkl, jsd (see logitfuse train --help)"),
        (["train", "--targets", "t", "--out", "o"], "error: Missing option '--model' (see logitfuse train --help)"),
        (["trian"], "error: No such command 'trian'. Did you mean 'train'? (see logitfuse --help)"),
        (["store", "verify"], "error: Missing argument 'DATASET|STORE' (see logitfuse store verify --help)"),
        (["fuse", "--pivot", "p", "--source", "s", "--out", "o", "--k", "x"], "error: Invalid value for '--k'"),
    ],
)
def test_a_command_line_that_does_not_parse_is_one_line_and_exit_2(args, line):
    r = _invoke(*args)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), r.output


def test_plural():
    assert plural(1, "shard") == "1 shard"
    assert (plural(0, "shard"), plural(2, "shard")) == ("0 shards", "2 shards")
    assert plural(1, "process", "processes") == "1 process" and plural(3, "process", "processes") == "3 processes"


def test_store_says_1_shard_and_1_sample(tmp_path):
    from datastore.targets import TargetSample, TargetsMeta, TargetsWriter, targets_id, targets_uri

    meta = TargetsMeta(pivot="p", sources=["s"], align="offsets", vocab_map="ms", fusion="mince", k=2)
    uri = targets_uri(str(tmp_path), targets_id(meta))
    with TargetsWriter(uri, meta) as w:
        w.write(TargetSample("a", np.array([1, 2, 3], np.int32), np.array([False, True, True]),
                             np.array([0, 1], np.int32), np.array([[2, 5], [3, -1]], np.int32),
                             np.array([[0.5, 0.25], [0.9, 0.0]], np.float32)))
    show, verify = _invoke("store", "show", uri), _invoke("store", "verify", uri)
    assert show.exit_code == verify.exit_code == 0, show.output + verify.output
    assert "in 1 shard" in show.output and "tokenizer     not recorded" in show.output
    assert "targets, 1 shard, 1 sample, 2 positions" in verify.output
    assert "1 shards" not in show.output + verify.output and "1 samples" not in verify.output


def test_a_missing_local_teacher_directory_is_named(tmp_path, monkeypatch):
    """A local path that does not exist is named as such, not as an invalid hub id; "./org/name" stays a
    path (typer's Path type would have made it "org/name", a hub id)."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "hello"}]}\n')
    for teacher in ("./teachers/mistral", str(tmp_path / "nope"), "mistral"):
        r = _invoke("extract", "--teacher", teacher, "--dataset", str(data), "--store", str(tmp_path / "store"))
        assert r.exit_code == 2
        assert r.output.strip() == f"error: --teacher {teacher}: no such file or directory", r.output
    assert not (tmp_path / "store").exists()


def test_a_fusion_rerun_reports_complete_targets():
    from fusion.pipeline import FuseReport, SourceReport, TargetsReport

    report = FuseReport(pivot="p", align="offsets", vocab_map="ms", fusion="mince", mode="pairwise", k=5)
    report.sources = [SourceReport("src", "store/logits/s", "s")]
    report.targets = [TargetsReport("store/targets/t", "t", ["pivot", "src"], written=0, already_done=96)]
    assert report.lines() == ["nothing to fuse: the targets were already complete (96 samples in store/targets/t)"]
    report.samples, report.targets[0].written, report.targets[0].already_done = 4, 4, 92
    assert report.lines()[0].startswith("fused 4 samples")


def test_tokenizer_caches_are_never_a_fixed_path(tmp_path_factory, tmp_path, monkeypatch):
    """tiny_models used to cache converted tokenizers in a fixed directory of the system temp dir: now the
    tests' cache is under pytest's base temp dir, and without one a process gets its own temporary
    directory, removed at exit."""
    import tempfile

    import clients.tiny_models as tm

    assert Path(os.environ[tm.TOKENIZER_CACHE_ENV]).is_relative_to(tmp_path_factory.getbasetemp())
    assert tm.tokenizer_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv(tm.TOKENIZER_CACHE_ENV)
    monkeypatch.setattr(tm, "_process_cache", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    own = tm.tokenizer_cache_dir()
    assert own.parent == tmp_path and own.name.startswith("logitfuse-tokenizers-") and own.is_dir()
    assert tm.tokenizer_cache_dir() == own  # one per process
    tm._process_cache.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_demo_workdir_under_a_file_is_one_line_before_any_work(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for workdir, message in ((a_file, "a file is there, not a directory"), (a_file / "w", f"{a_file} is a file")):
        result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(workdir)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert a_file.read_text() == "keep me"
