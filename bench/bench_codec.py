"""Codec bench: bytes per entry, speed and error of the logits shard encoding vs naive layouts.

    python bench/bench_codec.py [--positions 150000] [--k 10]

Every figure in docs/datastore.md comes from this script. Sizes are honest: whole shard files (ids,
input ids, text, tables, Parquet footers) / (positions x k); the top-k part alone is reported too.
Throughputs are per core: pyarrow is held to one thread and times are process CPU seconds.

The samples come from `load_samples()`. Until real teacher output is wired in, it is a stand-in teacher:
an interpolated trigram + bigram + cache + unigram language model over real English text (the Python
standard library's docstrings and `pydoc_data` topics, tokenized with the 32k SentencePiece tokenizer of
the mistral_common wheel), each document scored by a model fitted on the other folds. Random data would
mean nothing here: the codec exploits what real teachers have (Zipfian ids, top-k sets that depend on
context, peaked distributions). This teacher's top-k depends on the two previous tokens and the last
256 tokens, not only on the current one, and it is a weak teacher (see the printed entropy and gold-in-
top-k rate): strong teachers are more peaked, which makes every stream cheaper.
"""

from __future__ import annotations

import argparse
import ast
import glob
import io
import os
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datastore import LogitsMeta, LogitsReader, LogitsWriter  # noqa: E402
from datastore.codec import CodecConfig  # noqa: E402
from datastore.sample import ScoredSample  # noqa: E402

CACHE_DIR = Path(__file__).resolve().parents[1] / "bench_out"


def load_samples(n_positions: int = 150_000, k: int = 10, teacher: str = "heldout") -> list[ScoredSample]:
    """The bench's input. Point this at real teacher output (a list of ScoredSample straight from a
    backend, fp32, before any storage) to measure on it; the rest of the bench does not change."""
    cache = CACHE_DIR / f"samples_{teacher}_{n_positions}_{k}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    if teacher == "tiny":  # the project's tiny trained Mistral-shaped teacher (bench/_teacher_samples.py)
        from _teacher_samples import load_samples as tiny_teacher_samples

        samples, total = [], 0
        for seed in range(777, 10_000):
            batch, _ = tiny_teacher_samples(n=200, k=k, seed=seed)
            samples += [s for s in batch if s.sample_id not in {x.sample_id for x in samples}]
            total = sum(len(s.positions) for s in samples)
            if total >= n_positions:
                break
    else:
        samples = ngram_samples(n_positions, k, held_out=teacher == "heldout")
    CACHE_DIR.mkdir(exist_ok=True)
    cache.write_bytes(pickle.dumps(samples))
    return samples


# ---------------------------------------------------------------- stand-in teacher

_WEIGHTS = {"tri": 0.45, "bi": 0.25, "cache": 0.15, "uni": 0.15}
_CACHE = 256
_EPS = 1e-4  # probability mass spread over the whole vocabulary: unseen tokens stay finite


