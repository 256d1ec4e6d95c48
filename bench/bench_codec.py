"""Codec bench: bytes per entry, speed and error of the logits shard encoding vs naive layouts, on a real
chat model and on the project's tiny teacher.

    python bench/bench_codec.py [--models smollm2,tiny] [--positions 30000] [--tiny-positions 60000] [--k 10]
    python bench/bench_codec.py --models smollm2 --positions 150000 --shard-sizes 10000,30000,60000,150000

Every figure in docs/datastore.md comes from this script. Sizes are honest: whole shard files (ids,
input ids, text, tables, Parquet footers) / (positions x k); the top-k part alone is reported too, and a
per-part breakdown of the default encoding (v3) and the former ones (v2, v1). Throughputs are per core:
pyarrow is held to one thread and times are process CPU seconds; the former encodings run in the same
process for the ratios.

Samples, fp32 straight from the HF backend, before any storage (cached under bench_out/):
- `smollm2`: the real chat model SmolLM2-135M-Instruct (`clients.smollm2.smollm2_dir()`; set
  LOGITFUSE_CACHE) over the project's own English prose and Python code and over chats it answers itself
  (`bench/_smollm2_samples.py`), scored at top-64 once; k and the truncation options cut from that.
- `tiny`: held-out generated chats scored by the project's tiny trained Mistral-shaped teacher on the real
  32k SentencePiece tokenizer (mean full-vocabulary entropy printed, below 3 nats). It learned a small
  generated world, so its top-k use few distinct ids: its figures flatter the id streams.

For SmolLM2 the bench also measures truncation (`truncate_topk`, `logitfuse extract --top-p /
--within-nats`): bytes per token and the KL it costs, KL(truncated || stored top-k), both renormalised,
which is log(top-k mass / kept mass) per position.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datastore import (  # noqa: E402
    LogitsMeta,
    LogitsReader,
    LogitsWriter,
    codec,  # noqa: E402
)
from datastore.codec import CodecConfig  # noqa: E402
from datastore.sample import ScoredSample  # noqa: E402
from datastore.schema import TABLE_KEY, TOPK_KEY  # noqa: E402

CACHE_DIR = Path(__file__).resolve().parents[1] / "bench_out"


def load_samples(n_positions: int = 150_000, k: int = 10) -> tuple[list[ScoredSample], float]:
    """Held-out chats scored by the project's tiny trained teacher (`bench/_teacher_samples.py`), fp32
    straight from the backend, before any storage; and the teacher's mean full-vocabulary entropy."""
    cache = CACHE_DIR / f"samples_tiny_{n_positions}_{k}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    from _teacher_samples import load_samples as tiny_teacher_samples

    samples: list[ScoredSample] = []
    seen: set[str] = set()
    entropies: list[tuple[float, int]] = []
    for seed in range(777, 10_000):
        batch, entropy = tiny_teacher_samples(n=200, k=k, seed=seed)
        batch = [s for s in batch if s.sample_id not in seen]
        for s in batch:
            s.sample_id = f"{seed}-{s.sample_id}"
        seen.update(s.sample_id for s in batch)
        samples += batch
        entropies.append((entropy, sum(len(s.positions) for s in batch)))
        if sum(len(s.positions) for s in samples) >= n_positions:
            break
    entropy = sum(e * n for e, n in entropies) / max(1, sum(n for _, n in entropies))
    CACHE_DIR.mkdir(exist_ok=True)
    cache.write_bytes(pickle.dumps((samples, entropy)))
    return samples, entropy


def load_smollm2_samples(n_positions: int = 30_000) -> tuple[list[ScoredSample], float]:
    """SmolLM2-135M-Instruct's top-64 over the project's prose, code and chats (`_smollm2_samples`)."""
    cache = CACHE_DIR / f"samples_smollm2_{n_positions}_64.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    from _smollm2_samples import load_samples as smollm2_samples

    samples, entropy = smollm2_samples(n_positions, 64)
    CACHE_DIR.mkdir(exist_ok=True)
    cache.write_bytes(pickle.dumps((samples, entropy)))
    return samples, entropy


