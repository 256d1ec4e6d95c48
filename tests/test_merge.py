"""Merge methods against float64 numpy references, streaming invariants, tied embeddings and bad input."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from datastore.errors import UserError
from merge import MergeError, parse_config, run_merge
from merge.config import load_config
from merge.stream import ParameterStream

SHAPES = {"model.embed_tokens.weight": (97, 33), "model.layers.0.mlp.up_proj.weight": (131, 33), "model.norm.weight": (33,)}
N_TARGETS = 3


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama", "vocab_size": 97}))
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(path / file)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A pivot and three targets, float32; targets share some sign structure so erasing matters."""
    root = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    pivot = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    common = {k: 0.05 * rng.standard_normal(s) for k, s in SHAPES.items()}
    targets = [
        {k: (pivot[k] + common[k] + (0.02 + 0.03 * j) * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        for j in range(N_TARGETS)
    ]
    dirs = [save_checkpoint(root / "pivot", {k: torch.from_numpy(v) for k, v in pivot.items()})]
    for j, t in enumerate(targets):
        dirs.append(save_checkpoint(root / f"target{j}", {k: torch.from_numpy(v) for k, v in t.items()}))
    return {"pivot": pivot, "targets": targets, "dirs": dirs}


def config(method, base, targets, parameters=None, per_model=None, **extra):
    per_model = per_model or [{} for _ in targets]
    return parse_config(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(t), "parameters": p} for t, p in zip(targets, per_model, strict=True)],
            "parameters": parameters or {},
            **extra,
        }
    )


# ---- float64 references, written from the definitions (docs/merge.md), independent of merge/ ----


def ref_linear(p, ts, weight, normalize=True):
    w = np.asarray(weight, dtype=np.float64)
    merged = sum(wj * t for wj, t in zip(w, ts, strict=True))
    return merged / w.sum() if normalize else merged


def ref_task_arithmetic(p, ts, weight, normalize=False):
    w = np.asarray(weight, dtype=np.float64)
    mixed = sum(wj * (t - p) for wj, t in zip(w, ts, strict=True))
    if normalize:
        mixed = mixed / (w.sum() if abs(w.sum()) > 0 else 1.0)
    return p + mixed


def top_k_mask(score, k):
    """Exactly k largest scores; ties go to the lowest flat index."""
    flat = score.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(score.shape)


def erase_and_mix(d, w, normalize=True):
    majority = np.where(d.sum(0) >= 0, 1.0, -1.0)
    keep = np.sign(d) == majority
    ww = w.reshape((-1,) + (1,) * (d.ndim - 1)) * keep
    mixed = (d * ww).sum(0)
    if normalize:
        div = ww.sum(0)
        mixed = mixed / np.where(div == 0, 1.0, div)
    return mixed


def ref_ties(p, ts, weight, density, normalize=True):
    trimmed = []
    for t, dens in zip(ts, density, strict=True):
        d = t - p
        if dens < 1:
            d = d * top_k_mask(np.abs(d), int(dens * d.size))
        trimmed.append(d)
    d = np.stack(trimmed)
    w = np.asarray(weight, dtype=np.float64)
    wd = d * w.reshape((-1,) + (1,) * p.ndim)
    majority = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    keep = np.sign(wd) == majority
    mixed = (wd * keep).sum(0)
    if normalize:
        div = (w.reshape((-1,) + (1,) * p.ndim) * keep).sum(0)
        mixed = mixed / np.where(div == 0, 1.0, div)
    return p + mixed


def splitmix_uniform(seed, name, j, n):
    key = int.from_bytes(hashlib.blake2b(f"{seed}/{name}/{j}".encode(), digest_size=8).digest(), "little")
    out = np.empty(n)
    mask64 = (1 << 64) - 1
    for i in range(n):
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        z ^= z >> 31
        out[i] = (z >> 11) / 2.0**53
    return out


