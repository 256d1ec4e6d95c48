"""Aligned distributions (per group type, per mapping, identity, real tokenizers) and fusion (MinCE, AvgCE)
checked against independent float64 recomputations."""

from __future__ import annotations

import numpy as np
import pytest
from _tokenizers import CODE, NON_LATIN, PROSE, scored, sentencepiece, synthetic, tekken

from datastore.sample import ScoredSample
from fusion import (
    Alignment,
    ExactMatch,
    MappingStatistics,
    SparseDist,
    StatisticsMap,
    TokenTable,
    align_distributions,
    align_gold_nll,
    align_sample,
    align_spans,
    build_vocab_map,
    cross_entropy,
    fuse_sample,
    gold_ids,
)
from fusion.fuse import fuse  # the function; `fusion.fuse` is also its module's name


def table(pieces):
    return TokenTable(pieces, np.zeros(len(pieces), bool), np.zeros(len(pieces), bool), byte_level=False)


def sample(ids, topk_ids, probs, positions=None):
    s = synthetic(np.asarray(ids), 10, k=2)
    n = len(ids) - 1
    s.positions = np.arange(n, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
    s.topk_ids = np.asarray(topk_ids, np.int32).reshape(len(s.positions), -1)
    s.topk_logprobs = np.log(np.asarray(probs, np.float64)).astype(np.float32).reshape(len(s.positions), -1)
    return s


PIVOT = table([b"a", b"b", b"c", b"ab", b"bc", b"x"])  # ids 0..5
SOURCE = table([b"a", b"b", b"c", b"bc", b"y", b"x", b"ab"])  # ids 0..6


def test_one_to_many_group_uses_source_at_group_end_and_falls_back_inside():
    # "abc": pivot a|b|c, source a|bc  -> 1-1 then 1-n (one source token, two pivot tokens)
    aln = align_spans([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 3)])
    pivot = sample([0, 1, 2], [[1, 5], [2, 5]], [[0.6, 0.1], [0.7, 0.2]])
    source = sample([0, 3], [[3, 1, 4]], [[0.5, 0.3, 0.1]])
    out = align_distributions(pivot, source, aln, ExactMatch(PIVOT, SOURCE), k=3)
    # position 0 (after "a"): source's bc -> pivot bc(4), b -> b(1), y unmapped
    assert out.dist.ids[0].tolist() == [4, 1, -1]
    assert np.allclose(out.dist.probs[0], [0.5, 0.3, 0.0])
    assert out.unmapped_mass[0] == pytest.approx(0.1)
    # position 1 (after "ab") ends inside the source token "bc": the pivot's own distribution
    assert out.from_source.tolist() == [True, False]
    assert out.dist.ids[1].tolist() == [2, 5, -1]
    assert np.allclose(out.dist.probs[1], [0.7, 0.2, 0.0])
    assert out.num_fallback == 1


def test_many_to_one_group_last_and_weighted():
    # "abc": pivot ab|c, source a|b|c -> n-1 (two source tokens, one pivot token) then 1-1
    aln = align_spans([(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)])
    assert aln.kinds().tolist() == [2, 0]
    pivot = sample([3, 2], [[2, 0]], [[0.5, 0.2]])
    source = sample([0, 1, 2], [[1, 6], [2, 5]], [[0.6, 0.2], [0.8, 0.1]])
    em = ExactMatch(PIVOT, SOURCE)
    last = align_distributions(pivot, source, aln, em, k=4, n_to_one="last")
    assert last.dist.ids[0].tolist()[:2] == [2, 5]  # the source position after "ab": c, x
    assert np.allclose(last.dist.probs[0][:2], [0.8, 0.1])

    stats = MappingStatistics(6, 7)
    stats.add(aln, pivot.input_ids, source.input_ids)  # (ab, a) 1, (ab, b) 1
    stats.add(align_spans([(0, 2)], [(0, 1), (1, 2)]), np.array([3]), np.array([0, 0]))  # (ab, a) +2
    ms = StatisticsMap(PIVOT, SOURCE, stats)
    w = align_distributions(pivot, source, aln, ms, k=4)  # weighted by default with statistics
    # weights 3/4 (piece "a", position 0) and 1/4 (piece "b", position 1); ids via MS best partner / EM
    ms_ids = ms(np.array([1, 6, 2, 5]))
    dense = np.zeros(6)
    for sid_pid, p in zip(ms_ids, [0.75 * 0.6, 0.75 * 0.2, 0.25 * 0.8, 0.25 * 0.1], strict=True):
        dense[sid_pid] += p
    got = np.zeros(6)
    valid = w.dist.ids[0] >= 0
    np.add.at(got, w.dist.ids[0][valid], w.dist.probs[0][valid])
    assert np.allclose(got, dense, atol=1e-6)