def first_k(samples: list[ScoredSample], k: int) -> list[ScoredSample]:
    """The same samples with only their top-k entries (the top-k of a top-64 are its first k)."""
    return [
        ScoredSample(s.sample_id, s.input_ids, s.loss_mask, s.positions, np.ascontiguousarray(s.topk_ids[:, :k]),
                     np.ascontiguousarray(s.topk_logprobs[:, :k]), s.gold_logprob, s.text, s.assistant_spans,
                     s.truncated)
        for s in samples
    ]


def _cpu() -> float:
    return time.process_time()


def _meta(k: int) -> LogitsMeta:
    return LogitsMeta(
        dataset_id="bench",
        teacher_name="bench",
        teacher_revision="0",
        tokenizer_fingerprint="bench",
        k=k,
        chat_template="[INST]",
        max_length=2048,
        all_positions=False,
    )


def logitfuse_roundtrip(samples: list[ScoredSample], k: int, config: CodecConfig, shard_rows: int = 512):
    """Write through LogitsWriter into a temp dir and read back: (decoded, file bytes, top-k bytes, times)."""
    with tempfile.TemporaryDirectory() as d:
        uri = os.path.join(d, "ds")
        t0 = _cpu()
        with LogitsWriter(uri, _meta(k), shard_rows, codec_config=config) as w:
            for s in samples:
                w.write(s)
        t_write = _cpu() - t0
        m = w.manifest
        t0 = _cpu()
        out = list(LogitsReader(uri).iter_samples())
        t_read = _cpu() - t0
    return out, m.num_bytes, sum(s.topk_bytes for s in m.shards), t_write, t_read


def naive_roundtrip(samples: list[ScoredSample], k: int, lp_type, id_type, compression: str | None):
    """The same samples as plain nested lists: an uncompressed Arrow IPC file (how FuseChat's HF
    `datasets` stores them) when compression is None, else zstd Parquet with pyarrow's defaults."""
    lp_np, id_np = lp_type.to_pandas_dtype(), id_type.to_pandas_dtype()
    t0 = _cpu()
    table = pa.table(
        {
            "sample_id": [s.sample_id for s in samples],
            "input_ids": [s.input_ids for s in samples],
            "loss_mask": [s.loss_mask for s in samples],
            "positions": [s.positions for s in samples],
            "topk_ids": pa.array(
                [list(s.topk_ids.astype(id_np)) for s in samples], pa.list_(pa.list_(id_type))
            ),
            "topk_logprobs": pa.array(
                [list(s.topk_logprobs.astype(lp_np)) for s in samples], pa.list_(pa.list_(lp_type))
            ),
            "gold_logprob": [s.gold_logprob.astype(lp_np) for s in samples],
            "text": [s.text for s in samples],
        }
    )
    buf = io.BytesIO()
    topk_cols = ("topk_ids", "topk_logprobs", "gold_logprob")
    if compression is None:
        with pa.ipc.new_file(buf, table.schema) as f:
            f.write_table(table)
        topk = sum(table.column(c).nbytes for c in topk_cols)
    else:
        pq.write_table(table, buf, compression=compression)
    t_write = _cpu() - t0
    data = buf.getvalue()
    if compression is not None:
        md = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0)
        topk = sum(
            md.column(j).total_compressed_size
            for j in range(md.num_columns)
            if md.column(j).path_in_schema.split(".")[0] in topk_cols
        )
    t0 = _cpu()
    if compression is None:
        back = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    else:
        back = pq.read_table(pa.BufferReader(data))
    n_pos = np.array([len(s.positions) for s in samples])
    cuts = np.cumsum(n_pos)[:-1]
    ids = np.split(
        back.column("topk_ids").combine_chunks().flatten().flatten().to_numpy().reshape(-1, k), cuts
    )
    lps = back.column("topk_logprobs").combine_chunks().flatten().flatten().to_numpy().reshape(-1, k)
    lps = np.split(lps.astype(np.float32), cuts)
    gold = np.split(
        back.column("gold_logprob").combine_chunks().flatten().to_numpy().astype(np.float32), cuts
    )
    out = [
        ScoredSample(s.sample_id, s.input_ids, s.loss_mask, s.positions, i.astype(np.int32), lp, g, s.text)
        for s, i, lp, g in zip(samples, ids, lps, gold, strict=True)
    ]
    t_read = _cpu() - t0
    return out, len(data), topk, t_write, t_read


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def errors(samples: list[ScoredSample], out: list[ScoredSample]) -> tuple[float, float, bool]:
    """(max |logprob error| over top-k and gold, mean KL(stored || exact) of renormalised top-k, ids ok)."""
    exact = np.concatenate([s.topk_logprobs for s in samples]).astype(np.float64)
    stored = np.concatenate([s.topk_logprobs for s in out]).astype(np.float64)
    gold_e = np.concatenate([s.gold_logprob for s in samples]).astype(np.float64)
    gold_s = np.concatenate([s.gold_logprob for s in out]).astype(np.float64)
    max_err = max(np.abs(exact - stored).max(), np.abs(gold_e - gold_s).max())
    ls, le = _log_softmax(stored), _log_softmax(exact)
    kl = float((np.exp(ls) * (ls - le)).sum(axis=1).mean())
    ids_ok = all(np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(samples, out, strict=True))
    return float(max_err), kl, ids_ok