def _corpus() -> list[str]:
    import pydoc_data.topics as topics

    docs = [t for t in topics.topics.values() if len(t) > 300]
    root = os.path.dirname(os.__file__)
    for f in sorted(glob.glob(root + "/*.py") + glob.glob(root + "/*/*.py")):
        if "/test" in f or "/idlelib/" in f:
            continue
        try:
            tree = ast.parse(Path(f).read_text(encoding="utf8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 300:
                    docs.append(d)
    return docs


def _tokenizer():
    import mistral_common
    import sentencepiece as spm

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return spm.SentencePieceProcessor(model_file=str(path))


class _Sparse:
    """Row-normalised sparse count table: key -> (ids, probs), as CSR arrays."""

    def __init__(self, keys: np.ndarray, cols: np.ndarray, n_cols: int):
        pair = keys.astype(np.int64) * n_cols + cols
        uniq, counts = np.unique(pair, return_counts=True)
        row_keys, self.col = uniq // n_cols, (uniq % n_cols).astype(np.int64)
        self.keys, starts = np.unique(row_keys, return_index=True)
        self.indptr = np.append(starts, len(uniq))
        totals = np.add.reduceat(counts, starts)
        self.prob = counts / np.repeat(totals, np.diff(self.indptr))

    def scatter(self, keys: np.ndarray, out: np.ndarray, weight: float) -> np.ndarray:
        """Add weight * row(key) into out[i] for each i; returns a bool mask of keys that were found."""
        idx = np.searchsorted(self.keys, keys)
        idx = np.minimum(idx, len(self.keys) - 1)
        found = self.keys[idx] == keys
        rows = np.nonzero(found)[0]
        starts, ends = self.indptr[idx[rows]], self.indptr[idx[rows] + 1]
        lens = ends - starts
        r = np.repeat(rows, lens)
        flat = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        np.add.at(out, (r, self.col[flat]), weight * self.prob[flat])
        return found


class _NgramTeacher:
    """Interpolated trigram/bigram/cache/unigram model fitted on a list of token arrays."""

    def __init__(self, fit_docs: list[np.ndarray], vocab: int):
        fit = np.concatenate(fit_docs)
        self.used, local = np.unique(fit, return_inverse=True)  # dense work over the used vocabulary only
        self.nv, self.vocab = len(self.used), vocab
        self.uni = np.bincount(local, minlength=self.nv) / len(local)
        self.bi = _Sparse(local[:-1], local[1:], self.nv)
        self.tri = _Sparse(local[:-2] * self.nv + local[1:-1], local[2:], self.nv)
        self.to_local = np.full(vocab, -1, dtype=np.int64)
        self.to_local[self.used] = np.arange(self.nv)

    def score(self, ids: np.ndarray, positions: np.ndarray, k: int):
        """(topk_ids [N, k], topk_logprobs [N, k], gold_logprob [N]) for next tokens ids[positions + 1]."""
        nv, to_local = self.nv, self.to_local
        id_rows, lp_rows, gold_rows = [], [], []
        for s in range(0, len(positions), 512):
            pos = positions[s : s + 512]
            cur, prev = to_local[ids[pos]], to_local[ids[np.maximum(pos - 1, 0)]]
            dense = np.zeros((len(pos), nv))
            found_tri = self.tri.scatter(np.where((cur >= 0) & (prev >= 0), prev * nv + cur, -1), dense, 1.0)
            w_tri = np.where(found_tri, _WEIGHTS["tri"], 0.0)
            dense *= w_tri[:, None]
            bi_part = np.zeros_like(dense)
            found_bi = self.bi.scatter(np.where(cur >= 0, cur, -1), bi_part, 1.0)
            w_bi = np.where(found_bi, _WEIGHTS["bi"], 0.0)
            dense += w_bi[:, None] * bi_part
            for j, t in enumerate(pos):
                window = to_local[ids[max(0, t - _CACHE) : t + 1]]
                window = window[window >= 0]
                np.add.at(dense[j], window, _WEIGHTS["cache"] / len(window))
            rest = 1.0 - w_tri - w_bi - _WEIGHTS["cache"]
            dense += rest[:, None] * self.uni[None, :]
            logp = np.log((1 - _EPS) * dense + _EPS / self.vocab)
            top = np.argpartition(-logp, k - 1, axis=1)[:, :k]
            top_lp = np.take_along_axis(logp, top, axis=1)
            order = np.argsort(-top_lp, axis=1, kind="stable")
            id_rows.append(self.used[np.take_along_axis(top, order, axis=1)])
            lp_rows.append(np.take_along_axis(top_lp, order, axis=1))
            gold = to_local[ids[pos + 1]]
            unseen = np.log(_EPS / self.vocab)
            gold_rows.append(np.where(gold >= 0, logp[np.arange(len(pos)), np.maximum(gold, 0)], unseen))
        return (
            np.concatenate(id_rows).astype(np.int32),
            np.concatenate(lp_rows).astype(np.float32),
            np.concatenate(gold_rows).astype(np.float32),
        )


def ngram_samples(
    n_positions: int = 100_000, k: int = 10, seed: int = 0, folds: int = 5, held_out: bool = True
) -> list[ScoredSample]:
    """Scored chat-like samples: [INST] user part [/INST] assistant part, assistant positions scored.

    held_out: each document is scored by a model fitted on the other folds (a weak teacher, the hard
    case for the codec). Otherwise one model fitted on every document scores them (a teacher that has
    seen the text: sharper distributions, closer to a large model on fluent text)."""
    rng = random.Random(seed)
    docs = _corpus()
    rng.shuffle(docs)
    sp = _tokenizer()
    tok = [sp.encode(d) for d in docs]
    inst, end_inst = sp.encode("[INST]"), sp.encode("[/INST]")
    out: list[ScoredSample] = []
    total = 0
    for fold in range(folds):
        if total >= n_positions:
            break
        held = range(fold, len(docs), folds)
        fit = [np.asarray(t) for i, t in enumerate(tok) if i % folds != fold or not held_out]
        teacher = _NgramTeacher(fit, sp.get_piece_size())
        for i in held:
            if total >= n_positions:
                break
            cut = max(1, len(tok[i]) // 4)
            user, answer = sp.decode(tok[i][:cut]), sp.decode(tok[i][cut:])
            prompt = [sp.bos_id(), *inst, *sp.encode(user), *end_inst]
            ids = np.asarray(prompt + sp.encode(answer) + [sp.eos_id()], dtype=np.int64)[:2048]
            loss_mask = np.zeros(len(ids), dtype=bool)
            loss_mask[len(prompt) :] = True
            positions = np.nonzero(loss_mask[1:])[0]
            if len(positions) == 0:
                continue
            topk_ids, topk_lp, gold_lp = teacher.score(ids, positions, k)
            text = f"[INST] {user} [/INST] {answer}"
            start = len(text) - len(answer)
            out.append(
                ScoredSample(
                    sample_id=f"doc-{i:06d}",
                    input_ids=ids.astype(np.int32),
                    loss_mask=loss_mask,
                    positions=positions.astype(np.int32),
                    topk_ids=topk_ids,
                    topk_logprobs=topk_lp,
                    gold_logprob=gold_lp,
                    text=text,
                    assistant_spans=np.array([[start, len(text)]], dtype=np.int32),
                    truncated=len(ids) == 2048,
                )
            )
            total += len(positions)
    return out


# ---------------------------------------------------------------- measurements


def _cpu() -> float:
    return time.process_time()


def _meta(k: int) -> LogitsMeta:
    return LogitsMeta(
        dataset_id="bench",
        teacher_name="ngram-standin",
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
    ap.add_argument(
        "--teacher",
        choices=["heldout", "insample", "tiny"],
        default="heldout",
        help="n-gram stand-in (held-out or in-sample) or the project's tiny trained teacher",
    )
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    samples = load_samples(args.positions, args.k, args.teacher)
    k = args.k
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