def test_duplicate_targets_add_up():
    aln = align_spans([(0, 1), (1, 2)], [(0, 1), (1, 2)])
    pivot = sample([0, 1], [[1, 5]], [[0.5, 0.1]])
    source = sample([0, 1], [[1, 6, 4]], [[0.4, 0.3, 0.2]])
    stats = MappingStatistics(6, 7)
    # teach MS that source "ab"(6) and "y"(4) both go with pivot "b"(1)
    stats.add(align_spans([(0, 1), (1, 2)], [(0, 1), (1, 2)]), np.array([1, 1]), np.array([6, 4]))
    out = align_distributions(pivot, source, aln, StatisticsMap(PIVOT, SOURCE, stats), k=2)
    assert out.dist.ids[0].tolist() == [1, -1]
    assert out.dist.probs[0][0] == pytest.approx(0.9)


def test_own_tokenizer_distributions_pass_through_unchanged():
    for tok in (sentencepiece(), tekken()):
        text = PROSE + CODE + NON_LATIN
        pivot = scored(tok, text, k=5, seed=1, add_special=True)
        source = scored(tok, text, k=5, seed=2, add_special=True)
        aln = align_sample(pivot, source, tok, tok)
        t = TokenTable.from_tokenizer(tok)
        for method in ("em", "mined"):
            out = align_distributions(pivot, source, aln, build_vocab_map(method, t, t))
            assert out.from_source.all()
            assert np.array_equal(out.dist.ids, source.topk_ids)
            assert np.allclose(out.dist.probs, np.exp(source.topk_logprobs), rtol=0, atol=1e-7)
            assert (out.unmapped_mass == 0).all()


def _real_pair(text, k=6):
    ptok, stok = sentencepiece(), tekken()
    pivot = scored(ptok, text, k=k, seed=3)
    source = scored(stok, text, k=k, seed=4)
    aln = align_sample(pivot, source, ptok, stok)
    pt, st = TokenTable.from_tokenizer(ptok), TokenTable.from_tokenizer(stok)
    stats = MappingStatistics(pt.vocab_size, st.vocab_size)
    stats.add(aln, pivot.input_ids, source.input_ids)
    return pivot, source, aln, pt, st, stats


def _assert_valid(dist: SparseDist, eps=1e-5):
    assert (dist.probs >= 0).all()
    assert (dist.probs.sum(axis=1) <= 1 + eps).all()
    assert ((dist.ids >= 0) | (dist.probs == 0)).all()
    for row in dist.ids:  # no repeated id in a row
        v = row[row >= 0]
        assert v.size == np.unique(v).size