def describe(samples: list[ScoredSample], k: int) -> str:
    lp = np.concatenate([s.topk_logprobs for s in samples]).astype(np.float64)
    ls = _log_softmax(lp)
    entropy = float(-(np.exp(ls) * ls).sum(axis=1).mean())
    gold_in = np.concatenate([(s.topk_ids == s.input_ids[s.positions + 1][:, None]).any(1) for s in samples])
    n_pos = len(lp)
    n_tok = sum(len(s.input_ids) for s in samples)
    return (
        f"{len(samples)} samples, {n_pos} positions, {n_tok} tokens, k={k}; mean entropy of the renormalised "
        f"top-k {entropy:.3f} nats, mean top-1 prob {np.exp(lp[:, 0]).mean():.3f}, "
        f"gold in top-k {gold_in.mean():.1%}, top-k mass {np.exp(lp).sum(1).mean():.3f}"
    )


def breakdown(samples: list[ScoredSample], k: int, config: CodecConfig) -> dict[str, int | float]:
    """Bytes of each part of one shard holding every sample: Parquet columns (text, input ids, spans,
    ...), and for encodings v2 and v3 the ANS stream's parts (estimated per class family) and its table."""
    stats: dict = {}
    data = codec.encode_shard(samples, k, config, stats=stats)
    pf = pq.ParquetFile(pa.BufferReader(data))
    md = pf.metadata
    parts: dict[str, float] = {}
    for rg in range(md.num_row_groups):
        for j in range(md.row_group(rg).num_columns):
            c = md.row_group(rg).column(j)
            name = c.path_in_schema.split(".")[0].removesuffix("_u16").removesuffix("_u32")
            parts[name] = parts.get(name, 0) + c.total_compressed_size
    kv = md.metadata
    if config.version == 1:
        parts["context table"] = len(kv[TABLE_KEY])
    else:
        parts["context table + models"] = stats.pop("table")
        ans = len(kv[TOPK_KEY])
        est = sum(stats.values())
        for name, v in stats.items():  # the estimates, scaled to the stream's actual length
            parts[f"ans: {name}"] = v * ans / est if est else 0
    parts["footer, schema"] = len(data) - sum(parts.values())
    return parts


