"""Parity with mergekit 0.1.5 (the `mergekit` extra, installed in CI by the dev extra) on tiny Llama checkpoints.

Every method both implement agrees to 1e-6 (float32 checkpoints; mergekit computes in float32, we in
float64); DARE's masks differ by design, so its kept fraction and rescaled L1 norms are compared. FuseChat-
author-style configs (sce, dare, linear, ta: written here from the issue's description) run unchanged.
Methods only mergekit has are handed to mergekit and give exactly what mergekit gives.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge import MergeError, load_config, parse_config, run_merge
from merge.parameters import MERGEKIT_PARAMETERS
from merge.registry import MERGEKIT_METHODS, builtin_methods
from tests.test_merge_cli import build_family

mergekit = pytest.importorskip("mergekit", reason="the mergekit extra (pip install -e '.[dev]') is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def run_mergekit(data: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit's own result for a config dict (its Python API, independent of merge.mergekit_bridge)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run_merge

    mk_run_merge(MergeConfiguration.model_validate(data), str(out),
                 options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return load_dir(out)


def ours(data: dict, out: Path) -> dict[str, torch.Tensor]:
    run_merge(parse_config(data), out)
    return load_dir(out)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6, rtol: float = 0.0) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        torch.testing.assert_close(a[name].float(), b[name].float(), atol=atol, rtol=rtol, msg=name)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A float32 pivot and three targets (pivot + N(0, 0.02²)), untied Llama, 2 layers, sharded."""
    pivot, targets = build_family(tmp_path_factory.mktemp("mk"), "llama", 3)
    return str(pivot), [str(t) for t in targets]


def cfg(method: str, base: str | None, models: list[str], parameters: dict | None = None,
        per_model: list[dict] | None = None, **extra) -> dict:
    per_model = per_model or [{} for _ in models]
    data = {"merge_method": method, "models": [{"model": m, "parameters": p} if p else {"model": m}
                                               for m, p in zip(models, per_model, strict=True)],
            "dtype": "float32", **extra}
    if base:
        data["base_model"] = base
    if parameters:
        data["parameters"] = parameters
    return data


PARITY = [
    ("linear", False, {}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 1.3}]),
    ("linear", False, {"normalize": False}, [{"weight": 0.4}, {"weight": 0.4}, {"weight": 0.4}]),
    ("task_arithmetic", True, {"lambda": 0.8}, [{"weight": 0.7}, {"weight": -0.3}, {"weight": 0.5}]),
    ("task_arithmetic", True, {"normalize": True}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}]),
    ("ties", True, {"density": 0.5}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}]),
    ("ties", True, {"normalize": False, "lambda": 1.2}, [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.9},
                                                       {"weight": 0.8, "density": 1.0}]),
    ("sce", True, {}, None),
    ("sce", True, {"select_topk": 0.3, "variant": "mergekit"}, None),
    # mergekit's filters and gradients (mergekit/config.py evaluate_setting), per model and global.
    ("task_arithmetic", True, {}, [{"weight": [{"filter": "self_attn", "value": 0.25}, {"filter": "mlp", "value": [0.1, 0.9]},
                                               {"value": 0.6}]}, {"weight": [0.2, 1.0]}, {"weight": 0.5}]),
    ("ties", True, {"density": [{"filter": "mlp", "value": 0.3}, {"value": [0.9, 0.5]}]},
     [{"weight": 1.0}, {"weight": [0.5, 1.5]}, {"weight": {"filter": "embed", "value": 2.0}}]),
]


@pytest.mark.parametrize("method,with_base,parameters,per_model", PARITY)
def test_methods_both_implement_agree_with_mergekit(family, tmp_path, method, with_base, parameters, per_model):
    pivot, targets = family
    if per_model and method == "ties" and "weight" in per_model[2] and isinstance(per_model[2]["weight"], dict):
        # a filter that matches only some tensors falls back to the default; mergekit requires weight
        parameters = {**parameters, "weight": 1.0}
    data = cfg(method, pivot if with_base else None, targets, parameters, per_model)
    variant = data.get("parameters", {}).get("variant")
    mk_data = json.loads(json.dumps(data))
    if variant:  # `variant` is ours; mergekit's sce is our variant: mergekit
        del mk_data["parameters"]["variant"]
    assert_same(ours(data, tmp_path / "ours"), run_mergekit(mk_data, tmp_path / "mk"))