@pytest.mark.parametrize("text", [PROSE, CODE, NON_LATIN], ids=["prose", "code", "non_latin"])
def test_real_tokenizers_aligned_and_fused_targets_are_distributions(text):
    pivot, source, aln, pt, st, stats = _real_pair(text * 2)
    src_mass = np.exp(source.topk_logprobs.astype(np.float64)).sum(axis=1)
    results = {}
    for method in ("em", "mined", "ms"):
        out = align_distributions(pivot, source, aln, build_vocab_map(method, pt, st, stats))
        _assert_valid(out.dist)
        # mass is mapped or counted as unmapped, never lost (up to top-k truncation of merged rows)
        cov = out.from_source
        assert (out.dist.probs[cov].sum(axis=1) + out.unmapped_mass[cov] <= src_mass.max() + 1e-5).all()
        results[method] = out
        print(
            f"\n{method}: {cov.mean():.1%} positions from the source, {out.num_fallback} fall back, "
            f"unmapped mass {out.unmapped_mass[cov].mean():.3f}"
        )
    # A pivot position can take a source distribution only where both prefixes end at the same text
    # point: the last token of a group. Inside a 1-n group (one 131k BPE token = several SentencePiece
    # tokens, common in non-Latin text: 40% of the positions) there is none, whatever the mapping.
    coverable = aln.context_map()[pivot.positions] >= 0
    inner = np.zeros(len(pivot.input_ids), bool)
    for ps, pe in zip(aln.pivot_start, aln.pivot_end, strict=True):
        inner[ps : pe - 1] = True
    assert np.array_equal(~coverable, inner[pivot.positions])
    for method in ("ms", "mined"):
        fs = results[method].from_source
        assert not (fs & ~coverable).any()
        # the rest fall back only when every top-k entry of the source maps to no pivot token
        assert fs.sum() >= 0.98 * coverable.sum(), (method, fs.sum(), coverable.sum())
    print(f"coverable positions {coverable.mean():.1%}")
    # the gold pivot token is found in the aligned source at most covered positions with MS
    gold = gold_ids(pivot)
    ms = results["ms"]
    hit = (ms.dist.ids == gold[:, None]).any(axis=1)
    assert hit[ms.from_source].mean() > 0.6
    for method in ("mince", "avgce"):
        pair = fuse_sample(pivot, [ms], method)
        multi = fuse_sample(pivot, [ms, results["em"]], method)
        _assert_valid(pair.dist)
        _assert_valid(multi.dist)
        assert pair.ces.shape == (2,) and multi.ces.shape == (3,)
        assert np.isclose(multi.weights.sum(), 1.0)


def _dense(d: SparseDist, vocab):
    x = np.zeros((d.num_positions, vocab), dtype=np.float64)
    for r in range(d.num_positions):
        for i, p in zip(d.ids[r], d.probs[r], strict=True):
            if i >= 0:
                x[r, i] += float(p)
    return x


def _random_teachers(rng, m, n, k, vocab):
    """m teachers with full float64 distributions [n, vocab]; each candidate is its top-k (some ids padded)."""
    dense, cands = [], []
    for i in range(m):
        logits = rng.normal(size=(n, vocab)) * (1.0 + i)
        full = np.exp(logits - logits.max(axis=1, keepdims=True))
        full /= full.sum(axis=1, keepdims=True)
        ids = np.argsort(-full, axis=1)[:, :k].astype(np.int32)
        probs = np.take_along_axis(full, ids, axis=1).astype(np.float32)
        ids[:, -1][rng.random(n) < 0.1] = -1
        probs[ids < 0] = 0
        dense.append(full)
        cands.append(SparseDist(ids, probs))
    return dense, cands


@pytest.mark.parametrize("seed", range(5))
def test_mince_and_avgce_match_an_independent_float64_recomputation(seed):
    rng = np.random.default_rng(seed)
    vocab, n, k = 30, 40, 5
    full, cands = _random_teachers(rng, 3, n, k, vocab)
    gold = rng.integers(0, vocab, size=n)
    mask = rng.random(n) < 0.7
    # CE on the full-vocabulary distributions (what extraction stores as gold_logprob), not the top-k
    ces = [float(np.mean([-np.log(f[t, gold[t]]) for t in range(n) if mask[t]])) for f in full]
    nll = [-np.log(f[np.arange(n), gold]) for f in full]
    res = fuse(cands, nll, mask, "mince")
    assert res.winner == int(np.argmin(ces))
    assert np.allclose(res.ces, ces, rtol=1e-12)
    assert np.array_equal(res.dist.ids, cands[res.winner].ids)
    assert res.weights.tolist() == [float(i == res.winner) for i in range(3)]
    assert cross_entropy(nll[0], mask) == pytest.approx(ces[0], rel=1e-12)

    for weights, formula in (
        ("softmax-ce", lambda c: np.exp(-c) / np.exp(-c).sum()),
        ("fusellm", lambda c: np.exp(np.exp(-c)) / np.exp(np.exp(-c)).sum()),  # FuseLLM: softmax(exp(-CE))
    ):
        avg = fuse(cands, nll, mask, "avgce", k=3 * k, avgce_weights=weights)
        w = formula(np.array(ces))
        expected = sum(wi * _dense(c, vocab) for wi, c in zip(w, cands, strict=True))
        assert np.allclose(avg.weights, w, rtol=1e-12)
        assert np.allclose(_dense(avg.dist, vocab), expected, atol=1e-6)
        _assert_valid(avg.dist)


