"""The LM head at the scored positions (`teacher_server.backends.head.head_topk`) against the way it was
computed before, side by side in one run on SmolLM2-135M-Instruct's real head and hidden states:

  matmul only     `hidden @ W.T` into a fresh tensor per chunk: the floor any way of scoring pays;
  log_softmax     fresh logits, `log_softmax`, top-k and the gold's gather on the log-probabilities (the
                  code before 2026-11-30 and the usual way);
  head_topk       the top-k and the gold read from the logits, the log-sum-exp taken in place, every
                  chunk's logits written into one reused buffer.

Hidden states are SmolLM2's final-norm states at the assistant positions of the project's real chats
(`clients/data/smollm2_chats_train.jsonl`), so the top-k runs on real distributions. Figures are process
CPU seconds per 1,024 positions with one torch thread (per-core figures, robust to other jobs), best of
`--repeats` interleaved rounds; the log-probabilities of both ways are compared to float64.

    python bench/bench_head.py [--positions 4096] [--repeats 5] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _hidden_states(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`[n, 576]` float32 final-norm hidden states at scored positions, int64 `[n]` gold ids, the
    `[49152, 576]` float32 head) from SmolLM2 over the committed training chats."""
    from clients.smollm2 import smollm2_dir
    from clients.smollm2_chats import load_chats
    from datastore.chat import parse_record
    from teacher_server.backends.hf import HFBackend
    from teacher_server.render import resolve_template, tokenize_sample

    backend = HFBackend(smollm2_dir(), device="cpu")
    template = resolve_template("model", backend.tokenizer)
    states, golds, total = [], [], 0
    with torch.inference_mode():
        for record in load_chats("train"):
            ts = tokenize_sample(parse_record({"id": record["id"], "messages": record["messages"]}),
                                 backend.tokenizer, template, 2048)
            ids = torch.from_numpy(ts.input_ids.astype(np.int64))[None]
            hidden = backend.hidden_states(ids, torch.ones_like(ids))[0]
            positions = torch.from_numpy(ts.positions.astype(np.int64))
            states.append(hidden[positions])
            golds.append(ids[0, positions + 1])
            total += len(positions)
            if total >= n:
                break
    head = backend.model.get_output_embeddings().weight.detach().float().contiguous()
    return torch.cat(states)[:n].float(), torch.cat(golds)[:n], head


@torch.inference_mode()
def _log_softmax_way(hidden, gold, head, k, chunk):
    """Top-k of log-probabilities from a fresh `[chunk, V]` tensor per chunk (the previous code)."""
    out = []
    for start in range(0, hidden.shape[0], chunk):
        logprobs = torch.log_softmax(torch.nn.functional.linear(hidden[start : start + chunk], head), dim=-1)
        values, indices = torch.topk(logprobs, k, dim=-1)
        out.append((indices, values, logprobs.gather(1, gold[start : start + chunk, None]).squeeze(1)))
    return tuple(torch.cat(parts).numpy() for parts in zip(*out, strict=True))


@torch.inference_mode()
def _matmul_only(hidden, head, chunk):
    for start in range(0, hidden.shape[0], chunk):
        torch.nn.functional.linear(hidden[start : start + chunk], head)


def main() -> None:
    from teacher_server.backends.head import head_topk

    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024, help="positions per chunk (head_topk's default)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hidden, gold, head = _hidden_states(args.positions)
    n = hidden.shape[0]
    print(f"SmolLM2 head {tuple(head.shape)}, {n} scored positions of real chats, k={args.k}, chunk "
          f"{args.chunk}, torch threads {args.threads}", flush=True)

    # Correctness against float64 on the first 256 positions: both ways, worst |error| of the top-k values.
    ref = torch.log_softmax(hidden[:256].double() @ head.double().T, dim=-1)
    new = head_topk(hidden, gold, head, args.k, args.chunk)
    old = _log_softmax_way(hidden, gold, head, args.k, args.chunk)
    for name, (ids, lp, _) in (("log_softmax", old), ("head_topk", new)):
        err = (torch.from_numpy(lp[:256]).double() - ref.gather(1, torch.from_numpy(ids[:256]).long())).abs().max()
        print(f"  {name}: max |top-k logprob - float64| {err:.2e} nats", flush=True)
    print(f"  top-k ids equal in {np.mean(old[0] == new[0]):.4%} of entries (the rest: fp32 near-ties)")

    variants = {
        "matmul only": lambda: _matmul_only(hidden, head, args.chunk),
        "log_softmax": lambda: _log_softmax_way(hidden, gold, head, args.k, args.chunk),
        "head_topk": lambda: head_topk(hidden, gold, head, args.k, args.chunk),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    per = {name: s * 1024 / n for name, s in best.items()}
    print("\n| variant | CPU-s per 1,024 positions | vs log_softmax | above matmul only |")
    print("|---|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {per[name]:.3f} | {per[name] / per['log_softmax']:.2f}x | "
              f"{per[name] - per['matmul only']:+.3f} |")


if __name__ == "__main__":
    main()
