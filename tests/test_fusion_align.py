"""Sequence alignment: hand-built group types, the identity, real tokenizers over prose/code/non-Latin
text, templates that differ, and DTW against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pytest
from _tokenizers import CODE, NON_LATIN, PROSE, levenshtein, scored, sentencepiece, tekken

from fusion import (
    Alignment,
    AlignmentError,
    ExactMatch,
    align_distributions,
    align_dtw,
    align_sample,
    align_spans,
    byte_spans,
)
from fusion.align import decoded_pieces, dtw_pieces
from fusion.vocab import TokenTable

# ------------------------------------------------------------------------------ hand-built spans


def groups(a: Alignment):
    return sorted(a.group_tuples())


def test_one_to_one_and_both_directions_of_one_to_many():
    # text "abcdef": pivot a|bc|d|ef, source a|b|c|def
    pivot = [(0, 1), (1, 3), (3, 4), (4, 6)]
    source = [(0, 1), (1, 2), (2, 3), (3, 6)]
    a = align_spans(pivot, source)
    assert groups(a) == [(0, 1, 0, 1), (1, 2, 1, 3), (2, 4, 3, 4)]
    assert a.kinds().tolist() == [0, 2, 1]  # 1-1, n-1 (2 source : 1 pivot), 1-n (1 source : 2 pivot)
    assert a.kind_counts() == {"1-1": 1, "1-n": 1, "n-1": 1, "n-m": 0}


def test_many_to_many_when_no_common_boundary():
    # pivot ab|c, source a|bc: no shared boundary inside -> one 2-2 group
    a = align_spans([(0, 2), (2, 3)], [(0, 1), (1, 3)])
    assert groups(a) == [(0, 2, 0, 2)]
    assert a.kinds().tolist() == [3]


def test_zero_width_tokens_are_skipped_and_gaps_join_the_next_token():
    # pivot: BOS (zero width) then "x", " yz" where the space is left uncovered (SentencePiece style)
    pivot = [(0, 0), (0, 1), (2, 4)]
    source = [(0, 1), (1, 4)]
    a = align_spans(pivot, source)
    assert groups(a) == [(1, 2, 0, 1), (2, 3, 1, 2)]
    assert a.context_map().tolist() == [-1, 0, 1]


def test_segments_clip_and_anchor():
    # pivot text "[A]hello" with content at bytes 3..8, source "<x>hello" with content at 3..8
    pivot = [(0, 3), (3, 6), (6, 8)]
    source = [(0, 1), (1, 3), (3, 5), (5, 8)]
    a = align_spans(pivot, source, [[3, 8]], [[3, 8]])
    assert groups(a) == [(1, 3, 2, 4)]  # hel|lo vs he|llo -> n-m inside the segment
    assert a.anchor_pivot.tolist() == [0] and a.anchor_source.tolist() == [1]
    assert a.context_map().tolist() == [1, -1, 3]


def test_identity_alignment_with_own_tokenizer():
    for tok in (sentencepiece(), tekken()):
        s = scored(tok, PROSE + CODE + NON_LATIN, add_special=True)
        a = align_sample(s, s, tok, tok)
        assert a.kind_counts()["1-1"] == a.num_groups
        assert np.array_equal(a.pivot_start, a.source_start)
        assert np.array_equal(a.pivot_end, a.source_end)
        cmap = a.context_map()
        covered = cmap >= 0
        assert np.array_equal(cmap[covered], np.flatnonzero(covered))
        assert covered[1:].all()  # every text token; only a zero-width BOS may be left out


def test_byte_spans_split_multibyte_characters():
    tok = tekken()
    text = "a 🙂b"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"])
    spans = byte_spans(text, np.asarray(enc["offset_mapping"]), TokenTable.from_tokenizer(tok).nbytes(ids))
    # spans tile the UTF-8 bytes exactly, each as long as the token's bytes
    assert spans[0, 0] == 0 and spans[-1, 1] == len(text.encode())
    assert np.array_equal(spans[1:, 0], spans[:-1, 1])
    table = TokenTable.from_tokenizer(tok)
    assert b"".join(table.pieces[i] for i in ids) == text.encode()
    assert np.array_equal(spans[:, 1] - spans[:, 0], [len(table.pieces[i]) for i in ids])


# ------------------------------------------------------------------------------ real tokenizers

TEXTS = {"prose": PROSE, "code": CODE, "non_latin": NON_LATIN}


@pytest.mark.parametrize("kind", list(TEXTS))
@pytest.mark.parametrize("pivot_is_sp", [True, False])
def test_offsets_align_real_tokenizers(kind, pivot_is_sp):
    ptok, stok = (sentencepiece(), tekken()) if pivot_is_sp else (tekken(), sentencepiece())
    text = TEXTS[kind] * 3
    p, s = scored(ptok, text), scored(stok, text)
    a = align_sample(p, s, ptok, stok)
    cov = a.coverage
    assert cov["chars_aligned"] / cov["chars"] >= 0.999
    # groups tile both token sequences and cover the same bytes on each side
    assert a.pivot_start[0] == 0 and a.pivot_end[-1] == len(p.input_ids)
    assert a.source_start[0] == 0 and a.source_end[-1] == len(s.input_ids)
    assert np.array_equal(a.pivot_start[1:], a.pivot_end[:-1])
    assert np.array_equal(a.source_start[1:], a.source_end[:-1])
    pt, st = TokenTable.from_tokenizer(ptok), TokenTable.from_tokenizer(stok)
    for g in range(a.num_groups):
        pb = b"".join(pt.pieces[i] for i in p.input_ids[a.pivot_start[g] : a.pivot_end[g]])
        sb = b"".join(st.pieces[i] for i in s.input_ids[a.source_start[g] : a.source_end[g]])
        if g == 0:  # SentencePiece prefixes the first word with a space that is not in the text
            pb, sb = pb.lstrip(b" "), sb.lstrip(b" ")
        assert pb == sb, (g, pb, sb)
    print(
        f"\n{kind} {'sp->tekken' if pivot_is_sp else 'tekken->sp'}: {a.kind_counts()}, "
        f"chars in n-m groups {cov['chars_in_n_m'] / cov['chars']:.2%}"
    )


@pytest.mark.parametrize("kind,floor", [("prose", 0.98), ("code", 0.95), ("non_latin", 0.85)])
def test_dtw_agrees_with_offsets_on_most_groups(kind, floor):
    ptok, stok = sentencepiece(), tekken()
    text = TEXTS[kind] * 2
    p, s = scored(ptok, text), scored(stok, text)
    off = align_sample(p, s, ptok, stok, "offsets")
    dtw = align_sample(p, s, ptok, stok, "dtw")
    agree = len(off.group_tuples() & dtw.group_tuples()) / off.num_groups
    print(f"\n{kind}: dtw reproduces {agree:.1%} of the offsets groups")
    assert agree >= floor


def _reference_dtw(pp: list, sp: list, discount: float = 0.1, ties: str = "pivot"):
    """The reference code's approach, written independently: full matrix, Python loops, edit distance x
    ``discount`` on containment; backtracking prefers the diagonal, then a pivot step (``ties="pivot"``,
    FuseChat-2.0) or a source step (``"source"``, FuseChat-1.0 / FuseLLM)."""

    n, m = len(pp), len(sp)
    inf = float("inf")
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            a, b = pp[i - 1], sp[j - 1]
            cost = levenshtein(a, b) * (discount if (a in b or b in a) else 1.0)
            d[i][j] = cost + min(d[i - 1][j], d[i][j - 1], d[i - 1][j - 1])
    i, j, path = n, m, []
    while True:
        path.append((i - 1, j - 1))
        if i == 1 and j == 1:
            break
        step_p, step_s = ((i - 1, j), (i, j - 1)) if ties == "pivot" else ((i, j - 1), (i - 1, j))
        opts = [(i - 1, j - 1), step_p, step_s]
        vals = [d[a][b] for a, b in opts]
        i, j = opts[vals.index(min(vals))]
    return path[::-1]


def _groups_of_path(path):
    groups, cur = [], [path[0]]
    for a, b in zip(path, path[1:], strict=False):
        if b[0] == a[0] + 1 and b[1] == a[1] + 1:
            groups.append(cur)
            cur = []
        cur.append(b)
    groups.append(cur)
    return {(g[0][0], g[-1][0] + 1, g[0][1], g[-1][1] + 1) for g in groups}


def test_dtw_matches_plain_python_reference():
    ptok, stok = sentencepiece(), tekken()
    text = PROSE[:300] + CODE[:200] + NON_LATIN[:120]
    pids = ptok(text, add_special_tokens=False)["input_ids"]
    sids = stok(text, add_special_tokens=False)["input_ids"]
    pp = dtw_pieces(TokenTable.from_tokenizer(ptok), pids)
    sp = dtw_pieces(TokenTable.from_tokenizer(stok), sids)
    expected = _groups_of_path(_reference_dtw(pp, sp))
    for band in (None, 32):
        assert align_dtw(pp, sp, band=band).group_tuples() == expected
    # FuseChat-2.0: tokens decoded one by one, compared per character, no discount
    text = PROSE[:150] + " 🦊🦉 ∑x² → ∞ " + NON_LATIN[:60]
    pids = ptok(text, add_special_tokens=False)["input_ids"]
    sids = stok(text, add_special_tokens=False)["input_ids"]
    pp = dtw_pieces(TokenTable.from_tokenizer(ptok), pids)
    sp = dtw_pieces(TokenTable.from_tokenizer(stok), sids)
    expected = _groups_of_path(_reference_dtw(pp, sp))
    pd, sd = decoded_pieces(ptok, pids), decoded_pieces(stok, sids)
    assert "\ufffd" in "".join(pd + sd)  # pieces of multi-byte characters
    expected2 = _groups_of_path(_reference_dtw(pd, sd, discount=1.0))
    assert expected2 != expected
    lengths = (TokenTable.from_tokenizer(ptok).nbytes(pids), TokenTable.from_tokenizer(stok).nbytes(sids))
    for band in (None, 32):
        got = align_dtw(pd, sd, band=band, discount=1.0, text_lengths=lengths)
        assert got.group_tuples() == expected2
    # FuseChat-1.0's tie order (a source step first), on the reference's own strings: each tokenizer's
    # token strings with its whitespace marker removed
    pr = [t.replace("▁", "") for t in ptok.convert_ids_to_tokens(pids)]
    sr = [t.replace("Ġ", "") for t in stok.convert_ids_to_tokens(sids)]
    expected1 = _groups_of_path(_reference_dtw(pr, sr, ties="source"))
    assert align_dtw(pr, sr, band=None, ties="source").group_tuples() == expected1


def test_dtw_hand_built_groups():
    a = align_dtw([b"the", b"cat", b"s"], [b"the", b"cats"])
    assert sorted(a.group_tuples()) == [(0, 1, 0, 1), (1, 3, 1, 2)]
    assert a.kinds().tolist() == [0, 1]


def test_templates_that_differ_align_only_assistant_turns():
    ptok, stok = sentencepiece(), tekken()
    answers = ["Sure: the sum is 42.", "Δεν ξέρω, 🙂 sorry!"]
    ptext = f"<s>[INST] add them [/INST]{answers[0]}</s>[INST] again? [/INST]{answers[1]}</s>"
    stext = (
        f"<|im_start|>user\nadd them<|im_end|>\n<|im_start|>assistant\n{answers[0]}<|im_end|>\n"
        f"<|im_start|>user\nagain?<|im_end|>\n<|im_start|>assistant\n{answers[1]}<|im_end|>\n"
    )

    def spans(text):
        out, at = [], 0
        for ans in answers:
            at = text.index(ans, at)
            out.append((at, at + len(ans)))
            at += len(ans)
        return out

    p = scored(ptok, ptext, spans=spans(ptext))
    s = scored(stok, stext, spans=spans(stext))
    for method in ("offsets", "dtw"):
        a = align_sample(p, s, ptok, stok, method)
        assert a.coverage["chars_aligned"] == a.coverage["chars"] == sum(len(x) for x in answers)
        pt, st = TokenTable.from_tokenizer(ptok), TokenTable.from_tokenizer(stok)
        for g in range(a.num_groups):
            pb = b"".join(pt.pieces[i] for i in p.input_ids[a.pivot_start[g] : a.pivot_end[g]])
            sb = b"".join(st.pieces[i] for i in s.input_ids[a.source_start[g] : a.source_end[g]])
            # equal, except a token straddling the end of a turn (".<" of ".<|im_end|>"), clipped to it
            if method == "offsets":  # DTW groups are not byte-exact (that is the point of offsets)
                assert pb == sb or (sb.startswith(pb) and sb[len(pb) :] == b"<"), (pb, sb)
        ptxt = b"".join(
            pt.pieces[i] for g in range(a.num_groups) for i in p.input_ids[a.pivot_start[g] : a.pivot_end[g]]
        )
        assert ptxt.replace(b" ", b"") == "".join(answers).replace(" ", "").encode()
        # the position before each turn (last template token) predicts the turn's first token on both sides
        assert len(a.anchor_pivot) == 2
        for ap, as_ in zip(a.anchor_pivot, a.anchor_source, strict=True):
            assert ptok.convert_ids_to_tokens(int(p.input_ids[ap])).endswith("]")
            assert stok.convert_ids_to_tokens(int(s.input_ids[as_])) == "Ċ"


def test_unalignable_inputs_fail_with_one_line():
    ptok, stok = sentencepiece(), tekken()
    p = scored(ptok, "one text")
    s = scored(stok, "another text")
    with pytest.raises(AlignmentError, match="assistant spans"):
        align_sample(p, s, ptok, stok)
    with pytest.raises(ValueError, match="expected one of offsets, dtw"):
        align_sample(p, p, ptok, ptok, "fuzzy")
    s.input_ids = s.input_ids[::-1].copy()
    s.text = p.text = "same"
    with pytest.raises(AlignmentError, match="does not reproduce"):
        align_sample(scored(ptok, "same"), s, ptok, stok)


def test_clipped_tokens_give_no_context_pair_hand_built():
    # pivot "[A]ab." + "<e>" with the end marker its own token; source merges "." and "<" into ".<"
    # pivot: [A] | a | b | . | <e>      source: [A] | a | b | .< | e>
    pivot = [(0, 3), (3, 4), (4, 5), (5, 6), (6, 9)]
    source = [(0, 3), (3, 4), (4, 5), (5, 7), (7, 9)]
    a = align_spans(pivot, source, [[3, 6]], [[3, 6]])
    assert groups(a) == [(1, 2, 1, 2), (2, 3, 2, 3), (3, 4, 3, 4)]
    assert a.open_end().tolist() == [False, False, True]
    # pivot "." (position 3, predicting "<e>") must not take the source position after ".<"
    assert a.context_map().tolist() == [0, 1, 2, -1, -1]
    # a source token reaching before the segment ("]a") gives no anchor
    b = align_spans(pivot, [(0, 2), (2, 4), (4, 5), (5, 6)], [[3, 6]], [[3, 6]])
    assert b.open_start().tolist()[0] and b.anchor_pivot.size == 0


@pytest.mark.parametrize("pivot_is_smollm2", [True, False])
def test_end_marker_merged_across_the_turn_boundary_does_not_donate(
    smollm2_tokenizer, spm_tokenizer, pivot_is_smollm2
):
    """Issue 10, --all-positions: SmolLM2 renders ChatML with <|im_end|> special (``Paris.`` | ``<|im_end|>``);
    the 32k SentencePiece tokenizer reads the same marker as text and merges ``.<``. The position that
    predicts the end of the turn must keep the pivot's own distribution and CE, in both directions."""
    answer = "The capital of France is Paris."
    chat = f"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    smol_text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" + chat
    spm_text = chat  # a template without the default system prompt: the texts differ, turns are matched

    def sample_of(tok, text, seed):
        at = text.index(answer)
        return scored(tok, text, k=4, seed=seed, spans=[(at, at + len(answer))])  # every position scored

    smol, spm = sample_of(smollm2_tokenizer, smol_text, 1), sample_of(spm_tokenizer, spm_text, 2)
    assert ".<" in spm_tokenizer.convert_ids_to_tokens(spm.input_ids.tolist())
    pivot, source = (smol, spm) if pivot_is_smollm2 else (spm, smol)
    ptok, stok = (smollm2_tokenizer, spm_tokenizer) if pivot_is_smollm2 else (spm_tokenizer, smollm2_tokenizer)
    pt, st = TokenTable.from_tokenizer(ptok), TokenTable.from_tokenizer(stok)
    for method in ("offsets", "dtw", "dtw2"):
        a = align_sample(pivot, source, ptok, stok, method)
        out = align_distributions(pivot, source, a, ExactMatch(pt, st), k=4)
        ptoks = ptok.convert_ids_to_tokens(pivot.input_ids.tolist())
        # the pivot position whose token ends the answer: "." (SmolLM2) or ".<" (SentencePiece)
        last = max(i for i, tk in enumerate(ptoks) if tk in (".", ".<") and i < len(ptoks) - 1)
        row = int(np.flatnonzero(pivot.positions == last)[0])
        assert not out.from_source[row], (method, ptoks[last])
        assert np.array_equal(out.dist.ids[row], pivot.topk_ids[row])
        assert not out.gold_from_source[row]
        assert out.gold_nll[row] == pytest.approx(-float(pivot.gold_logprob[row]))
        # the answer's other positions still come from the source
        assert out.from_source[:row].sum() >= 5, method