def test_mince_ranks_by_the_full_distribution_ce_of_the_issue_case():
    """Issue 10: the pivot gives the gold token p = 0.135 everywhere; the source gives it 0.9, except at 30%
    of the positions where the gold token is outside its top-5 (true p 0.004, stored as gold_logprob). The
    papers' CE (full distribution) prefers the source; the top-k estimate with a 1e-6 floor preferred the
    pivot."""
    n, k = 100, 5
    ids = np.arange(n + 1, dtype=np.int32) % 50 + 100  # gold token of position t: ids[t + 1]
    gold = ids[1:].astype(np.int64)
    miss = np.zeros(n, bool)
    miss[np.random.default_rng(0).permutation(n)[:30]] = True
    others = (gold[:, None] + 1 + np.arange(k)[None, :]) % 50 + 100  # never the gold id
    p_topk = np.array([0.135, 0.3, 0.2, 0.1, 0.05])
    piv_ids = np.concatenate([gold[:, None], others[:, : k - 1]], axis=1)
    src_ids = np.where(miss[:, None], others, np.concatenate([gold[:, None], others[:, : k - 1]], axis=1))
    src_p = np.where(miss[:, None], [0.5, 0.2, 0.1, 0.05, 0.05], [0.9, 0.03, 0.02, 0.01, 0.01])

    def scored_sample(topk_ids, topk_p, gold_p):
        order = np.argsort(-topk_p, axis=1, kind="stable")
        return ScoredSample(
            "s0", ids, np.ones(n + 1, bool), np.arange(n, dtype=np.int32),
            np.take_along_axis(np.asarray(topk_ids, np.int32), order, axis=1),
            np.log(np.take_along_axis(np.asarray(topk_p, np.float64), order, axis=1)).astype(np.float32),
            np.log(gold_p).astype(np.float32),
        )

    pivot = scored_sample(piv_ids, np.broadcast_to(p_topk, (n, k)), np.full(n, 0.135))
    source = scored_sample(src_ids, src_p, np.where(miss, 0.004, 0.9))
    vocab = table([bytes([65 + i % 26]) * (1 + i // 26) for i in range(200)])
    out = align_distributions(pivot, source, Alignment.identity(n + 1), ExactMatch(vocab, vocab))
    res = fuse_sample(pivot, [out], "mince")
    # float64 reference, straight from the definition: mean of -log p(gold) over the response positions
    ce_pivot = -np.log(0.135)
    ce_source = 0.7 * -np.log(0.9) + 0.3 * -np.log(0.004)
    assert res.ces == pytest.approx([ce_pivot, ce_source], abs=2e-6)  # float32 storage of the logprobs
    assert ce_source < ce_pivot and res.winner == 1
    assert np.array_equal(res.dist.ids, out.dist.ids)
    # the estimate this replaces (-log max(p_topk(gold), 1e-6)) ranks the other way
    p_src_topk = np.where(miss, 0.0, 0.9)
    assert np.mean(-np.log(np.maximum(p_src_topk, 1e-6))) > ce_pivot


def test_mince_ties_keep_the_pivot_and_bad_method_is_one_line():
    d = SparseDist(np.array([[1, 2]], np.int32), np.array([[0.5, 0.5]], np.float32))
    nll = np.array([0.7])
    res = fuse([d, d], [nll, nll], None, "mince")
    assert res.winner == 0
    with pytest.raises(ValueError, match="expected one of mince, avgce"):
        fuse([d], [nll], None, "best")
    with pytest.raises(ValueError, match="expected one of softmax-ce, fusellm"):
        fuse([d, d], [nll, nll], None, "avgce", avgce_weights="uniform")


def test_decoded_rows_above_one_are_scaled_down_not_rejected():
    """A confident top-1 of -0.004 nat stored as 0 on the codec's grid decodes to a row summing to 1.0037."""
    lp = np.log(np.array([[1.0, 0.0037], [0.6, 0.3]], np.float64)).astype(np.float32)
    d = SparseDist.from_topk(np.array([[3, 4], [3, 4]]), lp)
    assert d.probs[0].sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-6)
    assert d.probs[0] == pytest.approx(np.array([1.0, 0.0037]) / 1.0037, rel=1e-6)
    assert d.probs[1] == pytest.approx([0.6, 0.3], rel=1e-6)  # a row under 1 keeps its tail
    pivot = sample([0, 1, 2], [[1, 5], [2, 5]], [[1.0, 0.0037], [0.7, 0.2]])
    source = sample([0, 1, 2], [[1, 5], [2, 4]], [[1.0, 0.01], [0.5, 0.2]])
    aln = align_spans([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)])
    out = align_distributions(pivot, source, aln, ExactMatch(PIVOT, SOURCE), k=2)
    assert (out.dist.probs.sum(axis=1, dtype=np.float64) <= 1 + 1e-6).all()
    assert out.dist.probs[0, 0] == pytest.approx(1 / 1.01, rel=1e-6)


@pytest.mark.parametrize("method", ["em", "mined", "ms"])
def test_source_ids_past_the_tokenizer_are_unmapped_mass(method):
    """Padded output heads (Qwen: 152,064 rows over a 151,665-token tokenizer) can put ids past the
    tokenizer's length in the top-k: their mass is unmapped, never an IndexError."""
    aln = align_spans([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)])
    pivot = sample([0, 1, 2], [[1, 5], [2, 5]], [[0.6, 0.1], [0.7, 0.2]])
    padded = SOURCE.vocab_size + 5
    source = sample([0, 1, 2], [[1, padded, 7], [2, 5, 9000]], [[0.5, 0.2, 0.1], [0.6, 0.2, 0.1]])
    stats = MappingStatistics(PIVOT.vocab_size, SOURCE.vocab_size)
    stats.add(aln, pivot.input_ids, source.input_ids)
    vmap = build_vocab_map(method, PIVOT, SOURCE, stats)
    assert vmap(np.array([padded, -1, 2])).tolist() == [-1, -1, 2]
    out = align_distributions(pivot, source, aln, vmap, k=3)
    assert out.unmapped_mass == pytest.approx([0.3, 0.1], rel=1e-6)
    assert out.dist.ids.tolist() == [[1, -1, -1], [2, 5, -1]]
    assert ExactMatch(SOURCE, SOURCE)(np.array([padded, 3])).tolist() == [-1, 3]  # the identity too