def ref_dare(p, ts, weight, density, seed, name, rescale=True):
    mixed = np.zeros_like(p)
    for j, (t, wj, dens) in enumerate(zip(ts, weight, density, strict=True)):
        d = t - p
        if dens < 1:
            survive = (splitmix_uniform(seed, name, j, d.size) < dens).reshape(d.shape)
            d = d * survive / (dens if rescale else 1.0)
        mixed = mixed + wj * d
    return p + mixed


def ref_varm(p, ts):
    d = np.stack([t - p for t in ts])
    msv = (d**2).reshape(len(ts), -1).mean(1)
    w = msv / msv.sum() if msv.sum() > 0 else np.full(len(ts), 1 / len(ts))
    return p + (d * w.reshape((-1,) + (1,) * p.ndim)).sum(0)


def ref_sce(p, ts, select_topk=1.0, variant="fusechat", normalize=True):
    d = np.stack([t - p for t in ts])
    selected = d
    if select_topk < 1:
        var = d.var(0)  # population variance across the fusion vectors
        k = int(select_topk * np.count_nonzero(var))
        selected = d * top_k_mask(var, k)
    energy = (selected**2).reshape(len(ts), -1).sum(1)
    eta = energy / energy.sum() if energy.sum() > 0 else np.full(len(ts), 1 / len(ts))
    return p + erase_and_mix(selected if variant == "mergekit" else d, eta, normalize)


CASES = [
    ("linear", {}, None, lambda p, ts, n: ref_linear(p, ts, [1, 1, 1])),
    ("linear", {}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 1.3}], lambda p, ts, n: ref_linear(p, ts, [0.2, 0.5, 1.3])),
    ("linear", {"normalize": False, "weight": 0.4}, None, lambda p, ts, n: ref_linear(p, ts, [0.4] * 3, False)),
    ("task_arithmetic", {"weight": 0.7}, None, lambda p, ts, n: ref_task_arithmetic(p, ts, [0.7] * 3)),
    ("task_arithmetic", {"normalize": True}, [{"weight": 1.0}, {"weight": -0.5}, {"weight": 2.0}],
     lambda p, ts, n: ref_task_arithmetic(p, ts, [1.0, -0.5, 2.0], True)),
    ("ties", {"density": 0.3}, None, lambda p, ts, n: ref_ties(p, ts, [1] * 3, [0.3] * 3)),
    ("ties", {"normalize": False}, [{"weight": 1.0, "density": 0.2}, {"weight": 0.5, "density": 1.0}, {"weight": 2.0, "density": 0.7}],
     lambda p, ts, n: ref_ties(p, ts, [1.0, 0.5, 2.0], [0.2, 1.0, 0.7], False)),
    ("dare", {"density": 0.4, "seed": 7}, None, lambda p, ts, n: ref_dare(p, ts, [1] * 3, [0.4] * 3, 7, n)),
    ("dare", {"seed": 1, "rescale": False}, [{"weight": 0.3, "density": 0.5}, {"weight": 0.3, "density": 0.9}, {"weight": 0.4, "density": 1.0}],
     lambda p, ts, n: ref_dare(p, ts, [0.3, 0.3, 0.4], [0.5, 0.9, 1.0], 1, n, rescale=False)),
    ("varm", {}, None, lambda p, ts, n: ref_varm(p, ts)),
    ("sce", {}, None, lambda p, ts, n: ref_sce(p, ts)),
    ("sce", {"select_topk": 0.1}, None, lambda p, ts, n: ref_sce(p, ts, 0.1)),
    ("sce", {"select_topk": 0.1, "variant": "mergekit"}, None, lambda p, ts, n: ref_sce(p, ts, 0.1, "mergekit")),
    ("sce", {"select_topk": 0.5, "normalize": False}, None, lambda p, ts, n: ref_sce(p, ts, 0.5, normalize=False)),
]


@pytest.mark.parametrize("method,parameters,per_model,reference", CASES)
def test_method_matches_float64_reference(models, tmp_path, method, parameters, per_model, reference):
    pivot_dir, *target_dirs = models["dirs"]
    # 1024 elements per chunk: the matrices span 4-5 chunks, and chunk edges fall mid-row.
    run_merge(config(method, pivot_dir, target_dirs, parameters, per_model), tmp_path / "out", chunk_elements=1024)
    merged = load_dir(tmp_path / "out")
    for name in SHAPES:
        p = models["pivot"][name].astype(np.float64)
        ts = [t[name].astype(np.float64) for t in models["targets"]]
        expected = reference(p, ts, name).astype(np.float32)
        assert merged[name].dtype == torch.float32
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=f"{method} {name}")


