"""Extraction on Ray against plain `extract`, side by side in one run on the same model and chats:

  extract         `teacher_server.extract.extract` in this process (HF backend, one torch thread), model
                  already loaded;
  ray, 1 replica  `RayPool.run` on a local cluster started here: tokenisation as Ray tasks, one replica
                  (HF backend, one thread) claiming ranges, scoring, committing shards; replicas already
                  started (their start-up is reported on its own line);
  ray, 2 replicas the same with two replicas writing into the same dataset concurrently.

Each variant writes the same logits dataset into a fresh local store. Times are wall seconds of the job
(tokenise, score, encode, commit, mark complete); throughput is real tokens per wall second. On a machine
other jobs share, wall time depends on how the kernel splits the cores among everyone (two replicas get
two processes' share), so the bench also counts CPU seconds: this process plus every process of the Ray
cluster (all its children: raylet, GCS, workers, replicas), so Ray's overhead is what the whole job cost
in CPU against plain `extract`'s own CPU time. The model is
the Mistral-shaped random one of bench_extract.py (4 layers, hidden 256, untied 32k head; speed does not
depend on what it knows) saved to a directory, since replicas load it from there. On a 2-core machine two
replicas cannot do better than the two cores allow, and the driver, Ray's own processes and whatever
else runs on the machine take their share: the 1-vs-2 ratio measures the cores, not Ray.

    python bench/bench_ray.py [--samples 160] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")) if p)


def _tree_cpu() -> dict[int, float]:
    """User + system CPU seconds of this process and each of its descendants (the local Ray cluster)."""
    import psutil

    out = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=1)
    # logical slots, not cores: both pools stay up (idle replicas use no CPU) so the variants interleave
    ap.add_argument("--cpus", type=float, default=4, help="logical CPUs of the local Ray cluster")
    args = ap.parse_args()

    import ray
    import torch

    from clients.corpus import spread_samples, write_jsonl
    from clients.tiny_models import build_model, load_tokenizer
    from datastore.chat import load_dataset
    from teacher_server.backends.hf import HFBackend
    from teacher_server.config import RayConfig, TeacherConfig
    from teacher_server.extract import ExtractSettings, extract
    from teacher_server.ray_engine import RayPool

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    tok = load_tokenizer("spm32k")
    model = build_model("mistral", tok, seed=0, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model_dir = tmp / "bench-mistral"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = load_dataset(write_jsonl(spread_samples(args.samples, seed=3), tmp / "spread.jsonl"))
    settings = ExtractSettings(k=10, chat_template="inst", max_length=2048, reuse=False)

    plain = HFBackend(model_dir, device="cpu")

    def run_plain() -> tuple[float, float, int]:
        store = tmp / f"store-{time.perf_counter_ns()}"
        t, c = time.perf_counter(), time.process_time()
        res = extract(plain, data, str(store), "bench", settings, progress=False)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        shutil.rmtree(store)
        return dt, dc, res.tokens

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=512 << 20)
    cluster_s = time.perf_counter() - t
    address = ray.get_runtime_context().gcs_address
    pools, startup = {}, {}
    for n in (1, 2):
        options = RayConfig(address=address, replicas=n, num_cpus=1.0, tokenize_cpus=0.5)
        spec = TeacherConfig(name="bench", model=str(model_dir), max_k=10, max_length=2048, engine="ray",
                             ray=options)
        t = time.perf_counter()
        pools[n] = RayPool(spec, options)
        pools[n].pids()
        startup[n] = time.perf_counter() - t

    def run_ray(n: int) -> tuple[float, float, int]:
        store = tmp / f"store-{time.perf_counter_ns()}"
        before = _tree_cpu()
        t = time.perf_counter()
        res = pools[n].run(data, str(store), settings, progress=False)
        dt = time.perf_counter() - t
        after = _tree_cpu()
        shutil.rmtree(store)
        # CPU of the processes alive at both ends (a worker started or ended meanwhile is not counted)
        return dt, sum(after[p] - before[p] for p in after.keys() & before.keys()), res.tokens

    variants = {"extract": run_plain, "ray, 1 replica": lambda: run_ray(1), "ray, 2 replicas": lambda: run_ray(2)}
    best: dict[str, tuple[float, float, int]] = {}
    for _ in range(args.repeats):  # interleaved: each repeat runs every variant once
        for name, fn in variants.items():
            dt, dc, tokens = fn()
            prev = best.get(name, (float("inf"), float("inf"), tokens))
            best[name] = (min(dt, prev[0]), min(dc, prev[1]), tokens)
    for p in pools.values():
        p.close()
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    tokens = best["extract"][2]
    print(f"{len(data.samples)} chats, {tokens} tokens; load average {os.getloadavg()[0]:.1f}; "
          f"best of {args.repeats}")
    print(f"start-up: local cluster {cluster_s:.1f}s; 1 replica {startup[1]:.1f}s; 2 replicas {startup[2]:.1f}s "
          f"(model loads; paid once per pool, not per job)")
    print("| variant | wall s | tokens / wall s | vs extract | CPU s (all processes) | tokens / CPU s | vs extract |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base, base_cpu = best["extract"][0], best["extract"][1]
    for name, (dt, dc, tok_count) in best.items():
        assert tok_count == tokens
        print(f"| {name} | {dt:.1f} | {tokens / dt:,.0f} | {base / dt:.2f}x | {dc:.1f} | {tokens / dc:,.0f} | "
              f"{base_cpu / dc:.2f}x |")
    print(f"Ray overhead with 1 replica: {best['ray, 1 replica'][1] / base_cpu - 1:+.1%} CPU, "
          f"{best['ray, 1 replica'][0] / base - 1:+.1%} wall (goal <= +10%); 2 vs 1 replica aggregate "
          f"throughput (wall): {best['ray, 1 replica'][0] / best['ray, 2 replicas'][0]:.2f}x")


if __name__ == "__main__":
    main()
