"""Streaming merge vs loading every model fully: wall time and peak RSS, each in its own subprocess.

    python bench/bench_merge.py                      # 5 targets + pivot, Qwen2-0.5B shape, bf16, SCE tau=0.1
    python bench/bench_merge.py --targets 2 --layers 4 --method linear   # a quicker look

Builds a pivot and N targets (pivot + small noise) of a Qwen2-0.5B-shaped config with random weights, saved
as sharded bf16 safetensors, then runs the same merge twice: `run_merge` streaming chunk by chunk, and
`run_merge(in_memory=True)`, which reads every model fully first and merges each matrix in one piece. Peak
RSS comes from os.wait4 on each child (its own ru_maxrss); the parent never imports torch, because Linux
starts a child's ru_maxrss at its parent's RSS when it forks. The constant is the peak RSS of a child that
imports everything and merges a model whose tensors are one or two chunks (1M elements) each: the
interpreter, torch and the chunk working set. The outputs of both ways are checked to be
byte-identical. Everything under the work directory is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN2_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
)


def build_models(work: Path, n_targets: int, layers: int, vocab: int, hidden: int | None = None) -> int:
    """Writes pivot/ and target{j}/ as sharded bf16 safetensors; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**QWEN2_05B, "num_hidden_layers": layers, "vocab_size": vocab, "dtype": "bfloat16"}
    if hidden:
        spec.update(hidden_size=hidden, intermediate_size=hidden * 2, num_attention_heads=2, num_key_value_heads=1)
    cfg = AutoConfig.for_model(**spec)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied
    g = torch.Generator().manual_seed(0)
    pivot = {}
    for name, shape in shapes.items():
        pivot[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    for j in range(-1, n_targets):
        out = work / ("pivot" if j < 0 else f"target{j}")
        out.mkdir(parents=True)
        cfg.save_pretrained(out)
        shard, size, weight_map, n = {}, 0, {}, 0
        names = list(shapes)
        for i, name in enumerate(names):
            t = pivot[name] if j < 0 else (pivot[name].float() + 0.002 * torch.randn(shapes[name], generator=g)).bfloat16()
            shard[name] = t
            size += t.numel() * 2
            if size >= 500e6 or i == len(names) - 1:
                n += 1
                file = f"model-{n:05d}.safetensors"
                save_file(shard, str(out / file))
                weight_map.update({k: file for k in shard})
                shard, size = {}, 0
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        print(f"  wrote {out.name}: {n} shards", file=sys.stderr, flush=True)
    return max(t.numel() * 2 for t in pivot.values())


def child(mode: str, work: Path, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from merge import parse_config, run_merge

    family = work / ("tiny" if mode == "constant" else "")
    params = {"select_topk": args.select_topk} if args.method == "sce" else {}
    cfg = parse_config(
        {
            "merge_method": args.method,
            "base_model": str(family / "pivot"),
            "models": [{"model": str(family / f"target{j}")} for j in range(args.targets)],
            "parameters": params,
        }
    )
    t0 = time.perf_counter()
    run_merge(cfg, work / f"out_{mode}", in_memory=mode == "memory")
    print(json.dumps({"merge_s": time.perf_counter() - t0}))


def measure(mode: str, work: Path, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, "--workdir", str(work), *argv],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} child failed with status {os.waitstatus_to_exitcode(status)}")
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, **json.loads(out.strip().splitlines()[-1])}


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=5)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--method", default="sce")
    ap.add_argument("--select-topk", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (same for both ways)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new folder under $TMPDIR")
    ap.add_argument("--keep", action="store_true", help="keep the multi-GB models and outputs")
    ap.add_argument("--child", choices=["build", "stream", "memory", "constant"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":
        largest = build_models(args.workdir, args.targets, args.layers, args.vocab)
        build_models(args.workdir / "tiny", args.targets, 1, 1024, hidden=1024)
        print(json.dumps({"largest": largest}))
        return
    if args.child:
        return child(args.child, args.workdir, args)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    work.mkdir(parents=True, exist_ok=True)
    argv = ["--targets", str(args.targets), "--method", args.method, "--select-topk", str(args.select_topk),
            "--threads", str(args.threads)]
    try:
        print(f"building pivot + {args.targets} targets in {work} (Qwen2-0.5B shape, {args.layers} layers, bf16)")
        t0 = time.perf_counter()
        largest = measure("build", work, argv + ["--layers", str(args.layers), "--vocab", str(args.vocab)])["largest"]
        print(f"  built in {time.perf_counter() - t0:.0f}s; disk: {shutil.disk_usage(work).free / 1e9:.0f} GB free")
        constant = measure("constant", work, argv)
        memory = measure("memory", work, argv)
        stream = measure("stream", work, argv)
        same = digest(work / "out_stream") == digest(work / "out_memory")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    budget = 3 * largest + constant["peak_rss"]
    print(f"\nmerge: {args.method}" + (f" select_topk={args.select_topk}" if args.method == "sce" else "")
          + f", pivot + {args.targets} targets, bf16, {args.threads} torch thread(s)")
    print(f"largest tensor: {largest / gb:.3f} GB; constant (imports + chunk working set): {constant['peak_rss'] / gb:.3f} GB")
    print(f"{'':12}{'wall s':>9}{'merge s':>9}{'peak RSS GB':>13}")
    for name, r in (("in-memory", memory), ("streaming", stream)):
        print(f"{name:12}{r['wall_s']:9.1f}{r['merge_s']:9.1f}{r['peak_rss'] / gb:13.3f}")
    print(f"streaming / in-memory: wall x{stream['wall_s'] / memory['wall_s']:.2f}, "
          f"peak RSS x{stream['peak_rss'] / memory['peak_rss']:.3f}")
    print(f"goal: streaming peak <= 3 x largest + constant = {budget / gb:.3f} GB: "
          f"{'met' if stream['peak_rss'] <= budget else 'MISSED'} ({stream['peak_rss'] / gb:.3f} GB); "
          f"no slower: {'met' if stream['wall_s'] <= memory['wall_s'] else 'MISSED'}")
    print(f"outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