@pytest.mark.parametrize("method,parameters", [("sce", {"select_topk": 0.1}), ("ties", {"density": 0.25}), ("dare", {"density": 0.5})])
def test_chunking_and_in_memory_give_bitwise_identical_results(models, tmp_path, method, parameters):
    pivot_dir, *target_dirs = models["dirs"]
    runs = [(1024, False), (3000, False), (10**9, False), (1, True)]
    outs = []
    for i, (chunk, in_memory) in enumerate(runs):
        run_merge(config(method, pivot_dir, target_dirs, parameters), tmp_path / str(i), chunk_elements=chunk, in_memory=in_memory)
        outs.append(load_dir(tmp_path / str(i)))
    for out in outs[1:]:
        for name in SHAPES:
            assert torch.equal(out[name], outs[0][name])


METHOD_PARAMS = [
    ("sce", {"select_topk": 0.1}),
    ("sce", {"select_topk": 0.1, "variant": "mergekit"}),
    ("varm", {}),
    ("linear", {"weight": 0.3}),
    ("task_arithmetic", {"weight": 0.6}),
    ("ties", {"density": 0.5}),
    ("dare", {"density": 0.5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,parameters", METHOD_PARAMS)
def test_merging_copies_of_the_base_returns_the_base_exactly(tmp_path, method, parameters, dtype):
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    dirs = [save_checkpoint(tmp_path / f"m{i}", base) for i in range(4)]
    run_merge(config(method, dirs[0], dirs[1:], parameters), tmp_path / "out", chunk_elements=1024)
    merged = load_dir(tmp_path / "out")
    for name, tensor in base.items():
        assert merged[name].dtype == dtype
        assert torch.equal(merged[name], tensor), name


def test_sce_variants_agree_when_everything_is_selected(models, tmp_path):
    pivot_dir, *target_dirs = models["dirs"]
    outs = []
    for variant in ("fusechat", "mergekit"):
        run_merge(config("sce", pivot_dir, target_dirs, {"select_topk": 1.0, "variant": variant}), tmp_path / variant)
        outs.append(load_dir(tmp_path / variant))
    for name in SHAPES:
        assert torch.equal(outs[0][name], outs[1][name])


def test_sce_mergekit_variant_keeps_the_pivot_outside_the_selection(models, tmp_path):
    pivot_dir, *target_dirs = models["dirs"]
    run_merge(config("sce", pivot_dir, target_dirs, {"select_topk": 0.2, "variant": "mergekit"}), tmp_path / "mk")
    run_merge(config("sce", pivot_dir, target_dirs, {"select_topk": 0.2}), tmp_path / "fc")
    name = "model.layers.0.mlp.up_proj.weight"
    pivot = torch.from_numpy(models["pivot"][name])
    unchanged_mk = (load_dir(tmp_path / "mk")[name] == pivot).float().mean().item()
    unchanged_fc = (load_dir(tmp_path / "fc")[name] == pivot).float().mean().item()
    assert unchanged_mk == pytest.approx(0.8, abs=0.01)
    assert unchanged_fc < 0.05


@pytest.mark.parametrize("chunk", [1, 3, 5, 100])
def test_select_top_takes_exactly_k_with_ties_to_the_lowest_index(chunk):
    scores = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0, 0.0, 3.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    param = ParameterStream(
        "x", (10,), lambda s, e: torch.zeros(e - s), [lambda s, e: scores[s:e]], torch.float64, chunk, block=1
    )
    # 8 non-zero scores; 0.5 of them = 4: the 3.0 and the first three 2.0s (indices 1, 3, 4).
    selection = param.select_top(lambda c: c.deltas[0], 0.5, among="nonzero")
    mask = torch.cat([selection.mask(c) for c in param.chunks()])
    assert mask.nonzero().flatten().tolist() == [1, 3, 4, 6]
    everything = param.select_top(lambda c: c.deltas[0], 1.0, among="nonzero")
    assert torch.cat([everything.mask(c) for c in param.chunks()]).sum() == 8
    nothing = param.select_top(lambda c: c.deltas[0], 0.09)  # int(0.09 * 10) = 0
    assert not torch.cat([nothing.mask(c) for c in param.chunks()]).any()
    one = param.select_top(lambda c: c.deltas[0], 0.1)  # k = 1 of all 10 elements
    assert torch.cat([one.mask(c) for c in param.chunks()]).nonzero().flatten().tolist() == [6]


def test_dare_is_seeded(models, tmp_path):
    pivot_dir, *target_dirs = models["dirs"]
    outs = {}
    for run, seed in [("a", 1), ("b", 1), ("c", 2)]:
        run_merge(config("dare", pivot_dir, target_dirs[:1], {"density": 0.3, "seed": seed, "rescale": False}), tmp_path / run)
        outs[run] = load_dir(tmp_path / run)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs["a"][name], outs["b"][name])
    assert not torch.equal(outs["a"][name], outs["c"][name])
    kept = (outs["a"][name] != torch.from_numpy(models["pivot"][name])).float().mean().item()
    assert kept == pytest.approx(0.3, abs=0.08)


def test_output_has_index_shards_and_the_base_side_files(models, tmp_path):
    pivot_dir, *target_dirs = models["dirs"]
    (pivot_dir / "tokenizer.json").write_text('{"fake": true}')
    try:
        run_merge(config("sce", pivot_dir, target_dirs, dtype="bfloat16"), tmp_path / "out", max_shard_size=7000)
    finally:
        (pivot_dir / "tokenizer.json").unlink()
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    merged = load_dir(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in merged.values())
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(out.glob("*.tmp"))


def test_tied_embeddings(tmp_path):
    g = torch.Generator().manual_seed(2)
    body = {"model.embed_tokens.weight": torch.randn(11, 5, generator=g), "model.norm.weight": torch.randn(5, generator=g)}
    tied = {"model_type": "qwen2", "tie_word_embeddings": True}
    untied = {"model_type": "qwen2", "tie_word_embeddings": False}
    # The pivot ties (no lm_head); a target whose saver wrote the head anyway is accepted, the head ignored.
    pivot = save_checkpoint(tmp_path / "pivot", body, tied)
    target = save_checkpoint(
        tmp_path / "t", {**{k: v + 1 for k, v in body.items()}, "lm_head.weight": body["model.embed_tokens.weight"] + 1}, tied
    )
    run_merge(config("linear", pivot, [target]), tmp_path / "out")
    merged = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in merged
    assert torch.allclose(merged["model.embed_tokens.weight"], body["model.embed_tokens.weight"] + 1)
    # A tying target that lacks lm_head.weight supplies its embedding in its place.
    pivot2 = save_checkpoint(tmp_path / "pivot2", {**body, "lm_head.weight": body["model.embed_tokens.weight"]}, tied)
    run_merge(config("task_arithmetic", pivot2, [target]), tmp_path / "out2")
    merged = load_dir(tmp_path / "out2")
    assert torch.allclose(merged["lm_head.weight"], body["model.embed_tokens.weight"] + 1)
    # Tying and non-tying models cannot be merged.
    other = save_checkpoint(tmp_path / "untied", {**body, "lm_head.weight": body["model.embed_tokens.weight"]}, untied)
    with pytest.raises(MergeError, match="tie_word_embeddings mismatch"):
        run_merge(config("linear", pivot, [other]), tmp_path / "out3")


def _bad_inputs(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pivot = save_checkpoint(tmp_path / "pivot", base)
    fine = save_checkpoint(tmp_path / "fine", base)
    missing = save_checkpoint(tmp_path / "missing", {k: v for k, v in base.items() if k != "model.norm.weight"})
    extra = save_checkpoint(tmp_path / "extra", {**base, "model.extra.weight": torch.zeros(2)})
    shape = save_checkpoint(tmp_path / "shape", {**base, "model.norm.weight": torch.zeros(32)})
    vocab = save_checkpoint(tmp_path / "vocab", {**base, "model.embed_tokens.weight": torch.zeros(98, 33)})
    vocab_cfg = save_checkpoint(tmp_path / "vocab_cfg", base, {"model_type": "llama", "vocab_size": 32})
    dtype = save_checkpoint(tmp_path / "dtype", {k: v.to(torch.bfloat16) for k, v in base.items()})
    (tmp_path / "empty").mkdir()
    return pivot, fine, {"missing": missing, "extra": extra, "shape": shape, "vocab": vocab, "vocab_cfg": vocab_cfg,
                         "dtype": dtype, "empty": tmp_path / "empty", "nowhere": tmp_path / "nowhere"}


@pytest.mark.parametrize(
    "bad,message",
    [
        ("missing", r"lacks 1 tensor the base has, e.g. model.norm.weight"),
        ("extra", r"has 1 tensor the base lacks, e.g. model.extra.weight"),
        ("shape", r"shape mismatch for model.norm.weight: .* has \[32\], the base has \[33\]"),
        ("vocab", r"vocabulary mismatch: .* has 98 rows in model.embed_tokens.weight, the base has 97"),
        ("vocab_cfg", r"vocabulary mismatch: .* has vocab_size=32, the base has 97"),
        ("dtype", r"mixed dtypes: .* stores .* as BF16, the base as F32"),
        ("empty", r"no safetensors weights \(expected model.safetensors or model.safetensors.index.json\)"),
        ("nowhere", r"no such model directory"),
    ],
)
def test_bad_checkpoints_raise_one_line_errors(tmp_path, bad, message):
    pivot, fine, bads = _bad_inputs(tmp_path)
    with pytest.raises(MergeError, match=message) as err:
        run_merge(config("sce", pivot, [fine, bads[bad]]), tmp_path / "out")
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "method,parameters,per_model,message",
    [
        ("slerpp", {}, None, r"unknown merge_method 'slerpp': did you mean 'slerp'\? expected one of dare, dare_linear, dare_ties, linear, sce, task_arithmetic, ties, varm \(ours\)"),
        ("sce", {"select_topk": 1.5}, None, r"bad parameters of merge_method sce: select_topk: .*less than or equal to 1"),
        ("sce", {"selct_topk": 0.5}, None, r"parameters: unknown parameter 'selct_topk' for merge_method sce \(did you mean 'select_topk'\?\)"),
        ("sce", {"xyz": 0.5}, None, r"unknown parameter 'xyz' for merge_method sce \(accepted: select_topk, variant, normalize, mergekit_fallback\)"),
        ("sce", {"variant": "paper"}, None, r"variant: Input should be 'fusechat' or 'mergekit'"),
        ("ties", {}, [{"density": 0}], r"bad parameters of models\[0\] \(ties\): density: .*greater than 0"),
        ("linear", {"weight": 0.0}, None, r"weights of .* sum to 0"),
        ("ties", {"density": [0.5, "x"]}, None, r"bad parameters of models\[0\] \(ties\): density: .*\[tensor model.layers.0.mlp"),
        ("ties", {"density": {"filter": "mlp"}}, None, r"parameters.density: a filter is \{filter: NAME, value: VALUE\}"),
    ],
)
def test_bad_parameters_raise_one_line_errors(models, tmp_path, method, parameters, per_model, message):
    pivot_dir, *target_dirs = models["dirs"]
    per_model = per_model and per_model + [{}] * (len(target_dirs) - len(per_model))
    with pytest.raises(MergeError, match=message):
        run_merge(config(method, pivot_dir, target_dirs, parameters, per_model), tmp_path / "out")


def test_parameter_errors_name_the_config_file(models, tmp_path):
    """Parameters are checked per tensor once the checkpoints are open: the error still names the file."""
    pivot_dir, *target_dirs = models["dirs"]
    path = tmp_path / "merge.yaml"
    for parameters, message in [({"selct_topk": 0.5}, r"parameters: unknown parameter 'selct_topk'"),
                                ({}, r"bad parameters of models\[0\] \(ties\): density")]:
        path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(pivot_dir), "parameters": parameters,
                                        "models": [{"model": str(t), "parameters": {"density": 0}} for t in target_dirs]}))
        with pytest.raises(MergeError, match=rf"^{re.escape(str(path))}: {message}") as err:
            run_merge(load_config(path), tmp_path / "out")
        assert "\n" not in str(err.value)


