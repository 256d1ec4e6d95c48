"""The shared datastore's costs, measured side by side in one run:

  commit       per-shard cost of committing through the Delta Lake log (LogitsWriter: content-addressed
               shard + one Delta commit + refresh) against the 0.1 writer's way (shard file, then the whole
               manifest.json rewritten atomically), both on the same pre-encoded shards in a local
               directory; ms per shard and the ratio (process CPU time and wall time).
  reuse        extending a dataset by a fraction (default 2,000 samples + 5%): extract of the extended
               dataset into a store that holds the original (only the new samples are scored, the rest
               copied) against extract of it from scratch; process CPU time, same tiny teacher, ratio;
               new samples appended (ranges line up with the original's shards) and spread at random.
  writers      aggregate extraction throughput of 1 vs N concurrent writers (separate processes, each
               with its own tiny teacher, all extracting the same dataset through range claims); wall
               time from a common start (models already loaded) to the last writer's exit; samples/s and
               the ratio. CPU-bound: the machine's free cores cap it.

    python bench/bench_datastore.py [--shards 60] [--samples 96] [--writers 4] [--reuse-samples 2000]
                                    [--reuse-layouts appended,spread] [--only commit|reuse|writers]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _meta(k: int = 10, dataset_id: str = "bench"):
    from datastore import LogitsMeta

    return LogitsMeta(dataset_id=dataset_id, teacher_name="bench", teacher_revision="r", tokenizer_fingerprint="f",
                      k=k, chat_template="inst", max_length=2048, all_positions=False)


def _samples(n: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_datastore import sample

    return [sample(i, n_tokens=120) for i in range(n)]


def bench_commit(shards: int, rows: int, tmp: Path) -> None:
    """Delta commit vs the 0.1 manifest rewrite, per shard, on identical shard bytes."""
    from datastore import codec, fs
    from datastore.manifest import Manifest, ShardInfo, id_bloom, logits_id
    from datastore.writer import LogitsWriter

    k = 6
    samples = _samples(rows * shards)
    encoded = [codec.encode_shard(samples[i * rows : (i + 1) * rows], k) for i in range(shards)]

    def manifest_0_1(root: Path) -> tuple[float, float]:
        filesystem, path = fs.resolve(str(root))
        m = Manifest(logits_id=logits_id(_meta(k)), meta=_meta(k), encoding=codec.CodecConfig().describe())
        c, w = time.process_time(), time.perf_counter()
        for i, data in enumerate(encoded):
            part = samples[i * rows : (i + 1) * rows]
            for s in part:  # what 0.1's write() did per sample
                codec.validate(s, k)
            name = f"shard-{i:06d}.parquet"
            fs.write_atomic(filesystem, fs.join(path, name), data)
            m.shards.append(ShardInfo(file=name, rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                      positions=sum(len(s.positions) for s in part),
                                      tokens=sum(len(s.input_ids) for s in part), topk_bytes=codec.topk_bytes(data),
                                      id_bloom=id_bloom([s.sample_id for s in part])))
            fs.write_atomic(filesystem, fs.join(path, fs.MANIFEST), m.to_json())
        return time.process_time() - c, time.perf_counter() - w

    def delta(root: Path) -> tuple[float, float]:
        w = LogitsWriter(str(root), _meta(k), shard_rows=rows)
        it = iter(encoded)
        w._encode = lambda _samples: next(it)  # the same bytes as the 0.1 path: only the commit differs
        c, t = time.process_time(), time.perf_counter()
        for s in samples:
            w.write(s)
        return time.process_time() - c, time.perf_counter() - t

    results = {"0.1 manifest.json": [], "Delta log": []}
    for rep in range(2):  # interleaved, best of 2
        results["0.1 manifest.json"].append(manifest_0_1(tmp / f"m{rep}"))
        results["Delta log"].append(delta(tmp / f"d{rep}"))
    best = {name: (min(c for c, _ in r), min(w for _, w in r)) for name, r in results.items()}
    base = best["0.1 manifest.json"]
    print(f"\ncommit: {shards} shards of {rows} samples, {sum(map(len, encoded)) / shards / 1024:.1f} KiB each")
    print("| writer | CPU ms / shard | wall ms / shard | CPU vs 0.1 | wall vs 0.1 |")
    print("|---|---:|---:|---:|---:|")
    for name, (c, w) in best.items():
        print(f"| {name} | {1000 * c / shards:.2f} | {1000 * w / shards:.2f} | {c / base[0]:.2f}x | {w / base[1]:.2f}x |")


def _writer(store: str, data_path: str, shard_rows: int, start, ready, out) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from datastore.chat import load_dataset
    from teacher_server.extract import ExtractSettings, extract

    backend = _tiny_backend()
    data = load_dataset(data_path)
    ready.put(1)
    start.wait()
    res = extract(backend, data, store, "bench", ExtractSettings(k=10, chat_template="inst", shard_rows=shard_rows,
                                                                  batch_tokens=2048), progress=False)
    out.put((res.samples_scored, time.time()))


def bench_writers(samples: int, writers: int, tmp: Path) -> None:
    from clients.corpus import chat_samples, write_jsonl

    data = write_jsonl(chat_samples(samples, seed=7, max_turns=3), tmp / "chats.jsonl")
    ctx = mp.get_context("spawn")
    rates = {}
    for n in (1, writers):
        store = tmp / f"store-{n}"
        start, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(str(store), str(data), 8, start, ready, out)) for _ in range(n)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=600)
        t0 = time.time()
        start.set()
        results = [out.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
        wall = max(t for _, t in results) - t0
        scored = sum(s for s, _ in results)
        assert scored == samples, f"{n} writers scored {scored} samples, the dataset has {samples}"
        rates[n] = samples / wall
        print(f"{n} writer(s): {samples} samples in {wall:.1f}s wall = {rates[n]:.1f} samples/s "
              f"(per writer: {[s for s, _ in results]})", flush=True)
    print(f"\nwriters: aggregate throughput {writers} vs 1 writer(s): {rates[writers] / rates[1]:.2f}x "
          f"(cores on this machine: {os.cpu_count()})")


def _tiny_backend():
    from clients.tiny_models import build_model, load_tokenizer
    from teacher_server.backends.hf import HFBackend

    tok = load_tokenizer("spm32k")
    model = build_model("mistral", tok, seed=0, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    return HFBackend("bench-tiny", model_obj=model.eval(), tokenizer=tok, device="cpu")


def bench_reuse(samples: int, fraction: float, tmp: Path, layouts: list[str]) -> None:
    """Extending `samples` chats by `fraction`: extract of the extended dataset from scratch against
    extract of it into a store that holds the original, same teacher, same process, interleaved.

    Layouts: ``appended`` (the new chats after the original ones: every range of the extended dataset
    but the last lines up with a shard of the original, which is copied whole) and ``spread`` (the new
    chats inserted at random places: no range lines up, every reused sample is decoded and re-encoded)."""
    import random

    import torch

    from clients.corpus import chat_samples, write_jsonl
    from datastore.chat import load_dataset
    from teacher_server.extract import ExtractSettings, extract

    torch.set_num_threads(1)
    backend = _tiny_backend()
    n_new = max(1, round(samples * fraction))
    records = chat_samples(samples + n_new, seed=17, max_turns=3)
    original = load_dataset(write_jsonl(records[:samples], tmp / "original.jsonl"))
    settings = ExtractSettings(k=10, chat_template="inst", shard_rows=512)

    def timed(data, store: Path):
        c = time.process_time()
        res = extract(backend, data, str(store), "bench", settings, progress=False)
        return time.process_time() - c, res

    earlier_s, _ = timed(original, tmp / "shared")  # the earlier dataset, scored once
    rows = []
    for layout in layouts:
        extended = list(records)
        if layout == "spread":
            rng = random.Random(0)
            extended = list(records[:samples])
            for r in records[samples:]:
                extended.insert(rng.randrange(len(extended) + 1), r)
        data = load_dataset(write_jsonl(extended, tmp / f"extended-{layout}.jsonl"))
        store = tmp / f"shared-{layout}"
        shutil.copytree(tmp / "shared", store)  # a store holding only the original
        scratch_s, scratch = timed(data, tmp / f"scratch-{layout}")
        reuse_s, reused = timed(data, store)
        # the generated corpus repeats some short chats: a "new" sample identical to an old one is reused too
        assert scratch.samples_scored == samples + n_new
        assert reused.samples_scored + reused.samples_reused == samples + n_new and reused.samples_scored <= n_new
        rows.append((layout, scratch_s, reuse_s, reused))
    print(f"\nreuse: {samples} chats + {n_new} new ({fraction:.0%}); the original scored once in {earlier_s:.2f} CPU s; "
          f"tiny teacher, k=10, shard/range rows 512, one torch thread")
    print("| new chats | from scratch CPU s | over the store holding the original CPU s | scored | reused "
          "(whole shards copied) | reuse / scratch |")
    print("|---|---:|---:|---:|---:|---:|")
    for layout, scratch_s, reuse_s, r in rows:
        print(f"| {layout} | {scratch_s:.2f} | {reuse_s:.2f} | {r.samples_scored} | {r.samples_reused} "
              f"({r.shards_copied}) | **{reuse_s / scratch_s:.3f}x** |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=60)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--reuse-samples", type=int, default=2000)
    ap.add_argument("--reuse-fraction", type=float, default=0.05)
    ap.add_argument("--reuse-layouts", default="appended,spread",
                    help="where the new chats go: appended, spread (comma-separated)")
    ap.add_argument("--only", choices=["commit", "reuse", "writers"], default=None,
                    help="run one part only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-datastore-"))
    try:
        if args.only in (None, "commit"):
            bench_commit(args.shards, args.rows, tmp)
        if args.only in (None, "reuse"):
            layouts = [x for x in args.reuse_layouts.split(",") if x]
            if not set(layouts) <= {"appended", "spread"}:
                ap.error(f"--reuse-layouts {args.reuse_layouts!r}: expected appended and/or spread")
            bench_reuse(args.reuse_samples, args.reuse_fraction, tmp, layouts)
        if args.only in (None, "writers"):
            bench_writers(args.samples, args.writers, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
