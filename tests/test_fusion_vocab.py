"""Vocabulary mapping: canonical token bytes, EM, MinED, mapping statistics (sparse, saved, loaded)."""

from __future__ import annotations

import numpy as np
import pytest
from _tokenizers import PROSE, levenshtein, scored, sentencepiece, tekken

from fusion import (
    ExactMatch,
    MappingStatistics,
    MinEditDistance,
    StatisticsMap,
    TokenTable,
    align_sample,
    align_spans,
    build_vocab_map,
)


def table(pieces: list[bytes], special=()) -> TokenTable:
    is_special = np.isin(np.arange(len(pieces)), list(special))
    return TokenTable(pieces, is_special, np.zeros(len(pieces), bool), byte_level=False)


def test_canonical_bytes_of_real_tokenizers():
    sp, tk = TokenTable.from_tokenizer(sentencepiece()), TokenTable.from_tokenizer(tekken())
    sp_tok, tk_tok = sentencepiece(), tekken()
    assert sp.pieces[sp_tok.convert_tokens_to_ids("▁the")] == b" the"
    assert sp.pieces[sp_tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert tk.pieces[tk_tok.convert_tokens_to_ids("Ġthe")] == b" the"
    assert tk.pieces[tk_tok.convert_tokens_to_ids("Ċ")] == b"\n"
    assert sp.pieces[sp_tok.eos_token_id] == b"\x00</s>"
    assert sp.vocab_size == 32000 and tk.vocab_size == 131072
    assert TokenTable.from_tokenizer(sp_tok) is sp  # cached per tokenizer


def test_exact_match_between_real_vocabularies():
    sp_tok, tk_tok = sentencepiece(), tekken()
    em = ExactMatch(TokenTable.from_tokenizer(sp_tok), TokenTable.from_tokenizer(tk_tok))
    ids = tk_tok.convert_tokens_to_ids(["Ġthe", "Ċ", "Ġ"])
    out = em(np.array(ids + [tk_tok.eos_token_id]))
    assert out.tolist() == sp_tok.convert_tokens_to_ids(["▁the", "<0x0A>", "▁"]) + [sp_tok.eos_token_id]
    long_word = tk_tok.convert_tokens_to_ids("Ġdistributions")
    assert (
        em(np.array([long_word]))[0] == -1
        or sp_tok.convert_ids_to_tokens(int(em(np.array([long_word]))[0])) == "▁distributions"
    )
    # with the pivot's own tokenizer, EM is the identity (not a dedup of equal-bytes tokens)
    same = ExactMatch(TokenTable.from_tokenizer(sp_tok), TokenTable.from_tokenizer(sp_tok))
    ids = np.arange(32000)
    assert np.array_equal(same(ids), ids)


def test_exact_match_hand_built_and_preferences():
    pivot = TokenTable(
        [b"\x00<s>", b"a", b" b", b"b", b"\n"],
        np.array([1, 0, 0, 0, 0], bool),
        np.array([0, 0, 0, 0, 1], bool),
        False,
    )
    pivot_nl = TokenTable(
        pivot.pieces + [b"\n"], np.r_[pivot.is_special, False], np.r_[pivot.is_byte_fallback, False], False
    )
    source = table([b"\x00<s>", b" b", b"zz", b"\n", b"a"], special=[0])
    assert ExactMatch(pivot, source)(np.arange(5)).tolist() == [0, 2, -1, 4, 1]
    # a regular token beats a byte-fallback token of the same bytes
    assert ExactMatch(pivot_nl, source)(np.array([3]))[0] == 5


def test_mined_is_the_brute_force_minimum_with_deterministic_ties():
    pivot = table([b"\x00<s>", b"cat", b"cart", b"dog", b"ca", b"hat"], special=[0])
    source = table([b"\x00</s>", b"cat", b"cap", b"hats", b"dot"], special=[0])
    m = MinEditDistance(pivot, source)
    # cap: cat (1), ca (1), cart (2)... ties by length difference (cat, |3-3|=0) then lower id
    assert m(np.arange(5)).tolist() == [-1, 1, 1, 5, 3]

    sp_tok, tk_tok = sentencepiece(), tekken()
    pt, st = TokenTable.from_tokenizer(sp_tok), TokenTable.from_tokenizer(tk_tok)
    mined = MinEditDistance(pt, st)
    em = ExactMatch(pt, st)
    words = [
        w
        for w in ("Ġdistributions", "Ġunmaintainable", "ĠÐ¾ÑĪÐ¸Ð±")
        if tk_tok.convert_tokens_to_ids(w) != tk_tok.unk_token_id
    ]
    for w in words[:2]:
        sid = tk_tok.convert_tokens_to_ids(w)
        if em(np.array([sid]))[0] >= 0:
            continue
        got = int(mined(np.array([sid]))[0])
        piece = st.pieces[sid]
        best = min(
            (levenshtein(p, piece), abs(len(p) - len(piece)), i)
            for i, p in enumerate(pt.pieces)
            if not pt.is_special[i] and p
        )
        assert got == best[2], (w, sp_tok.convert_ids_to_tokens(got), sp_tok.convert_ids_to_tokens(best[2]))


def test_mapping_statistics_count_save_load(tmp_path):
    # text "abcd": pivot a|bc|d, source a|b|cd  -> groups a/a (1-1), then bcd: no common cut -> n-m
    a = align_spans([(0, 1), (1, 3), (3, 4)], [(0, 1), (1, 2), (2, 4)])
    stats = MappingStatistics(pivot_vocab=10, source_vocab=20)
    pivot_ids, source_ids = np.array([1, 2, 3]), np.array([11, 12, 13])
    stats.add(a, pivot_ids, source_ids)
    stats.add(a, pivot_ids, source_ids)
    assert stats.num_pairs == 1  # the n-m group is not counted by default
    stats.add(a, pivot_ids, source_ids, many_to_many=True)
    assert stats.count(np.array([1, 2, 3, 3]), np.array([11, 12, 13, 11])).tolist() == [3, 1, 1, 0]
    best = stats.best_pivot()
    assert best[11] == 1 and best[12] == 2 and best[0] == -1
    stats.save(tmp_path / "ms.npz")
    back = MappingStatistics.load(tmp_path / "ms.npz")
    assert np.array_equal(back.keys, stats.keys) and np.array_equal(back.counts, stats.counts)
    assert np.array_equal(back.start_counts, stats.start_counts)
    assert np.array_equal(back.best_pivot(), best)


def test_mapping_statistics_map_real_pair_and_fit_in_uint32_keys():
    sp_tok, tk_tok = sentencepiece(), tekken()
    pt, st = TokenTable.from_tokenizer(sp_tok), TokenTable.from_tokenizer(tk_tok)
    stats = MappingStatistics(pt.vocab_size, st.vocab_size)
    assert stats.key_dtype == np.uint32  # 32000 x 131072 < 2**32
    p, s = scored(sp_tok, PROSE * 2), scored(tk_tok, PROSE * 2)
    aln = align_sample(p, s, sp_tok, tk_tok)
    stats.add(aln, p.input_ids, s.input_ids)
    assert stats.nbytes == stats.num_pairs * 12  # key + count + start count, before the best table
    ms = build_vocab_map("ms", pt, st, stats)
    assert isinstance(ms, StatisticsMap)
    the = tk_tok.convert_tokens_to_ids("Ġthe")
    assert ms(np.array([the]))[0] == sp_tok.convert_tokens_to_ids("▁the")
    with pytest.raises(ValueError, match="not 10x20"):
        StatisticsMap(table([b"a"] * 10), table([b"b"] * 20), stats)
    with pytest.raises(ValueError, match="expected em, mined or ms"):
        build_vocab_map("fuzzy", pt, st)
    with pytest.raises(ValueError, match="needs mapping statistics"):
        build_vocab_map("ms", pt, st)


def test_mapping_statistics_ties_go_to_the_piece_the_pivot_predicts_next(smollm2_tokenizer, spm_tokenizer):
    """Issue 10: a SmolLM2 token spanning several 32k SentencePiece tokens is counted once with each piece;
    the tie must go to the piece that starts with it (what the pivot predicts where the source predicts
    the token: ``Ġconcise`` -> ``▁conc``, not ``ise``), not to the lowest id."""
    sm, sp = smollm2_tokenizer, spm_tokenizer
    assert sp.convert_ids_to_tokens(sp("Be concise", add_special_tokens=False)["input_ids"])[-2:] == ["▁conc", "ise"]
    assert sp.convert_tokens_to_ids("ise") < sp.convert_tokens_to_ids("▁conc")  # the old tie-break's pick
    text = PROSE + " Keep it concise. A concise answer is best; be concise and clear, and concise again.\n"
    pt, st = TokenTable.from_tokenizer(sp), TokenTable.from_tokenizer(sm)
    p, s = scored(sp, text), scored(sm, text)
    aln = align_sample(p, s, sp, sm)
    stats = MappingStatistics(pt.vocab_size, st.vocab_size)
    stats.add(aln, p.input_ids, s.input_ids)
    ms = StatisticsMap(pt, st, stats)
    concise = sm.convert_tokens_to_ids("Ġconcise")
    assert ms(np.array([concise]))[0] == sp.convert_tokens_to_ids("▁conc")
    # every source id whose best count is tied maps to a partner that starts a group with it
    stats.compact()
    keys = stats.keys.astype(np.int64)
    src, piv = keys // stats.pivot_vocab, keys % stats.pivot_vocab
    best = stats.best_pivot()
    tied = 0
    for sid in np.unique(src):
        rows = np.flatnonzero(src == sid)
        top = stats.counts[rows].max()
        if (stats.counts[rows] == top).sum() > 1:
            tied += 1
            chosen = rows[piv[rows] == best[sid]][0]
            assert stats.start_counts[chosen] == stats.start_counts[rows][stats.counts[rows] == top].max()
            assert stats.start_counts[chosen] > 0, sm.convert_ids_to_tokens(int(sid))
    assert tied >= 5
    print(f"\n{tied} of {np.unique(src).size} source ids tie on the top count")


def test_mined_ties_prefer_regular_tokens_over_byte_fallback(spm_tokenizer):
    """A source token ``00`` (GPT-2-style BPE vocabularies have it; SmolLM2 and the 131k BPE split digits)
    has no 32k SentencePiece token; ``0`` (regular) and ``<0x30>`` (byte fallback, lower id) are both at
    distance 1 with the same length: the regular one wins."""
    sp = spm_tokenizer
    pt = TokenTable.from_tokenizer(sp)
    assert b"00" not in pt.pieces
    assert sp.convert_tokens_to_ids("<0x30>") < sp.convert_tokens_to_ids("0")
    source = table([b"x", b"00"])
    assert MinEditDistance(pt, source)(np.array([1]))[0] == sp.convert_tokens_to_ids("0")
