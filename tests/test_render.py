"""Chat rendering and tokenisation: assistant spans, loss mask, scored positions, truncation."""

from __future__ import annotations

import numpy as np
import pytest

from datastore.chat import parse_record
from datastore.errors import UserError
from teacher_server.render import render_chat, resolve_template, tokenize_sample, tokenizer_fingerprint

CHAT = {
    "id": "c1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where does the otter live?"},
        {"role": "assistant", "content": "The otter lives in the río delta — 川."},
        {"role": "user", "content": "And the owl?"},
        {"role": "assistant", "content": "In the birch grove."},
    ],
}


@pytest.mark.parametrize("tok_name", ["spm_tokenizer", "bpe_tokenizer"])
@pytest.mark.parametrize("template", ["inst", "chatml"])
def test_loss_mask_covers_exactly_the_assistant_turns(request, tok_name, template):
    tok = request.getfixturevalue(tok_name)
    sample = parse_record(CHAT)
    ts = tokenize_sample(sample, tok, resolve_template(template, tok), max_length=4096)
    contents = [m.content for m in sample.messages if m.role == "assistant"]
    assert [ts.text[s:e] for s, e in ts.assistant_spans.tolist()] == contents
    # Tokens wholly inside an assistant content are targets; tokens wholly outside every assistant turn
    # (and its end-of-turn token) are not; a token straddling the boundary (".<" before "<|im_end|>") is.
    enc = tok(ts.text, add_special_tokens=False, return_offsets_mapping=True)
    assert np.array_equal(np.asarray(enc["input_ids"]), ts.input_ids)
    eos = tok.eos_token if template == "inst" else ""
    for (s, e), masked in zip(enc["offset_mapping"], ts.loss_mask, strict=True):
        inside = any(a <= s and e <= b for a, b in ts.assistant_spans.tolist())
        touches = any(s < b + len(eos) and e > a for a, b in ts.assistant_spans.tolist())
        if inside and e > s:
            assert masked, (s, e, ts.text[s:e])
        if not touches:
            assert not masked, (s, e, ts.text[s:e])
    if template == "inst":  # no straddling tokens here: the masked runs decode to the contents exactly
        runs = np.split(np.flatnonzero(ts.loss_mask), np.flatnonzero(np.diff(np.flatnonzero(ts.loss_mask)) > 1) + 1)
        assert [tok.decode(ts.input_ids[r].tolist()).strip() for r in runs] == [c + eos for c in contents]
    # Default positions: exactly those whose next token is a target.
    assert np.array_equal(ts.positions, np.flatnonzero(ts.loss_mask[1:]))
    assert ts.positions.dtype == np.int32 and not ts.truncated


def test_plain_text_scores_every_position(spm_tokenizer):
    ts = tokenize_sample(parse_record({"id": "t", "text": "The fox eats berries."}), spm_tokenizer, None, 4096)
    assert ts.input_ids[0] == spm_tokenizer.bos_token_id
    assert ts.loss_mask[1:].all() and not ts.loss_mask[0]
    assert np.array_equal(ts.positions, np.arange(len(ts.input_ids) - 1))


def test_truncation_is_counted_and_all_positions(spm_tokenizer, inst_template):
    sample = parse_record(CHAT)
    full = tokenize_sample(sample, spm_tokenizer, inst_template, 4096)
    cut = tokenize_sample(sample, spm_tokenizer, inst_template, 20, all_positions=True)
    assert cut.truncated and len(cut.input_ids) == 20
    assert np.array_equal(cut.input_ids, full.input_ids[:20])
    assert np.array_equal(cut.positions, np.arange(19))


def test_template_errors_are_one_line(spm_tokenizer, tmp_path):
    with pytest.raises(UserError, match="has no chat template"):
        resolve_template("model", spm_tokenizer)
    with pytest.raises(UserError, match="not a shared template"):
        resolve_template("no-such-template", spm_tokenizer)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor: refused once, up front
    with pytest.raises(UserError, match="does not compile"):
        resolve_template(str(broken), spm_tokenizer)
    stripping = tmp_path / "strip.jinja"
    stripping.write_text("{% for m in messages %}{{ m['content'] | trim }}\n{% endfor %}")
    record = {"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " padded "}]}
    with pytest.raises(UserError, match="changes assistant content"):
        render_chat(parse_record(record).messages, resolve_template(str(stripping), spm_tokenizer), spm_tokenizer)


def test_fingerprints_differ_between_tokenizers(spm_tokenizer, bpe_tokenizer):
    assert tokenizer_fingerprint(spm_tokenizer) == tokenizer_fingerprint(spm_tokenizer)
    assert tokenizer_fingerprint(spm_tokenizer) != tokenizer_fingerprint(bpe_tokenizer)