def test_bad_config_and_output_directory(models, tmp_path):
    pivot_dir, *target_dirs = models["dirs"]
    with pytest.raises(MergeError, match=r"models: List should have at least 1 item"):
        parse_config({"merge_method": "sce", "base_model": str(pivot_dir), "models": []})
    with pytest.raises(MergeError, match=r"^config: give exactly one of models, slices or modules \(got models, slices\)$"):
        parse_config({"merge_method": "sce", "base_model": "x", "models": [{"model": "y"}], "slices": []})
    with pytest.raises(MergeError, match=r"^config: unknown key 'slicez' \(did you mean 'slices'\?\)$"):
        parse_config({"merge_method": "sce", "base_model": "x", "models": [{"model": "y"}], "slicez": []})
    with pytest.raises(MergeError, match=r"^config: models\[0\]: unknown key 'paramters' \(did you mean 'parameters'\?\)$"):
        parse_config({"merge_method": "sce", "base_model": "x", "models": [{"model": "y", "paramters": {}}]})
    with pytest.raises(MergeError, match=r"merge_method sce needs base_model"):
        run_merge(parse_config({"merge_method": "sce", "models": [{"model": str(pivot_dir)}]}), tmp_path / "out")
    with pytest.raises(MergeError, match=r"needs at least one model other than base_model"):
        run_merge(config("sce", pivot_dir, [pivot_dir]), tmp_path / "out")
    with pytest.raises(MergeError, match=r"is one of the input models"):
        run_merge(config("sce", pivot_dir, target_dirs), target_dirs[0])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(MergeError, match=r"exists and is not an empty directory"):
        run_merge(config("sce", pivot_dir, target_dirs), tmp_path / "busy")