def test_gold_nll_carried_through_one_to_many_and_many_to_one_groups():
    # "abcdef": pivot a|bc|d|ef, source a|b|c|def -> 1-1 (a), n-1 (bc = b + c), 1-n (def = d + ef)
    aln = align_spans([(0, 1), (1, 3), (3, 4), (4, 6)], [(0, 1), (1, 2), (2, 3), (3, 6)])
    assert aln.kinds().tolist() == [0, 2, 1]
    pivot = sample([0, 3, 2, 5], [[1], [2], [5]], [[0.5], [0.5], [0.5]])
    source = sample([0, 1, 2, 3], [[1], [2], [3]], [[0.5], [0.5], [0.5]])
    pivot.gold_logprob = np.log([0.2, 0.3, 0.4]).astype(np.float32)
    source.gold_logprob = np.log([0.6, 0.7, 0.8]).astype(np.float32)
    nll, from_source = align_gold_nll(pivot, source, aln)
    g = -source.gold_logprob.astype(np.float64)
    # pivot position 0 predicts "bc": the source's NLL of "b" then "c" (chain rule); position 1 predicts
    # "d", the start of the source token "def": its whole NLL; position 2 ("ef", inside it): 0
    assert nll.tolist() == pytest.approx([g[0] + g[1], g[2], 0.0], abs=1e-12)
    assert from_source.tolist() == [True, True, True]
    assert nll.sum() == pytest.approx(g.sum(), abs=1e-12)  # the source's NLL of the same text

    # a group with a source position left unscored, or with mixed response / prompt tokens: the pivot's own
    partial = sample([0, 1, 2, 3], [[1], [3]], [[0.5], [0.5]], positions=[0, 2])
    partial.gold_logprob = np.log([0.6, 0.8]).astype(np.float32)
    nll, from_source = align_gold_nll(pivot, partial, aln)
    assert from_source.tolist() == [False, True, True]
    assert nll[0] == pytest.approx(-np.log(0.2), abs=1e-6)
    pivot.loss_mask = np.array([True, True, True, False])
    nll, from_source = align_gold_nll(pivot, source, aln)
    assert from_source.tolist() == [True, False, False]
    assert nll[1:].tolist() == pytest.approx((-pivot.gold_logprob[1:].astype(np.float64)).tolist())