def test_sce_mergekit_fallback_reproduces_mergekit_on_small_deltas(tmp_path):
    """mergekit's sce falls back to equal coefficients when sum_j mean(delta_j^2) < 1e-6."""
    root = tmp_path / "small"
    pivot, targets = build_family(root, "llama", 2)
    p = load_dir(pivot)
    for j, scale in enumerate([1e-4, 5e-4]):  # shrink the fusion vectors: mean squares 1e-8 and 2.5e-7
        for f in targets[j].glob("*.safetensors"):
            t = load_file(str(f))
            save_file({k: p[k] + (t[k] - p[k]) / 0.02 * scale for k in t}, str(f), metadata={"format": "pt"})
    data = cfg("sce", str(pivot), [str(t) for t in targets], {"select_topk": 1.0})
    mk = run_mergekit(data, tmp_path / "mk")
    fallback = ours({**data, "parameters": {"select_topk": 1.0, "variant": "mergekit", "mergekit_fallback": True}},
                    tmp_path / "fallback")
    assert_same(fallback, mk)
    default = ours(data, tmp_path / "default")
    name = "model.layers.0.mlp.up_proj.weight"
    assert (default[name] - mk[name]).abs().max() > 1e-5  # off by default: energy-weighted coefficients


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_density_and_rescales_like_mergekit(family, tmp_path, method):
    """Masks differ (mergekit: torch's RNG, ours: a seeded hash), so compare what they must share: the kept
    fraction is the density, and each survivor is scaled by one factor per matrix (about 1 / density) that gives
    the rescaled fusion vector the L1 norm of the original."""
    pivot, targets = family
    data = cfg(method, pivot, [targets[0]], {"density": 0.3}, [{"weight": 1.0}])
    ours_out, mk_out = ours(data, tmp_path / "ours"), run_mergekit(data, tmp_path / "mk")
    base, target = load_dir(Path(pivot)), load_dir(Path(targets[0]))
    for name in ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]:
        delta = (target[name] - base[name]).double()
        for merged in (ours_out, mk_out):
            kept = merged[name].double() - base[name].double()
            fraction = (kept != 0).double().mean().item()
            sigma = (0.3 * 0.7 / kept.numel()) ** 0.5  # binomial: mergekit's masks come from torch's RNG
            assert fraction == pytest.approx(0.3, abs=5 * sigma), name
            assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5), name
            factor = kept[kept != 0] / delta[kept != 0]  # one factor per matrix, about 1 / kept fraction
            assert factor.std().item() < 1e-3 * factor.mean().item(), name
            assert factor.mean().item() == pytest.approx(1 / fraction, rel=0.2), name


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def author_configs(root: Path, pivot: str, targets: list[str]) -> dict[str, dict]:
    """Configs shaped like the FuseChat authors' merges: the base listed among the models, per-model weights
    (also on sce, which does not use them), bfloat16, mergekit's method names, linear without a base."""
    listed = [{"model": pivot}] + [{"model": t, "parameters": {"weight": 1.0}} for t in targets]
    return {
        "sce": {"models": listed, "merge_method": "sce", "base_model": pivot,
                "parameters": {"select_topk": 0.1}, "dtype": "bfloat16"},
        "dare": {"models": [{"model": pivot}] + [{"model": t, "parameters": {"weight": 0.33, "density": 0.5}} for t in targets],
                 "merge_method": "dare_linear", "base_model": pivot, "parameters": {"int8_mask": True},
                 "dtype": "bfloat16"},
        "linear": {"models": [{"model": t, "parameters": {"weight": 1.0}} for t in targets],
                   "merge_method": "linear", "dtype": "bfloat16"},
        "ta": {"models": [{"model": pivot}] + [{"model": t, "parameters": {"weight": 0.3}} for t in targets],
               "merge_method": "task_arithmetic", "base_model": pivot, "dtype": "bfloat16"},
    }