def test_base_listed_among_models_is_skipped_for_pivot_methods(models, tmp_path):
    pivot_dir, *target_dirs = models["dirs"]
    run_merge(config("sce", pivot_dir, [pivot_dir, *target_dirs], {"select_topk": 0.3}), tmp_path / "a")
    run_merge(config("sce", pivot_dir, target_dirs, {"select_topk": 0.3}), tmp_path / "b")
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in SHAPES)


# ---- issue 11: merge inputs and outputs ----


def _raw_safetensors(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    import struct

    path.mkdir(parents=True)
    blob = json.dumps(header).encode()
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 97}))
    return path


@pytest.mark.parametrize(
    "header,data,length,message",
    [
        # data_offsets [0, 16] for a [4, 8] float32 tensor (128 bytes): values would come from the next tensor
        ({"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 16]}}, bytes(128), None,
         "invalid shape, data type, or offset for tensor"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), None, "invalid value: integer `-8`"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), 2**62, "header too large"),
        ([1, 2, 3], b"", None, "invalid type: sequence"),
        ({"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "missing field `dtype`"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), None, "incomplete metadata"),
    ],
    ids=["lying-offsets", "negative-offset", "huge-header", "list-header", "no-dtype", "truncated"],
)
def test_bad_safetensors_headers_are_one_line_errors(tmp_path, header, data, length, message):
    from typer.testing import CliRunner

    from tests.test_merge_cli import make_app

    good = save_checkpoint(tmp_path / "good", {"w": torch.zeros(4, 8)})
    bad = _raw_safetensors(tmp_path / "bad", header, data, length)
    with pytest.raises(MergeError, match=f"bad/model.safetensors: invalid safetensors file .*{message}"):
        run_merge(config("task_arithmetic", good, [bad]), tmp_path / "out")
    result = CliRunner().invoke(make_app(), ["merge", "--method", "linear", "--models", str(good), str(bad),
                                             "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_nonfinite_merge_output_fails_naming_the_tensor(tmp_path):
    # float16 task arithmetic with weight 3: 30,000 + 3 * 30,000 = 120,000 > 65,504 (fp16 max) -> inf
    base = {"model.norm.weight": torch.full((8,), 30000.0, dtype=torch.float16),
            "model.layers.0.mlp.up_proj.weight": torch.ones(4, 4, dtype=torch.float16)}
    target = {"model.norm.weight": torch.full((8,), 60000.0, dtype=torch.float16),
              "model.layers.0.mlp.up_proj.weight": torch.ones(4, 4, dtype=torch.float16)}
    pivot, t = save_checkpoint(tmp_path / "p", base), save_checkpoint(tmp_path / "t", target)
    with pytest.raises(MergeError, match=r"merged tensor model.norm.weight has 8 non-finite values in float16 "
                       r"\(first: element 0 = inf\).*--allow-nonfinite"):
        run_merge(config("task_arithmetic", pivot, [t], {"weight": 3.0}), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    run_merge(config("task_arithmetic", pivot, [t], {"weight": 3.0}), tmp_path / "out", allow_nonfinite=True)
    assert torch.isinf(load_dir(tmp_path / "out")["model.norm.weight"]).all()
    run_merge(config("task_arithmetic", pivot, [t], {"weight": 3.0}, dtype="float32"), tmp_path / "out32")
    assert torch.equal(load_dir(tmp_path / "out32")["model.norm.weight"], torch.full((8,), 120000.0))


def test_untied_config_without_a_head_is_an_error(tmp_path):
    body = {"model.embed_tokens.weight": torch.randn(11, 5), "model.norm.weight": torch.randn(5)}
    untied = {"model_type": "llama", "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
    default_untied = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}  # LlamaConfig unties by default
    for name, cfg in [("explicit", untied), ("default", default_untied)]:
        pivot = save_checkpoint(tmp_path / f"p_{name}", body, cfg)
        target = save_checkpoint(tmp_path / f"t_{name}", body, cfg)
        with pytest.raises(MergeError, match=r"unties the output head \(tie_word_embeddings false\) but the weights have "
                           r"no lm_head.weight"):
            run_merge(config("linear", pivot, [target]), tmp_path / f"out_{name}")
    tied = save_checkpoint(tmp_path / "tied", body, {**untied, "tie_word_embeddings": True})
    run_merge(config("linear", tied, [tied]), tmp_path / "out_tied")


def test_an_interrupted_merge_leaves_nothing_that_blocks_the_rerun(models, tmp_path, monkeypatch):
    import os

    from merge import safetensors_io

    pivot_dir, *target_dirs = models["dirs"]
    out = tmp_path / "out"
    real_write, calls = safetensors_io.ShardedWriter.write, []

    def interrupted(self, name, values):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C mid-write
        real_write(self, name, values)

    monkeypatch.setattr(safetensors_io.ShardedWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_merge(config("sce", pivot_dir, target_dirs), out, chunk_elements=1024)
    assert not out.exists() and os.listdir(tmp_path) == []  # no *.tmp, no stage
    monkeypatch.setattr(safetensors_io.ShardedWriter, "write", real_write)
    # A stage left by a killed process (SIGKILL runs no cleanup) is removed by the next run.
    stale = tmp_path / ".out.staging-999999999"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors.tmp").write_bytes(b"x")
    run_merge(config("sce", pivot_dir, target_dirs), out, chunk_elements=1024)
    assert sorted(os.listdir(tmp_path)) == ["out"] and not list(out.glob("*.tmp"))
    # --overwrite keeps the old output until the new one is complete.
    before = (out / "model-00001-of-00001.safetensors").read_bytes()
    monkeypatch.setattr(safetensors_io.ShardedWriter, "write", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_merge(config("linear", pivot_dir, target_dirs), out, overwrite=True)
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == before
    monkeypatch.setattr(safetensors_io.ShardedWriter, "write", real_write)
    run_merge(config("linear", pivot_dir, target_dirs), out, overwrite=True)
    assert (out / "model-00001-of-00001.safetensors").read_bytes() != before
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