def truncation_rows(samples: list[ScoredSample], k: int, shard_rows: int):
    """(name, kept entries per position, B/position, B/token, KL nats, mass lost) per truncation setting."""
    n_pos = sum(len(s.positions) for s in samples)
    n_tok = sum(len(s.input_ids) for s in samples)
    settings = [(f"none (k={k})", None, None)] + [(f"top-p {p}", p, None) for p in (0.99, 0.95, 0.9)] + [
        (f"within {x} nats", None, x) for x in (5.0, 3.0)
    ] + [("top-p 0.95 and within 5 nats", 0.95, 5.0)]
    out = []
    for name, p, x in settings:
        cut = []
        kl, lost, kept = 0.0, 0.0, 0
        for s in samples:
            ids, lp = codec.truncate_topk(s.topk_ids, s.topk_logprobs, top_p=p, within_nats=x)
            cut.append(ScoredSample(s.sample_id, s.input_ids, s.loss_mask, s.positions, ids, lp, s.gold_logprob,
                                    s.text, s.assistant_spans, s.truncated))
            full = np.exp(s.topk_logprobs.astype(np.float64)).sum(1)
            mass = np.exp(lp.astype(np.float64)).sum(1)
            kl += float(np.log(full / mass).sum())
            lost += float((full - mass).sum())
            kept += int((ids >= 0).sum())
        out_s, nbytes, _topk, _tw, _tr = logitfuse_roundtrip(cut, k, CodecConfig(), shard_rows)
        for a, b in zip(cut, out_s, strict=True):  # stored exactly where kept, padding where cut
            assert np.array_equal(a.topk_ids, b.topk_ids)
            v = a.topk_ids >= 0
            assert np.all(np.abs(a.topk_logprobs[v].astype(np.float64) - b.topk_logprobs[v]) <= 5 / 256 + 1e-9)
            assert np.all(np.isneginf(b.topk_logprobs[~v]))
        out.append((name, kept / n_pos, nbytes / n_pos, nbytes / n_tok, kl / n_pos, lost / n_pos))
    return out