@pytest.mark.parametrize("kind", ["sce", "dare", "linear", "ta"])
def test_fusechat_author_style_configs_run_unchanged(family, tmp_path, kind, caplog):
    pivot, targets = family
    data = author_configs(tmp_path, pivot, targets)[kind]
    path = _write(tmp_path / f"fusechat_{kind}.yaml", data)
    with caplog.at_level(logging.WARNING, logger="logitfuse.merge"):
        run_merge(load_config(path), tmp_path / "ours")
    merged = load_dir(tmp_path / "ours")
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all() for t in merged.values())
    if kind == "sce":  # weight is mergekit's but sce does not use it: a warning naming it, per model
        assert "models[1].parameters.weight is not used by merge_method sce; ignored" in caplog.text
    if kind == "dare":
        assert "parameters.int8_mask is not used by merge_method dare_linear; ignored" in caplog.text
        return  # random masks: the statistics are compared above
    mk_data = {**data, "parameters": {**data.get("parameters", {}), "variant": "mergekit"}} if kind == "sce" else data
    mk_data = {**mk_data, "dtype": "float32", "out_dtype": "bfloat16"}  # mergekit computes in dtype
    if kind == "sce":
        mk_data["parameters"].pop("variant")
        ours_mk = ours({**data, "parameters": {"select_topk": 0.1, "variant": "mergekit"}}, tmp_path / "ours_mk")
    else:
        ours_mk = merged
    # Rounding to bfloat16 once (ours) or from a float32 computation (mergekit): at most one bf16 step apart.
    assert_same(ours_mk, run_mergekit(mk_data, tmp_path / "mk"), atol=1e-6, rtol=2**-7)


def test_methods_and_features_only_mergekit_has_run_through_mergekit(family, tmp_path):
    pivot, targets = family
    slerp = cfg("slerp", pivot, [pivot, targets[0]], {"t": [0.0, 0.5, 1.0]})
    run_merge(load_config(_write(tmp_path / "slerp.yaml", slerp)), tmp_path / "ours")
    assert_same(load_dir(tmp_path / "ours"), run_mergekit(slerp, tmp_path / "mk"), atol=0.0)
    # `--method slerp` on the command line has no flag for t: the error says where it goes
    flags = parse_config(cfg("slerp", pivot, [pivot, targets[0]]), "flags")
    with pytest.raises(MergeError, match=r"Missing required parameter t .*give slerp's parameters in a mergekit "
                                         r"YAML with --config"):
        run_merge(flags, tmp_path / "flags")
    assert not (tmp_path / "flags").exists()
    # A mergekit-only feature (slices) with one of our methods also goes to mergekit.
    sliced = {"merge_method": "linear", "dtype": "float32", "slices": [{"sources": [
        {"model": targets[0], "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": targets[1], "layer_range": [0, 2], "parameters": {"weight": 0.5}}]}]}
    run_merge(parse_config(sliced), tmp_path / "ours_sliced")
    assert_same(load_dir(tmp_path / "ours_sliced"), run_mergekit(sliced, tmp_path / "mk_sliced"), atol=0.0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_without_mergekit_the_error_names_the_extra(family, tmp_path, monkeypatch):
    import sys

    pivot, targets = family
    monkeypatch.setitem(sys.modules, "mergekit", None)  # import mergekit -> ImportError
    with pytest.raises(MergeError, match=r"^merge_method nuslerp \(a mergekit method\) is implemented by mergekit, not by "
                       r"logitfuse: install it with pip install 'logitfuse\[mergekit\]'$"):
        run_merge(parse_config(cfg("nuslerp", pivot, targets[:2], {"weight": 0.5})), tmp_path / "out")
    with pytest.raises(MergeError, match=r"^tokenizer_source \(a mergekit feature\) is implemented by mergekit"):
        run_merge(parse_config({**cfg("linear", None, targets[:2]), "tokenizer_source": "union"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_our_lists_of_mergekit_names_are_mergekits():
    from mergekit.merge_methods.registry import registered_methods

    theirs = {m.spec.name for m in registered_methods()}
    assert theirs == MERGEKIT_METHODS | (set(builtin_methods()) & theirs)
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "sce"} <= set(builtin_methods())
    assert {p.name for m in registered_methods() for p in m.spec.parameters} == MERGEKIT_PARAMETERS
