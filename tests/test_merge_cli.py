"""End to end: tiny Llama / Qwen2 checkpoints saved sharded by transformers, merged, loaded back; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from typer.core import TyperGroup
from typer.testing import CliRunner

from datastore.errors import UserError
from merge import parse_config, run_merge
from merge.cli import MergeCommand, expand_list_options, merge_command

TINY = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
}


def build_family(root: Path, kind: str, n_targets: int = 3) -> tuple[Path, list[Path]]:
    """A tiny pivot and targets (pivot + noise), each saved by `save_pretrained` in several shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        **TINY[kind], vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "pivot", max_shard_size="20KB")
    targets = []
    for j in range(n_targets):
        torch.manual_seed(j + 1)
        with torch.no_grad():
            target = AutoModelForCausalLM.from_config(cfg)
            target.load_state_dict(model.state_dict())
            for p in target.parameters():
                p.add_(0.02 * torch.randn_like(p))
        target.save_pretrained(root / f"target{j}", max_shard_size="20KB")
        targets.append(root / f"target{j}")
    return root / "pivot", targets


def assert_loads_with_finite_logits(out: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == kind
    logits = model(torch.arange(12)[None] % 96).logits
    assert logits.shape == (1, 12, 96) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_merged_tiny_model_loads_with_transformers(tmp_path, kind):
    pivot, targets = build_family(tmp_path, kind)
    assert len(list(pivot.glob("*.safetensors"))) > 1
    cfg = parse_config(
        {"merge_method": "sce", "base_model": str(pivot), "models": [{"model": str(t)} for t in targets],
         "parameters": {"select_topk": 0.1}}
    )
    run_merge(cfg, tmp_path / "out", chunk_elements=1000, max_shard_size="30KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert ("lm_head.weight" in index["weight_map"]) == (kind == "llama")  # qwen2 ties its head
    assert_loads_with_finite_logits(tmp_path / "out", kind)


class UserErrorsExit2(TyperGroup):
    """What the logitfuse CLI does with a UserError: one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None


def make_app() -> typer.Typer:
    app = typer.Typer(cls=UserErrorsExit2)
    app.command("merge", cls=MergeCommand)(merge_command)

    @app.command("version")
    def version() -> None:  # a second command, so `merge` is a subcommand as in the real CLI
        typer.echo("0")

    return app


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("cli"), "qwen2")


def test_cli_with_a_config_file(tmp_path, family):
    pivot, targets = family
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "sce",
        "base_model": str(pivot),
        "models": [{"model": str(pivot)}] + [{"model": str(t)} for t in targets],
        "parameters": {"select_topk": 0.1},
        "dtype": "bfloat16",
    }))
    result = CliRunner().invoke(
        make_app(), ["merge", "--config", str(config), "--out", str(tmp_path / "out"), "--max-shard-size", "20KB"]
    )
    assert result.exit_code == 0, result.output
    assert "[1/" in result.output and "wrote" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_loads_with_finite_logits(tmp_path / "out", "qwen2")


def test_cli_with_flags(tmp_path, family):
    pivot, targets = family
    args = ["merge", "--method", "ties", "--base", str(pivot), "--models", *map(str, targets),
            "--density", "0.5", "--weight", "1", "0.5", "-0.25", "--out", str(tmp_path / "out"),
            "--max-shard-size", "20KB"]
    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 0, result.output
    assert "merging 3 models" in result.output
    assert_loads_with_finite_logits(tmp_path / "out", "qwen2")
    # The same merge from a config with per-model weights: byte-identical shards.
    cfg = parse_config({"merge_method": "ties", "base_model": str(pivot), "parameters": {"density": 0.5},
                        "models": [{"model": str(t), "parameters": {"weight": w}} for t, w in zip(targets, [1, 0.5, -0.25], strict=True)]})
    run_merge(cfg, tmp_path / "ref", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors"))
    assert shards and all((tmp_path / "out" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes() for n in shards)


def test_list_options_take_several_values_and_stray_arguments_are_errors(tmp_path, family):
    assert expand_list_options(["--weight", "0.3", "-0.7", "1e-2", "--out", "o", "--models", "a", "b"]) == [
        "--weight", "0.3", "--weight", "-0.7", "--weight", "1e-2", "--out", "o", "--models", "a", "--models", "b"]
    assert expand_list_options(["--models", "a", "--", "b"]) == ["--models", "a", "--", "b"]
    pivot, targets = family
    # A stray value after a single-valued option is no longer swallowed as another model.
    result = CliRunner().invoke(make_app(), ["merge", "--method", "sce", "--base", str(pivot), "--models", str(targets[0]),
                                             "--out", str(tmp_path / "o"), str(targets[1])])
    assert result.exit_code == 2 and "unexpected extra argument" in result.output
    assert not (tmp_path / "o").exists()


def test_linear_needs_no_base_and_overwrite_replaces_the_output(tmp_path, family):
    pivot, targets = family
    out = tmp_path / "out"
    args = ["merge", "--method", "linear", "--models", str(targets[0]), str(targets[1]), "--weight", "0.3", "0.7",
            "--out", str(out)]
    from clients.cli import app  # the real CLI registers merge with MergeCommand too

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    merged = load_file(str(next(out.glob("*.safetensors"))))
    a = load_file(str(next(targets[0].glob("*.safetensors"))))
    b = load_file(str(next(targets[1].glob("*.safetensors"))))
    name = next(n for n in merged if n in a and n in b)
    torch.testing.assert_close(merged[name], 0.3 * a[name] + 0.7 * b[name], rtol=1e-6, atol=1e-7)
    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 2 and "exists and is not an empty directory (--overwrite replaces it)" in result.output
    (out / "marker").write_text("old")
    result = CliRunner().invoke(make_app(), [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "marker").exists() and (out / "model.safetensors.index.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # --overwrite of the folder holding the input models (found by a tester: it deleted them), or a place
    # inside one of them, is refused and deletes nothing
    parent = targets[0].parent
    before = sorted(p.name for p in parent.iterdir())
    for bad, how in [(parent, "holds the input"), (targets[1] / "merged", "lies inside the input")]:
        result = CliRunner().invoke(make_app(), [*args[:-1], str(bad), "--overwrite"])
        assert result.exit_code == 2 and f"--out {bad} {how}" in result.output, result.output
    assert sorted(p.name for p in parent.iterdir()) == before and not (targets[1] / "merged").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ({"merge_method": "sce", "models": [{"model": "{t}"}]}, "merge_method sce needs base_model"),
        ({"merge_method": "sce", "base_model": "{pivot}", "models": [{"model": "{t}"}],
          "parameters": {"select_topk": 2}}, "select_topk: Input should be less than or equal to 1"),
        ("merge_method: [unclosed", "not valid YAML"),
        # a 1 KB alias bomb (each anchor lists the previous one 10 times: 10^8 values once expanded) and a
        # config nested 5,000 levels deep: one line at once, not minutes of checking or a RecursionError
        ("merge_method: linear\nmodels:\n  - model: A\n    parameters:\n      weight:\n"
         "        - &a0 {filter: zz, value: 1}\n"
         + "".join(f"        - &a{i} {{filter: zz, value: [{', '.join([f'*a{i - 1}'] * 10)}]}}\n" for i in range(1, 9)),
         "more than 100,000 values once YAML aliases are expanded"),
        ("merge_method: linear\nparameters: {weight: " + "[" * 5000 + "]" * 5000 + "}\n", "nested"),
        # models that is not a list (a tester's `models: 5` was a TypeError traceback)
        ("merge_method: linear\nmodels: 5\n", "models: expected a list of entries like {model: DIR}, got 5"),
        ("merge_method: linear\nmodels: true\n", "models: expected a list"),
    ],
)
def test_cli_bad_config_exits_2_with_one_line(tmp_path, family, content, message):
    pivot, targets = family
    config = tmp_path / "merge.yaml"
    if isinstance(content, dict):
        content = yaml.safe_dump(content).replace("'{pivot}'", str(pivot)).replace("'{t}'", str(targets[0]))
    config.write_text(content)
    result = CliRunner().invoke(make_app(), ["merge", "--config", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_rejects_config_mixed_with_flags_and_missing_inputs(tmp_path, family):
    pivot, targets = family
    runner = CliRunner()
    result = runner.invoke(make_app(), ["merge", "--config", "x.yaml", "--method", "sce", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--config cannot be combined with --method" in result.output
    result = runner.invoke(make_app(), ["merge", "--method", "sce", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--method, --base and --models" in result.output
    result = runner.invoke(make_app(), ["merge", "--method", "sce", "--base", str(pivot), "--models", *map(str, targets),
                                        "--weight", "1", "--weight", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--weight: give one value or one per model (3), not 2" in result.output
    result = runner.invoke(make_app(), ["merge", "--method", "Linear", "--models", *map(str, targets),
                                        "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown merge_method 'Linear': did you mean 'linear'?" in result.output
    # a mergekit-only method named on the command line still goes to mergekit (not "unknown")
    result = runner.invoke(make_app(), ["merge", "--method", "model_stock", "--base", str(pivot), "--models",
                                        *map(str, targets[:2]), "--out", str(tmp_path / "ms")])
    assert "unknown merge_method" not in result.output and "mergekit" in result.output, result.output


def test_cli_bad_inputs_found_by_review_exit_2_and_write_nothing(tmp_path, family):
    """A config that is not text, a shard size under one byte, --out a file (even with --overwrite), and
    --out under a path that cannot be a directory: one line, exit 2, nothing written or replaced."""
    pivot, targets = family
    flags = ["merge", "--method", "sce", "--base", str(pivot), "--models", str(targets[0])]
    from clients.cli import app  # the real CLI: OSErrors naming a path become one line too

    config = tmp_path / "merge.yaml"
    config.write_bytes(b"merge_method: sce\nbase_model: x\n\xff\xfe")
    result = CliRunner().invoke(app, ["merge", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "merge.yaml: not a text file (byte" in result.output
    for size in ["0", "-1", "nan", "5XB"]:
        result = CliRunner().invoke(app, [*flags, "--out", str(tmp_path / "o"), "--max-shard-size", size])
        assert result.exit_code == 2 and f"bad size '{size}': expected a positive number" in result.output
        assert len(result.output.strip().splitlines()) == 1  # checked before any checkpoint is read
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    result = CliRunner().invoke(app, [*flags, "--out", str(afile), "--overwrite"])
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    assert afile.read_text() == "keep me"
    result = CliRunner().invoke(app, [*flags, "--out", str(afile / "out")])
    assert result.exit_code == 2 and f"{afile} is a file, not a directory" in result.output
    assert len(result.output.strip().splitlines()) == 1  # before any tensor is merged
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "notes.txt"]


def test_a_model_config_that_is_not_an_object_is_one_line_and_version_prints(tmp_path, family):
    """A target whose config.json is a JSON list merged with exit 0 (its checks skipped); a base's raised
    AttributeError. `logitfuse --version` did not exist."""
    import shutil

    from clients.cli import app

    pivot, targets = family
    for role in ("base", "target"):
        broken = tmp_path / role
        shutil.copytree(pivot if role == "base" else targets[0], broken)
        (broken / "config.json").write_text("[1, 2]")
        base, model = (broken, targets[0]) if role == "base" else (pivot, broken)
        result = CliRunner().invoke(app, ["merge", "--method", "sce", "--base", str(base), "--models", str(model),
                                          "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert f"{broken}/config.json: expected a JSON object" in result.output and not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("logitfuse ")


@pytest.mark.parametrize("doc", ["README.md", "docs/merge.md"])
def test_the_documented_merge_synopsis_shows_the_real_defaults(doc):
    """Every `[--option VALUE]` of the merge synopsis is the option's default (or the method's, for the
    per-model lists), and FuseChat's own τ is named next to it."""
    import re

    import typer.main

    from merge.registry import get_method

    text = Path(__file__).resolve().parent.parent.joinpath(doc).read_text()
    synopsis = text[text.index("logitfuse merge --method sce"):]
    synopsis = synopsis[: synopsis.index("```")]
    command = typer.main.get_command(make_app()).commands["merge"]
    defaults = {opt: p.default for p in command.params for opt in p.opts}
    shown = re.findall(r"\[(--[a-z-]+) ([^\]\s|/]+)", synopsis)
    assert {o for o, _ in shown} >= {"--select-topk", "--sce-variant", "--weight", "--density", "--seed"}
    per_model = {"--weight": get_method("ties").per_model_params.model_fields["weight"].default,
                 "--density": get_method("ties").per_model_params.model_fields["density"].default}
    for option, value in shown:
        if value.startswith("<"):
            continue  # a description such as <the base's>
        expected = per_model.get(option, defaults[option])
        assert str(expected) == value, f"{doc}: {option} shows {value}, the default is {expected}"
    assert get_method("sce").global_params.model_fields["select_topk"].default == 1.0
    assert "τ = 10%" in text and "select_topk: 0.1" in text  # FuseChat's own setting, named as such
