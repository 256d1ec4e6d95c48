"""Does fusion distil SmolLM2 better than SFT alone? The demo's pipeline (`clients.demo`) over several
training seeds, side by side in one run.

Stages 1-4 (data, teachers, extraction through the service, fusion) run once (`clients.demo.prepare`);
then, per training seed (data order), the SFT-only baseline (λ = 1) and one target per source (λ =
--lambda) are trained from the same pivot init on the same data for the same steps, merged with SCE
(`clients.demo.train_models`), and all of them are evaluated on the demo's held-out chats in one pass
(`clients.demo.heldout_eval`): KL(SmolLM2 ‖ model) over the full vocabulary and the loss, nats per
assistant token. The verdict compares each fused model's mean KL with the SFT-only mean against the
seed-to-seed spread (max - min over seeds) of both, and requires it to win at every seed.

    python bench/bench_distill.py [--workdir /tmp/bench-distill] [--seeds 0,1,2] [--lambda L]
                                  [--steps N] [--lr LR] [--train-chats N] [--heldout-chats N]
                                  (defaults: the demo's)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _train_seed(prep, seed: int, lam: float, steps: int, lr: float, threads: int) -> dict:
    """`clients.demo.train_models` for one seed (in a worker process with `--jobs`)."""
    import torch

    from clients import demo

    torch.set_num_threads(threads)
    return demo.train_models(prep, seed=seed, lam=lam, max_steps=steps, lr=lr,
                             log=lambda m: print(f"  seed {seed}: {m}", flush=True))


def main() -> None:
    from clients import demo

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-distill"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lambda", dest="lam", type=float, default=demo.LAMBDA)
    ap.add_argument("--steps", type=int, default=demo.TRAIN["max_steps"])
    ap.add_argument("--lr", type=float, default=demo.TRAIN["lr"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process each")
    ap.add_argument("--train-chats", type=int, default=demo.N_TRAIN)
    ap.add_argument("--heldout-chats", type=int, default=demo.N_HELDOUT)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    prep = demo.prepare(args.workdir, n_train=args.train_chats, n_heldout=args.heldout_chats)
    t1 = time.perf_counter()
    job_args = [(prep, seed, args.lam, args.steps, args.lr, args.threads) for seed in seeds]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            dirs = dict(zip(seeds, pool.map(_train_seed, *zip(*job_args, strict=True)), strict=True))
    else:
        dirs = {a[1]: _train_seed(*a) for a in job_args}
    print(f"stages 1-4 {t1 - t0:.0f}s, training and merges of {len(seeds)} seeds {time.perf_counter() - t1:.0f}s",
          flush=True)
    # one pass over the held-out chats: SmolLM2 runs once for every model of every seed
    students = {"pivot": prep.teacher_dirs[demo.PIVOT]}
    students.update({f"{seed}|{name}": d for seed, ds in dirs.items() for name, d in ds.items()})
    figures = demo.heldout_eval(prep.teacher_dirs[demo.SMOLLM2], students, prep.heldout)
    per_seed = {seed: {"pivot": figures["pivot"], **{name: figures[f"{seed}|{name}"] for name in dirs[seed]}}
                for seed in seeds}
    names = list(per_seed[seeds[0]])
    print(f"\nheld-out KL(SmolLM2 ‖ model), nats per assistant token; λ={args.lam:g}, {args.steps} steps, "
          f"lr {args.lr:g}, seeds {seeds}")
    print(f"{'model':30s} " + " ".join(f"{'seed ' + str(s):>9s}" for s in seeds) + f" {'mean':>9s} {'spread':>9s}"
          f" {'loss':>8s}")
    stats = {}
    for name in names:
        kls = [per_seed[s][name]["kl"] for s in seeds]
        losses = [per_seed[s][name]["loss"] for s in seeds]
        stats[name] = (statistics.mean(kls), max(kls) - min(kls))
        print(f"{name:30s} " + " ".join(f"{v:9.4f}" for v in kls) + f" {stats[name][0]:9.4f} {stats[name][1]:9.4f}"
              f" {statistics.mean(losses):8.4f}")
    sft_mean, sft_spread = stats["SFT only"]
    print()
    for name in names:
        if name in ("pivot", "SFT only"):
            continue
        mean, spread = stats[name]
        margin = sft_mean - mean
        paired = min(per_seed[s]["SFT only"]["kl"] - per_seed[s][name]["kl"] for s in seeds)
        verdict = "beats SFT-only" if margin > max(spread, sft_spread) and paired > 0 else "does not beat SFT-only"
        print(f"{name:30s} margin {margin:+.4f} nats (smallest same-seed margin {paired:+.4f}) vs spreads "
              f"{spread:.4f} / {sft_spread:.4f}: {verdict}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s wall")


if __name__ == "__main__":
    main()
