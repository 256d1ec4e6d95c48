"""GPU extraction throughput on a Mixtral-8x7B-shaped teacher (random bf16 weights, the real config).

Random weights are fine for speed (never for compression figures). Packed 2048-token samples, every
position scored, k = 10, through `HFBackend.score` (decoder once, LM head + fp32 log-softmax + top-k
in chunks). Side by side in the same run: a bare forward pass with full logits over the same tokens,
and a large bf16 matrix product to measure the card's reachable peak.

    python bench/bench_extract_gpu.py [--batch 8] [--steps 5] [--layers 32]

FLOPs per token are counted as 2 x active parameters (attention/MLP/expert weights touched by the
token, LM head included) plus causal attention scores 2 x 2 x layers x d_model x L/2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _light_datastore() -> None:
    """The backend needs only `datastore.errors` and `datastore.chat` (stdlib only), but the package's
    `__init__` pulls in the storage stack (pyarrow, zstandard, pydantic), which a bare GPU image may lack.
    If importing the package fails, register it as a plain namespace so its light submodules still load."""
    try:
        import datastore  # noqa: F401
    except ImportError as e:
        import types

        for name in [m for m in sys.modules if m == "datastore" or m.startswith("datastore.")]:
            del sys.modules[name]
        pkg = types.ModuleType("datastore")
        pkg.__path__ = [str(ROOT / "datastore")]
        sys.modules["datastore"] = pkg
        print(
            f"note: `import datastore` failed ({e}); loading its submodules without the package __init__",
            flush=True,
        )


def mixtral_8x7b_config(layers: int):
    from transformers import MixtralConfig

    # The published Mixtral-8x7B-v0.1 architecture; only the layer count may be cut for a quick run.
    return MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        sliding_window=None,
    )


def active_flops_per_token(cfg, seq: int) -> float:
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    attn_w = d * d * 2 + d * kv * 2  # q, o, k, v
    expert = 3 * d * f * cfg.num_experts_per_tok
    router = d * cfg.num_local_experts
    per_layer = 2 * (attn_w + expert + router) + 2 * 2 * d * (seq / 2)  # weights + causal QK^T and PV
    return n * per_layer + 2 * d * cfg.vocab_size


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="packed 2048-token samples per forward")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument(
        "--experts",
        default="default",
        help="comma-separated MoE experts implementations to time in turn (default: transformers' "
        "own choice; others: grouped_mm, batched_mm, eager)",
    )
    args = ap.parse_args()

    _light_datastore()

    from transformers import AutoModelForCausalLM

    from teacher_server.backends.hf import HFBackend
    from teacher_server.render import TokenizedSample

    assert torch.cuda.is_available(), "needs a GPU"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    peak = matmul_peak()
    print(f"bf16 8192^3 matmul: {peak / 1e12:.0f} TFLOP/s (measured ceiling)", flush=True)

    cfg = mixtral_8x7b_config(args.layers)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Mixtral-8x7B-shaped, {args.layers} layers: {n_params / 1e9:.1f}B params, bf16, "
        f"{torch.cuda.memory_allocated() / 2**30:.0f} GiB, built in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    class _Tok:  # the backend needs only a pad id here: samples arrive tokenised
        pad_token_id = 0

    backend = HFBackend(
        "mixtral-8x7b-random", model_obj=model, tokenizer=_Tok(), device="cuda", chunk_positions=args.chunk
    )
    rng = np.random.default_rng(0)

    def batch():
        out = []
        for i in range(args.batch):
            ids = rng.integers(3, cfg.vocab_size, size=args.seq, dtype=np.int32)
            out.append(
                TokenizedSample(
                    f"s{i}",
                    ids,
                    np.ones(args.seq, bool),
                    np.arange(args.seq - 1, dtype=np.int32),
                    "",
                    np.zeros((0, 2), np.int32),
                    False,
                )
            )
        return out

    batches = [batch() for _ in range(args.steps + 1)]
    tokens = args.batch * args.seq

    def timed(fn):
        fn(batches[0])  # warm-up
        torch.cuda.synchronize()
        times = []
        for b in batches[1:]:
            t = time.perf_counter()
            fn(b)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    @torch.inference_mode()
    def bare(b):
        ids = torch.from_numpy(np.stack([s.input_ids for s in b]).astype(np.int64)).cuda()
        return model(input_ids=ids, use_cache=False).logits

    @torch.inference_mode()
    def decoder_only(b):  # what `score` runs before its LM head / log-softmax / top-k chunks
        ids = torch.from_numpy(np.stack([s.input_ids for s in b]).astype(np.int64)).cuda()
        return backend.hidden_states(ids, torch.ones_like(ids))

    flops = active_flops_per_token(cfg, args.seq) * tokens
    rows = []
    for impl in args.experts.split(","):
        if impl != "default":
            model.set_experts_implementation(impl)
        used = model.config._experts_implementation
        print(
            f"experts implementation: {used} (asked: {impl}), attention: {model.config._attn_implementation}",
            flush=True,
        )
        t_extract = timed(lambda b: backend.score(b, args.k))
        t_bare = timed(bare)
        t_dec = timed(decoder_only)
        rows += [
            (f"[{used}] extract (top-k)", t_extract, True),
            (f"[{used}] bare forward (full logits)", t_bare, True),
            (f"[{used}] decoder only (with mask)", t_dec, False),
        ]
        print(
            f"[{used}] extract {t_extract * 1e3:.0f} ms, bare forward {t_bare * 1e3:.0f} ms, decoder only "
            f"{t_dec * 1e3:.0f} ms per {tokens} tokens; extract / bare forward throughput: {t_bare / t_extract:.2f}x",
            flush=True,
        )
    print(
        f"\n{'':40s} {'ms/step':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'of measured peak':>17s} "
        f"{'of 989 TF datasheet':>20s}"
    )
    for name, t, with_head in rows:
        f = flops if with_head else flops - 2 * cfg.hidden_size * cfg.vocab_size * tokens
        print(
            f"{name:40s} {t * 1e3:8.0f} {tokens / t:10,.0f} {f / t / 1e12:8.0f} {f / t / peak:16.1%} "
            f"{f / t / 989e12:19.1%}"
        )
    print(
        f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s; FLOPs per token counted: "
        f"{active_flops_per_token(cfg, args.seq) / 1e9:.2f} G"
    )
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
