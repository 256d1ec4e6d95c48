"""The teacher service's overhead and throughput, in one run.

1. End to end through the service (upload -> job -> committed shards, measured by a client that uploads,
   submits and polls until `done`) against `teacher_server.extract.extract` called directly, on the same
   dataset and the same teacher, alternating the two (and which goes first) `--repeats` times. The teacher is resident in both
   (the service's worker has loaded it before the clock starts; the direct run's backend is built
   before its clock starts), so the difference is what the service adds: upload, validation, queueing,
   a worker process, progress writes to SQLite, polling.
2. Several clients submitting different datasets at once (one teacher, one queue): wall time for all,
   aggregate samples/s and tokens/s, and each client's latency.

    python bench/bench_service.py [--samples 600] [--clients 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _dataset(path: Path, n: int, seed: int, variant: int = 0) -> Path:
    """A chat dataset; `variant` appends blank lines, which change the file's id but not its samples."""
    from clients.corpus import chat_samples, write_jsonl

    write_jsonl(chat_samples(n, seed=seed, max_turns=3), path)
    if variant:
        with path.open("a") as f:
            f.write("\n" * variant)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from clients.client import TeacherClient, run_local_service
    from clients.tiny_models import make_teacher
    from datastore.chat import load_dataset
    from datastore.reader import LogitsReader
    from teacher_server.backends.hf import HFBackend
    from teacher_server.extract import ExtractSettings, extract
    from teacher_server.render import TEMPLATE_DIR

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-service-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_teacher(Path(tempfile.gettempdir()) / "logitfuse-test-teachers" / "llama-spm", "llama", "spm32k",
                         (TEMPLATE_DIR / "inst.jinja").read_text(encoding="utf-8"), steps=40)
    settings = ExtractSettings(k=args.k)
    config = {
        "store": str(work / "store-service"),
        "state_dir": str(work / "state"),
        "teachers": [{"name": "tiny", "model": str(model), "backend": "hf", "max_k": 20,
                      "batch_tokens": settings.batch_tokens, "shard_rows": settings.shard_rows}],
    }
    backend = HFBackend(model)

    direct_s, service_s, fixed_s, tokens = [], [], [], 0
    print(f"teacher: tiny llama (2 layers, hidden 128, 32k vocab) at {model}; k={args.k}; {args.samples} chat samples")
    with run_local_service(config, log_path=work / "serve.log") as url, TeacherClient(url) as client:
        for r in range(args.repeats):
            data = _dataset(work / f"chat-{r}.jsonl", args.samples, seed=100, variant=r)

            def run_direct(data=data, store=str(work / f"store-direct-{r}")):
                t0 = time.perf_counter()
                res = extract(backend, load_dataset(data), store, "tiny", settings, progress=False)
                direct_s.append(time.perf_counter() - t0)
                return res

            def run_service(data=data):
                t0 = time.perf_counter()
                ds = client.upload(data)
                job = client.submit(ds["id"], "tiny", k=args.k)
                job = client.wait(job["id"], progress=False)
                service_s.append(time.perf_counter() - t0)
                fixed_s.append(service_s[-1] - job["run_seconds"])  # everything but the worker's extract()
                return job

            # alternate which goes first, so neither always runs on the warmer (or busier) machine
            if r % 2 == 0:
                res, job = run_direct(), run_service()
            else:
                job, res = run_service(), run_direct()
            tokens = res.tokens
            assert job["state"] == "done", job
            assert len(LogitsReader(job["uri"])) == args.samples == len(LogitsReader(res.uri))
            print(f"  repeat {r + 1}: direct extract {direct_s[-1]:6.2f}s   service end-to-end {service_s[-1]:6.2f}s "
                  f"(of which outside the worker's extract: {fixed_s[-1]:.2f}s)")

        d, s = statistics.median(direct_s), statistics.median(service_s)
        print()
        print(f"{'path':34} {'median s':>9} {'min s':>7} {'tok/s':>9}")
        print(f"{'extract() direct':34} {d:9.2f} {min(direct_s):7.2f} {tokens / d:9,.0f}")
        print(f"{'service: upload+job+shards':34} {s:9.2f} {min(service_s):7.2f} {tokens / s:9,.0f}")
        print(f"service overhead: {100 * (s / d - 1):+.1f}% (median), {100 * (min(service_s) / min(direct_s) - 1):+.1f}% (min)"
              f"   [goal < 10%]")
        f = statistics.median(fixed_s)
        print(f"service time outside extract() (upload, validation, queueing, status polls): median {f:.2f}s "
              f"= {100 * f / d:.1f}% of the direct run (the rest is machine noise: 2 shared cores)")

        # several clients at once: different datasets, the same teacher (one queue)
        per_client = max(1, args.samples // args.clients)
        paths = [_dataset(work / f"client-{c}.jsonl", per_client, seed=200 + c) for c in range(args.clients)]
        latencies: list[float] = [0.0] * args.clients
        results: list[dict] = [{}] * args.clients
        start = threading.Barrier(args.clients)

        def one(c: int) -> None:
            with TeacherClient(url) as own:
                start.wait()
                t0 = time.perf_counter()
                ds = own.upload(paths[c])
                job = own.wait(own.submit(ds["id"], "tiny", k=args.k)["id"], progress=False)
                latencies[c] = time.perf_counter() - t0
                results[c] = job

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        assert all(j["state"] == "done" for j in results), results
        n_tok = sum(j["tokens"] for j in results)
        n_samples = sum(j["samples_done"] for j in results)
        print()
        print(f"{args.clients} clients at once, {per_client} samples each, one teacher queue:")
        print(f"  wall {wall:.2f}s   {n_samples / wall:,.1f} samples/s   {n_tok / wall:,.0f} tok/s "
              f"(single client above: {args.samples / s:,.1f} samples/s, {tokens / s:,.0f} tok/s)")
        print("  per-client latency s: " + "  ".join(f"{x:.2f}" for x in sorted(latencies)))


if __name__ == "__main__":
    main()