def run_model(name: str, samples: list[ScoredSample], entropy: float, k: int, shard_rows: int, truncation: bool):
    n_pos = sum(len(s.positions) for s in samples)
    n_tok = sum(len(s.input_ids) for s in samples)
    entries = n_pos * k
    print(f"\n=== {name}; mean full-vocabulary entropy {entropy:.3f} nats")
    print(describe(samples, k))
    print(f"sizes: whole files / (positions x k); throughput: per core (process CPU time), {n_pos} positions\n")
    header = (
        f"{'encoding':42} {'B/entry':>8} {'top-k':>6} {'B/token':>8} {'write pos/s':>12} {'write tok/s':>12} "
        f"{'read pos/s':>11} {'read tok/s':>11} {'max|err|':>9} {'mean KL':>9} ids"
    )
    print(header)
    print("-" * len(header))
    runs = [
        ("logitfuse v3 (default: step 5/128, rANS)", CodecConfig()),
        ("logitfuse v2 (step 5/128, rANS)", CodecConfig(version=2)),
        ("logitfuse v1 (step 5/128, zstd 17)", CodecConfig(version=1)),
        ("logitfuse v3 step 1/32", CodecConfig(step_units=1, step_log2=5)),
    ]
    speeds = {}
    for _label, cfg in runs:  # warm-up (imports, allocator, constriction), untimed: no row pays it alone
        logitfuse_roundtrip(samples[:8], k, cfg, shard_rows)
    for label, cfg in runs:
        out, nbytes, topk, t_w, t_r = logitfuse_roundtrip(samples, k, cfg, shard_rows)
        speeds[label] = (t_w, t_r)
        max_err, kl, ids_ok = errors(samples, out)
        print(
            f"{label:42} {nbytes / entries:8.3f} {topk / entries:6.3f} {nbytes / n_tok:8.2f} "
            f"{n_pos / t_w:12,.0f} {n_tok / t_w:12,.0f} {n_pos / t_r:11,.0f} {n_tok / t_r:11,.0f} "
            f"{max_err:9.5f} {kl:9.2e} {'exact' if ids_ok else 'WRONG'}"
        )
    for label, lp_t, id_t, comp in (
        ("fp16 + int64, Arrow IPC (FuseChat)", pa.float16(), pa.int64(), None),
        ("fp32 + int32, zstd Parquet", pa.float32(), pa.int32(), "zstd"),
    ):
        out, nbytes, topk, t_w, t_r = naive_roundtrip(samples, k, lp_t, id_t, comp)
        max_err, kl, ids_ok = errors(samples, out)
        print(
            f"{label:42} {nbytes / entries:8.3f} {topk / entries:6.3f} {nbytes / n_tok:8.2f} "
            f"{n_pos / t_w:12,.0f} {n_tok / t_w:12,.0f} {n_pos / t_r:11,.0f} {n_tok / t_r:11,.0f} "
            f"{max_err:9.5f} {kl:9.2e} {'exact' if ids_ok else 'WRONG'}"
        )
    (w3, r3), (w2, r2), (w1, r1) = (speeds[label] for label, _cfg in runs[:3])
    print(f"\nspeed, same run: v3 / v2 write {w2 / w3:.2f}x, read {r2 / r3:.2f}x; "
          f"v3 / v1 write {w1 / w3:.2f}x, read {r1 / r3:.2f}x")

    print("\nper part, one shard of all samples (B/entry):")
    for label, version in (("v3", 3), ("v2", 2), ("v1", 1)):
        parts = breakdown(samples, k, CodecConfig(version=version))
        total = sum(parts.values())
        items = ", ".join(f"{n} {v / entries:.3f}" for n, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  {label} {total / entries:.3f} = {items}")

    if truncation:
        print(f"\ntruncation at k={k} (stored per position: B/position; KL(truncated || top-k), nats):")
        print(f"{'setting':30} {'entries/pos':>11} {'B/position':>10} {'B/token':>8} {'mean KL':>9} {'mass lost':>9}")
        for row in truncation_rows(samples, k, shard_rows):
            print(f"{row[0]:30} {row[1]:11.2f} {row[2]:10.2f} {row[3]:8.2f} {row[4]:9.4f} {row[5]:9.4f}")


def shard_size_rows(samples: list[ScoredSample], k: int, sizes: list[int]) -> None:
    """v3's bytes per entry for one shard holding the first N positions of `samples`, for each N: how the
    per-shard tables and statistics amortise as a shard fills (a default shard holds 512 samples; N may
    take more samples than that, the row says how many)."""
    cum = np.cumsum([len(s.positions) for s in samples])
    print("\nv3, one shard of the first N positions (B/entry; the parts that change most):")
    for target in sizes:
        if target > cum[-1]:
            raise SystemExit(f"--shard-sizes {target}: only {cum[-1]} positions loaded; raise --positions")
        n = int(np.searchsorted(cum, target)) + 1
        parts = breakdown(samples[:n], k, CodecConfig())
        entries = int(cum[n - 1]) * k
        keys = ("ans: id", "ans: escape", "ans: copy", "ans: gap", "context table + models", "text", "input_ids")
        items = ", ".join(f"{key} {parts.get(key, 0) / entries:.3f}" for key in keys)
        print(f"  {n:4d} samples, {cum[n - 1]:7d} positions: {sum(parts.values()) / entries:.3f} = {items}, ...")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    ap.add_argument("--positions", type=int, default=30_000, help="SmolLM2 positions")
    ap.add_argument("--tiny-positions", type=int, default=60_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shard-rows", type=int, default=512)
    ap.add_argument("--shard-sizes", default="",
                    help="SmolLM2: also v3's B/entry for one shard of the first N positions, comma-separated "
                         "N (e.g. 10000,30000,150000; --positions must reach the largest)")
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    k = args.k
    sizes = [int(x) for x in args.shard_sizes.split(",")] if args.shard_sizes else []
    if sizes and "smollm2" not in args.models.split(","):
        ap.error("--shard-sizes needs smollm2 in --models")
    for model in args.models.split(","):
        if model == "smollm2":
            samples, entropy = load_smollm2_samples(args.positions)
            samples = first_k(samples, k)
            run_model("SmolLM2-135M-Instruct (real chat model, 49k BPE): project prose, Python code, chats",
                      samples, entropy, k, args.shard_rows, truncation=True)
            if sizes:
                shard_size_rows(samples, k, sizes)
        elif model == "tiny":
            samples, entropy = load_samples(args.tiny_positions, k)
            run_model("tiny trained Mistral-shaped teacher (spm32k), generated chats: tiny-model figures",
                      samples, entropy, k, args.shard_rows, truncation=False)
        else:
            raise SystemExit(f"--models: unknown model {model!r}, expected smollm2 or tiny")


if __name__ == "__main__":
    main()
