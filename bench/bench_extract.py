"""CPU extraction throughput, measured side by side in one run on the same model and samples:

  extract        `teacher_server.extract.extract` end to end (tokenise, bucket, score, encode, commit
                 shards to a local store), default positions (assistant tokens only);
  extract-all    the same with --all-positions (every position scored, as the bare forward);
  bare forward   `model(input_ids).logits` over the same length-bucketed batches, nothing else;
  pad-to-max     every sample padded to max_length (2048) in fixed batches, full logits, log-softmax,
                 top-k: the reference code's way.

Throughput is real (unpadded) tokens per CPU-second of this process (one torch thread: per-core figures,
and robust to other jobs sharing the machine). The dataset has a realistic spread of lengths
(log-uniform number of chat turns: a few tokens to 2048, longer ones truncated). Random weights:
speed does not depend on what the model knows.

    python bench/bench_extract.py [--samples 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--pad-batch", type=int, default=2, help="batch size of the pad-to-max baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = per-core figures)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from clients.corpus import spread_samples, write_jsonl
    from clients.tiny_models import build_model, load_tokenizer
    from datastore.chat import load_dataset
    from teacher_server.backends.hf import HFBackend
    from teacher_server.batching import plan_batches
    from teacher_server.extract import ExtractSettings, extract
    from teacher_server.render import resolve_template, tokenize_sample

    tok = load_tokenizer("spm32k")
    model = build_model("mistral", tok, seed=0, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model.eval()
    backend = HFBackend("bench-mistral", model_obj=model, tokenizer=tok, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    data = load_dataset(write_jsonl(spread_samples(args.samples, seed=3), tmp / "spread.jsonl"))
    template = resolve_template("inst", tok)
    tokenized = [tokenize_sample(s, tok, template, args.max_length) for s in data.samples]
    lengths = [t.num_tokens for t in tokenized]
    tokens = sum(lengths)
    scored = sum(len(t.positions) for t in tokenized)
    settings = ExtractSettings(k=10, chat_template="inst", max_length=args.max_length)
    print(f"{len(lengths)} samples, {tokens} tokens (min {min(lengths)}, median {int(np.median(lengths))}, "
          f"max {max(lengths)}, {sum(t.truncated for t in tokenized)} truncated), "
          f"{scored / tokens:.0%} of positions are assistant targets; torch threads {args.threads}", flush=True)

    def run_extract(all_positions: bool) -> float:
        store = tmp / f"store-{time.perf_counter_ns()}"
        s = ExtractSettings(**{**settings.__dict__, "all_positions": all_positions})
        t = time.process_time()
        extract(backend, data, str(store), "bench", s, progress=False)
        dt = time.process_time() - t
        shutil.rmtree(store)
        return dt

    @torch.inference_mode()
    def run_bare() -> float:
        t = time.process_time()
        for idx in plan_batches(lengths, settings.batch_tokens):
            width = max(lengths[i] for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : lengths[i]] = torch.from_numpy(tokenized[i].input_ids.astype(np.int64))
                mask[r, : lengths[i]] = 1
            _ = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return time.process_time() - t

    @torch.inference_mode()
    def run_pad_to_max() -> float:
        t = time.process_time()
        for b in range(0, len(tokenized), args.pad_batch):
            chunk = tokenized[b : b + args.pad_batch]
            ids = torch.zeros((len(chunk), args.max_length), dtype=torch.long)
            mask = torch.zeros((len(chunk), args.max_length), dtype=torch.long)
            for r, ts in enumerate(chunk):
                ids[r, : ts.num_tokens] = torch.from_numpy(ts.input_ids.astype(np.int64))
                mask[r, : ts.num_tokens] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            torch.topk(torch.log_softmax(logits, dim=-1), 10, dim=-1)
        return time.process_time() - t

    runs = {"extract": lambda: run_extract(False), "extract --all-positions": lambda: run_extract(True),
            "bare forward (bucketed)": run_bare, "pad-to-max (reference)": run_pad_to_max}
    times: dict[str, list[float]] = {name: [] for name in runs}
    run_extract(False)  # warm-up: allocator, thread pools
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every variant alike
        for name, fn in runs.items():
            times[name].append(fn())
    best = {name: min(ts) for name, ts in times.items()}
    bare = best["bare forward (bucketed)"]
    print(f"\n{'variant':26s} {'seconds':>8s} {'tokens/s':>9s} {'vs bare':>8s}")
    for name, t in best.items():
        print(f"{name:26s} {t:8.2f} {tokens / t:9,.0f} {bare / t:7.2f}x")
    print(f"\nextract / bare forward: {bare / best['extract']:.2f}x (all positions: "
          f"{bare / best['extract --all-positions']:.2f}x); extract / pad-to-max: "
          f"{best['pad-to-max (reference)'] / best['extract']:.1f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
