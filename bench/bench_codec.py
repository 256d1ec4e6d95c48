"""Codec bench: bytes per entry, speed and error of the logits shard encoding vs naive layouts.

    python bench/bench_codec.py [--positions 150000] [--k 10]

Every figure in docs/datastore.md comes from this script. Sizes are honest: whole shard files (ids,
input ids, text, tables, Parquet footers) / (positions x k); the top-k part alone is reported too.
Throughputs are per core: pyarrow is held to one thread and times are process CPU seconds.

The samples come from `load_samples()`: held-out generated chats scored by the project's tiny trained
Mistral-shaped teacher on the real 32k SentencePiece tokenizer (a teacher that has learned something:
its mean full-vocabulary entropy is printed and must be below 3 nats). Random weights would mean nothing
here: the codec exploits what real teachers have (Zipfian ids, top-k sets that depend on context, peaked
distributions). Caveat: the tiny teacher is trained on a small generated corpus, so it uses far fewer
distinct ids than a large chat model would; a real teacher's id streams cost more (see docs/datastore.md).
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

from datastore import LogitsMeta, LogitsReader, LogitsWriter  # noqa: E402
from datastore.codec import CodecConfig  # noqa: E402
from datastore.sample import ScoredSample  # noqa: E402

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


def _cpu() -> float:
    return time.process_time()


def _meta(k: int) -> LogitsMeta:
    return LogitsMeta(
        dataset_id="bench",
        teacher_name="tiny-mistral",
        teacher_revision="0",
        tokenizer_fingerprint="mistral-sp32k-v1",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=150_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shard-rows", type=int, default=512)
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    samples, entropy = load_samples(args.positions, args.k)
    k = args.k
    print(f"teacher: tiny Mistral-shaped, spm32k; mean full-vocabulary entropy {entropy:.3f} nats")
    n_pos = sum(len(s.positions) for s in samples)
    n_tok = sum(len(s.input_ids) for s in samples)
    entries = n_pos * k
    print(describe(samples, k))
    print(
        f"sizes: whole files / (positions x k); throughput: per core (process CPU time), {n_pos} positions\n"
    )
    header = (
        f"{'encoding':42} {'B/entry':>8} {'top-k':>6} {'B/token':>8} {'write pos/s':>12} {'write tok/s':>12} "
        f"{'read pos/s':>11} {'read tok/s':>11} {'max|err|':>9} {'mean KL':>9} ids"
    )
    print(header)
    print("-" * len(header))
    runs = [
        (
            "logitfuse (default: step 5/128, zstd 17)",
            lambda: logitfuse_roundtrip(samples, k, CodecConfig(), args.shard_rows),
        ),
        (
            "logitfuse step 5/128, zstd 9",
            lambda: logitfuse_roundtrip(samples, k, CodecConfig(zstd_level=9), args.shard_rows),
        ),
        (
            "logitfuse step 5/128, zstd 3",
            lambda: logitfuse_roundtrip(samples, k, CodecConfig(zstd_level=3), args.shard_rows),
        ),
        (
            "logitfuse step 1/32, zstd 17",
            lambda: logitfuse_roundtrip(samples, k, CodecConfig(step_units=1, step_log2=5), args.shard_rows),
        ),
        (
            "fp16 + int64, Arrow IPC (FuseChat)",
            lambda: naive_roundtrip(samples, k, pa.float16(), pa.int64(), None),
        ),
        ("fp32 + int32, zstd Parquet", lambda: naive_roundtrip(samples, k, pa.float32(), pa.int32(), "zstd")),
    ]
    for name, run in runs:
        out, nbytes, topk, t_w, t_r = run()
        max_err, kl, ids_ok = errors(samples, out)
        print(
            f"{name:42} {nbytes / entries:8.3f} {topk / entries:6.3f} {nbytes / n_tok:8.2f} "
            f"{n_pos / t_w:12,.0f} {n_tok / t_w:12,.0f} {n_pos / t_r:11,.0f} {n_tok / t_r:11,.0f} "
            f"{max_err:9.5f} {kl:9.2e} {'exact' if ids_ok else 'WRONG'}"
        )


if __name__ == "__main__":
    main()
