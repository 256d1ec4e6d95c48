"""A stand-in teacher for the codec bench until real teacher output is wired in: an interpolated
trigram + bigram + unigram + cache language model over real English text (the Python standard library's
docstrings and `pydoc_data` topics), tokenized with the 32k SentencePiece tokenizer shipped in the
mistral_common wheel.

Why not random data: the codec exploits structure real teachers have (Zipfian ids, top-k sets that depend
on the context, peaked distributions), and random data has none of it, so its figures would mean nothing.
The model is fitted on 80% of the documents and scores the held-out 20%, so its distributions are neither
memorised (entropy ~0) nor uniform. Its top-k at position t depends on the two previous tokens and on the
last 256 tokens (the cache), not only on the current token, so context-conditioned id coding is not handed
a deterministic table.
"""

from __future__ import annotations

import ast
import glob
import os
import random
from pathlib import Path

import numpy as np

from datastore.sample import ScoredSample

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


def ngram_samples(n_positions: int = 100_000, k: int = 10, seed: int = 0, folds: int = 5) -> list[ScoredSample]:
    """Scored chat-like samples: [INST] user part [/INST] assistant part, assistant positions scored.

    Each document is scored by a model fitted on the other folds (held-out scoring)."""
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
        teacher = _NgramTeacher([np.asarray(t) for i, t in enumerate(tok) if i % folds != fold], sp.get_piece_size())
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
