"""Inputs accepted must be inputs that work (issue 11, items 5, 6, 7, 9, 12, 13): everything that can fail
during extraction is found before scoring and named by line; generation marks are the loss mask;
over-long samples are cut before tokenising; the teacher's revision follows its weights; non-finite
scores and store failures are one line."""

from __future__ import annotations

import copy
import errno
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clients.cli import app
from clients.corpus import chat_samples, text_samples, write_jsonl
from clients.tiny_models import build_model
from datastore.chat import Sample, parse_record
from datastore.fs import list_logits
from datastore.reader import LogitsReader
from teacher_server import render
from teacher_server.render import render_chat, sample_problem, tokenize_sample
from teacher_server.weights import weights_revision
from tests.conftest import free_port as _free_port

pytestmark = pytest.mark.usefixtures("one_thread")

# Mistral-7B-Instruct-v0.1's template logic (none of the installed packages ships the file): user and
# assistant strictly alternate, starting with the user; anything else, a system message included, is refused.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# The same chat format with transformers' assistant-mask tags around what the assistant generates.
GENERATION = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST] ' }}{% elif message['role'] == 'system' %}"
    "{{ '[SYS] ' + message['content'] + ' ' }}{% else %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)
TRIGGER = " quantum"  # its embedding row is scaled so that fp16 activations overflow on it (not in fp32)
K = 4


def _chat(rid: str, *turns: tuple[str, str]) -> dict:
    return {"id": rid, "messages": [{"role": r, "content": c} for r, c in turns]}


def _valid(n: int, seed: int) -> list[dict]:
    """`n` generated chats without system messages (Mistral-v0.1 accepts them)."""
    out = []
    for rec in chat_samples(n, seed=seed, max_turns=2):
        rec["messages"] = [m for m in rec["messages"] if m["role"] != "system"]
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, spm_tokenizer) -> Path:
    """A tiny Mistral-shaped teacher with the Mistral-v0.1 chat template. TRIGGER's embedding row is
    scaled past float16's range (65504) with the LM head left as it was: in float32 and bfloat16 the final
    norm absorbs it and every log-probability is ordinary; in float16 the row is infinite and every
    position from it on is NaN."""
    out = tmp_path_factory.mktemp("teacher-v01")
    model = build_model("mistral", spm_tokenizer, seed=5, initializer_range=0.2)
    (trigger,) = spm_tokenizer(TRIGGER, add_special_tokens=False)["input_ids"][-1:]
    with torch.no_grad():
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.model.embed_tokens.weight[trigger] *= 1e6
    model.save_pretrained(out)
    tok = copy.deepcopy(spm_tokenizer)
    tok.chat_template = MISTRAL_V01
    tok.save_pretrained(out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Weight digests cached under the test's tmp path."""
    path = tmp_path / "cache" / "weight-digests.json"
    monkeypatch.setenv("LOGITFUSE_WEIGHTS_CACHE", str(path))
    return path


def _extract(*args: str):
    return CliRunner().invoke(app, ["extract", "--k", str(K), "--device", "cpu", *args])


def _one_error_line(result) -> str:
    """Exit 2 and one `error:` line last (after the progress bar, if scoring started), no traceback."""
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


# ------------------------------------------------------------------- item 5: validate what extraction runs


def test_sample_problem_names_each_kind_of_refusal(spm_tokenizer, tmp_path):
    ok = parse_record(_chat("a", ("user", "Hi"), ("assistant", "Hello.")))
    assert sample_problem(ok, spm_tokenizer, MISTRAL_V01, 64) is None
    system = parse_record(_chat("s", ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")))
    assert "roles must alternate" in sample_problem(system, spm_tokenizer, MISTRAL_V01, 64)
    # A lone surrogate (valid JSON "\ud800", not valid Unicode) in content or id: nothing downstream takes it.
    surrogate = Sample(id="x", messages=(ok.messages[0], type(ok.messages[1])("assistant", "bad \ud800 text")))
    assert "the rendered text has a lone UTF-16 surrogate '\\ud800'" in sample_problem(surrogate, spm_tokenizer,
                                                                                       MISTRAL_V01, 64)
    bad_id = Sample(id="id-\ud800", messages=ok.messages)
    assert "'id'" in sample_problem(bad_id, spm_tokenizer, MISTRAL_V01, 64)
    text = Sample(id="t", text="plain \udfff")
    assert "lone UTF-16 surrogate '\\udfff'" in sample_problem(text, spm_tokenizer, None, 64)
    # A template that alters private-use characters in assistant content cannot be masked exactly.
    altering = tmp_path / "alter.jinja"
    altering.write_text("{% for m in messages %}{{ m['content'] | replace('\ue000', '?') }}\n{% endfor %}")
    pua = parse_record(_chat("p", ("user", "q"), ("assistant", "private \ue000 use")))
    assert "changes assistant content" in sample_problem(pua, spm_tokenizer, str(altering.read_text()), 64)


@pytest.mark.parametrize("tok_name", ["spm_tokenizer", "bpe_tokenizer"])
def test_private_use_characters_in_chats_render_and_mask_exactly(request, tok_name):
    """Private-use characters (including the renderer's former markers "\\ue000<n>\\ue001" and the markers it
    picks now) are ordinary text: rendered as the template says, masked exactly."""
    tok = request.getfixturevalue(tok_name)
    tricky = "x \ue0000\ue001 y \U000f0000\U000f0001\U000f0002\U000f0003 z \ue001"
    sample = parse_record(_chat("p", ("user", f"user {tricky}"), ("assistant", f"answer {tricky}"),
                                ("user", "\ue0001\ue001"), ("assistant", "ok")))
    text, spans = render_chat(sample.messages, MISTRAL_V01, tok)
    ref = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in sample.messages],
                                  chat_template=MISTRAL_V01, tokenize=False)
    assert text == ref  # transformers' own rendering of the template
    assert [text[s:e] for s, e in spans] == [f"answer {tricky}", "ok"]
    ts = tokenize_sample(sample, tok, MISTRAL_V01, 4096)
    assert ts.loss_mask.any() and np.array_equal(ts.positions, np.flatnonzero(ts.loss_mask[1:]))


def test_cli_reports_refused_samples_by_line_and_skip_invalid_skips_them(tmp_path, teacher):
    valid = _valid(49, seed=8)
    bad = [
        _chat("sys", ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")),  # line 50: template
        _chat("sur", ("user", "Hi"), ("assistant", "lone \ud800 surrogate")),  # line 51
        _chat("id-\ud800", ("user", "Hi"), ("assistant", "Hello.")),  # line 52
    ]
    data = tmp_path / "d.jsonl"
    # ensure_ascii keeps "\ud800" as the JSON escape a client would send
    data.write_text("".join(json.dumps(r) + "\n" for r in valid + bad), encoding="utf-8")
    store = str(tmp_path / "store")

    line = _one_error_line(_extract("--teacher", str(teacher), "--dataset", str(data), "--store", store))
    assert "line 51" in line and "line 52" in line and "--skip-invalid" in line
    assert "line 51: messages[1] content has a lone UTF-16 surrogate '\\ud800'" in line
    assert list_logits(store) == []  # nothing stored by a rejected run

    only_system = write_jsonl(valid[:3] + bad[:1], tmp_path / "sys.jsonl")
    line = _one_error_line(_extract("--teacher", str(teacher), "--dataset", str(only_system), "--store", store))
    assert "line 4" in line and "roles must alternate" in line and "'sys'" in line
    assert list_logits(store) == []

    ok = _extract("--teacher", str(teacher), "--dataset", str(data), "--store", store, "--skip-invalid")
    assert ok.exit_code == 0, ok.output
    assert "49 samples scored" in ok.output and "skipped" in ok.output
    (m,) = list_logits(store)
    assert m.num_samples == 49 and m.complete
    assert sorted(s.sample_id for s in LogitsReader(f"{store}/logits/{m.logits_id}").iter_samples()) == sorted(r["id"] for r in valid)


def test_a_sample_with_no_position_left_to_score_is_refused_by_line(tmp_path, teacher):
    """A chat cut at --max-length before its first assistant token has nothing to score: it is refused like
    any invalid sample (line and reason, exit 2, nothing stored), skipped by --skip-invalid, and kept with
    --all-positions (then its prompt is scored). It used to crash extract with a numpy traceback."""
    short = [_chat(f"s{i}", ("user", "Hi"), ("assistant", "Hello.")) for i in range(3)]
    long = _chat("long", ("user", "tell me " * 60), ("assistant", "Yes."))
    data = write_jsonl(short + [long], tmp_path / "d.jsonl")
    store = str(tmp_path / "store")
    args = ("--teacher", str(teacher), "--dataset", str(data), "--store", store, "--max-length", "32")
    line = _one_error_line(_extract(*args))
    assert "line 4" in line and "'long'" in line and "cut at max_length=32" in line and "--skip-invalid" in line
    assert list_logits(store) == []
    ok = _extract(*args, "--skip-invalid")
    assert ok.exit_code == 0, ok.output
    (m,) = list_logits(store)
    assert m.num_samples == 3 and m.complete
    every = _extract(*args, "--all-positions")
    assert every.exit_code == 0, every.output
    stored = {m.logits_id: m for m in list_logits(store)}
    (m,) = [m for m in stored.values() if m.num_samples == 4]
    sample = LogitsReader(f"{store}/logits/{m.logits_id}").get("long")
    assert sample.truncated and len(sample.positions) == 31


def test_extract_options_out_of_range_and_a_store_that_is_a_file_fail_before_the_model_loads(tmp_path, teacher):
    data = write_jsonl(_valid(2, seed=4), tmp_path / "d.jsonl")
    a_file = tmp_path / "a-file"
    a_file.write_text("kept\n")
    store = str(tmp_path / "store")
    base = ("--teacher", str(teacher), "--dataset", str(data))
    cases = [
        (("--store", store, "--k", "1025"), "--k 1025: must be between 1 and 1024"),
        (("--store", store, "--batch-tokens", "0"), "--batch-tokens 0: must be at least 1"),
        (("--store", str(a_file)), f"store {a_file}: a file is there, not a directory"),
        (("--store", str(a_file / "sub")), f"{a_file} is a file, not a directory"),
    ]
    for args, needle in cases:
        result = CliRunner().invoke(app, ["extract", "--device", "cpu", *base, *args])
        line = _one_error_line(result)
        assert needle in line, line
    assert not (tmp_path / "store").exists() and a_file.read_text() == "kept\n"


# ------------------------------------------------------------------- item 6: {% generation %} marks


@pytest.mark.parametrize("tok_name", ["spm_tokenizer", "bpe_tokenizer"])
def test_generation_marks_are_the_loss_mask(request, tok_name):
    """The loss mask of a template with {% generation %} is transformers' assistant mask for it."""
    tok = request.getfixturevalue(tok_name)
    record = _chat("g", ("system", "Be brief."), ("user", "Where does the otter live?"),
                   ("assistant", "In the río delta — 川."), ("user", "And the owl?"), ("assistant", "In the birch grove."))
    ts = tokenize_sample(parse_record(record), tok, GENERATION, 4096)
    ref = tok.apply_chat_template(record["messages"], chat_template=GENERATION, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert ts.input_ids.tolist() == list(ref["input_ids"])
    assert ts.loss_mask.astype(int).tolist() == list(ref["assistant_masks"])
    assert ts.loss_mask.sum() > 10 and np.array_equal(ts.positions, np.flatnonzero(ts.loss_mask[1:]))
    # The assistant contents are still located exactly (stored for alignment).
    assert [ts.text[s:e] for s, e in ts.assistant_spans.tolist()] == ["In the río delta — 川.", "In the birch grove."]


def test_generation_marks_cover_what_the_template_puts_inside(spm_tokenizer):
    """Marks decide the mask, not the message boundaries: a template that marks only the last assistant
    turn trains on that turn alone."""
    last_only = GENERATION.replace(
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}",
        "{% if loop.last %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}")
    record = _chat("g", ("user", "One?"), ("assistant", "First answer."), ("user", "Two?"), ("assistant", "Second."))
    ts = tokenize_sample(parse_record(record), spm_tokenizer, last_only, 4096)
    masked = spm_tokenizer.decode(ts.input_ids[ts.loss_mask].tolist())
    assert masked.strip() == "Second.</s>"


# ------------------------------------------------------------------- item 7: cut before tokenising


@pytest.mark.parametrize("tok_name", ["spm_tokenizer", "bpe_tokenizer"])
def test_over_long_samples_are_cut_before_tokenising_with_the_same_result(request, tok_name, inst_template,
                                                                          monkeypatch):
    tok = request.getfixturevalue(tok_name)
    prose = " ".join(s["text"] for s in text_samples(60, seed=2))
    long_chat = parse_record(_chat("c", ("user", "Tell me everything."), ("assistant", prose * 2)))
    long_text = parse_record({"id": "t", "text": "  ".join([prose] * 2)})
    seen: list[int] = []
    real = render._tokenize
    monkeypatch.setattr(render, "_tokenize", lambda text, t: (seen.append(len(text)), real(text, t))[1])
    for sample in (long_chat, long_text):
        full = tokenize_sample(sample, tok, inst_template, 10**9)  # the whole text, as before
        for max_length in (7, 300):
            seen.clear()
            cut = tokenize_sample(sample, tok, inst_template, max_length)
            assert cut.truncated and len(cut.input_ids) == max_length
            assert np.array_equal(cut.input_ids, full.input_ids[:max_length])
            assert np.array_equal(cut.loss_mask, full.loss_mask[:max_length])
            assert np.array_equal(cut.positions, full.positions[full.positions < max_length - 1])
            assert cut.text == full.text
            assert seen == [(max_length + render._CUT_MARGIN) * 8] and seen[0] < len(full.text) / 10
    # A sample that fits is tokenised whole, once.
    short = parse_record(_chat("s", ("user", "Hi"), ("assistant", prose[:2000])))
    seen.clear()
    fit = tokenize_sample(short, tok, inst_template, 4096)
    assert not fit.truncated and seen == [len(fit.text)]


@pytest.mark.parametrize("tok_name", ["spm_tokenizer", "bpe_tokenizer"])
def test_batched_tokenising_gives_what_one_sample_at_a_time_gives(request, tok_name, inst_template):
    """`tokenize_samples` (the input check and extraction tokenise a batch per tokenizer call) returns,
    sample by sample, what `tokenize_sample` returns or raises: a refused text in a batch, an over-long
    text cut before tokenising and a template refusal included."""
    from datastore.errors import UserError

    tok = request.getfixturevalue(tok_name)
    samples = [parse_record(r) for r in chat_samples(30, seed=5, max_turns=3) + text_samples(5, seed=2)]
    prose = " ".join(s["text"] for s in text_samples(20, seed=3))
    samples[7:7] = [Sample(id="bad", text="lone \udfff here"), parse_record({"id": "long", "text": prose * 3})]
    template = inst_template.replace("{% for", "{% if messages|length > 5 %}{{ raise_exception('too long') }}"
                                     "{% endif %}{% for", 1)
    for all_positions in (False, True):
        got = render.tokenize_samples(samples, tok, template, 96, all_positions, batch_size=8)
        assert len(got) == len(samples)
        refused = 0
        for sample, g in zip(samples, got, strict=True):
            try:
                ref = tokenize_sample(sample, tok, template, 96, all_positions)
            except UserError as e:
                assert isinstance(g, UserError) and str(g) == str(e)
                refused += 1
                continue
            assert not isinstance(g, UserError), g
            assert g.sample_id == ref.sample_id and g.text == ref.text and g.truncated == ref.truncated
            for name in ("input_ids", "loss_mask", "positions", "assistant_spans"):
                np.testing.assert_array_equal(getattr(g, name), getattr(ref, name))
        assert refused >= 2 and any(g.truncated for g in got if not isinstance(g, UserError))


# ------------------------------------------------------------------- item 9: teacher identity


def test_resaved_weights_get_a_new_revision_and_new_logits(tmp_path, spm_tokenizer, cache):
    copy_dir = tmp_path / "teacher"
    build_model("mistral", spm_tokenizer, seed=2).save_pretrained(copy_dir)
    tok = copy.deepcopy(spm_tokenizer)
    tok.chat_template = MISTRAL_V01
    tok.save_pretrained(copy_dir)
    data = write_jsonl(_valid(4, seed=3), tmp_path / "d.jsonl")
    store = str(tmp_path / "store")
    first = _extract("--teacher", str(copy_dir), "--dataset", str(data), "--store", store)
    assert first.exit_code == 0, first.output
    rev = weights_revision(copy_dir)
    assert cache.is_file()

    from safetensors.torch import load_file, save_file

    (weights,) = copy_dir.glob("*.safetensors")
    size = weights.stat().st_size
    tensors = load_file(weights)
    save_file({k: v * 3 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size  # same names, shapes and dtypes: only the values differ
    assert weights_revision(copy_dir) != rev

    again = _extract("--teacher", str(copy_dir), "--dataset", str(data), "--store", store)
    assert again.exit_code == 0, again.output
    assert "4 samples scored, 0 already stored" in again.output
    assert len(list_logits(store)) == 2


def test_digests_are_cached_by_path_size_mtime_and_ctime(tmp_path, cache, monkeypatch):
    from teacher_server import weights

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    blob = model / "model.safetensors"
    blob.write_bytes(os.urandom(1 << 16))
    calls: list[str] = []
    real = weights.file_digest
    monkeypatch.setattr(weights, "file_digest", lambda p: (calls.append(p), real(p))[1])
    old_umask = os.umask(0o027)
    try:
        rev = weights_revision(model)
    finally:
        os.umask(old_umask)
    assert len(calls) == 1 and (cache.stat().st_mode & 0o777) == 0o640  # the umask's permissions
    assert weights_revision(model) == rev and len(calls) == 1  # cached: not read again
    # Rewritten in place with the old size and mtime restored: the ctime moved, so it is hashed again.
    time.sleep(0.05)  # file timestamps tick every few ms: let the ctime of the rewrite differ
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_revision(model) != rev and len(calls) == 2
    # A corrupt cache only costs a re-hash.
    cache.write_text("{not json")
    assert weights_revision(model) != rev and len(calls) == 3
    assert not list(cache.parent.glob("*.tmp"))


# ------------------------------------------------------------------- item 12: non-finite scores


def test_fp16_overflow_names_the_sample_and_the_others_are_stored(tmp_path, teacher):
    records = _valid(5, seed=4)
    records.insert(2, _chat("hot", ("user", "What is a quantum?"), ("assistant", f"A{TRIGGER} is small.")))
    data = write_jsonl(records, tmp_path / "d.jsonl")
    store = str(tmp_path / "store")
    line = _one_error_line(_extract("--teacher", str(teacher), "--dataset", str(data), "--store", store,
                                    "--dtype", "float16"))
    assert "line 3" in line and "'hot'" in line and "bfloat16" in line and "non-finite" in line
    (m,) = list_logits(store)
    assert m.num_samples == 5 and not m.complete  # every other sample is stored; the run is not complete

    skipped = _extract("--teacher", str(teacher), "--dataset", str(data), "--store", str(tmp_path / "s2"),
                       "--dtype", "float16", "--skip-invalid")
    assert skipped.exit_code == 0 and "skipped 1 sample scored non-finite" in skipped.output, skipped.output

    fixed = _extract("--teacher", str(teacher), "--dataset", str(data), "--store", store, "--dtype", "bfloat16")
    assert fixed.exit_code == 0, fixed.output
    assert "1 sample scored, 5 already stored" in fixed.output  # only the overflowed sample is re-scored
    (m,) = list_logits(store)
    assert m.num_samples == 6 and m.complete


# ------------------------------------------------------------------- item 13: store failures


def test_disk_full_is_one_line_and_leaves_no_temporary_files(tmp_path, teacher, monkeypatch):
    data = write_jsonl(_valid(3, seed=1), tmp_path / "d.jsonl")
    store = tmp_path / "store"

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # what a full disk reports when the data is flushed
    line = _one_error_line(_extract("--teacher", str(teacher), "--dataset", str(data), "--store", str(store)))
    assert "no space left" in line and str(store) in line
    assert not [p for p in store.rglob("*") if p.name.startswith(".tmp")]


def test_missing_bucket_and_unreachable_endpoint_are_one_line(tmp_path, teacher, s3_store, monkeypatch):
    s3 = s3_store
    data = write_jsonl(_valid(2, seed=1), tmp_path / "d.jsonl")
    bucket = s3.split("/")[2]
    line = _one_error_line(_extract("--teacher", str(teacher), "--dataset", str(data), "--store",
                                    s3.replace(bucket, "no-such-bucket")))
    assert "bucket 'no-such-bucket' does not exist" in line

    port = _free_port()  # nothing listens there
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    line = _one_error_line(_extract("--teacher", str(teacher), "--dataset", str(data), "--store", s3))
    assert "cannot reach the S3 endpoint" in line and str(port) in line


# ------------------------------------------------------------------- the same checks in a service job


@pytest.mark.slow
def test_service_job_names_refused_lines_and_skip_invalid_uploads_skip_them(tmp_path, teacher):
    """Uploads name no teacher; a job checks its dataset against the teacher's template and tokenizer
    before scoring: it fails at once with one line naming the line, nothing stored, or (dataset uploaded
    with skip_invalid) scores the rest."""
    from clients.client import TeacherClient, run_local_service

    records = _valid(6, seed=9)
    records.insert(3, _chat("sys", ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")))
    data = write_jsonl(records, tmp_path / "d.jsonl")
    cfg = {"store": str(tmp_path / "store"), "state_dir": str(tmp_path / "state"),
           "teachers": [{"name": "v01", "model": str(teacher), "backend": "hf", "max_k": 8, "max_length": 256,
                         "shard_rows": 4, "batch_tokens": 2048}]}
    with run_local_service(cfg, log_path=tmp_path / "serve.log") as url, TeacherClient(url) as client:
        strict = client.upload(data)
        assert strict["samples"] == 7  # structurally valid: the upload cannot know the teacher
        failed = client.wait(client.submit(strict["id"], "v01", k=K)["id"], progress=False, timeout=300)
        assert failed["state"] == "failed", failed
        (error,) = failed["errors"]
        assert "line 4" in error and "roles must alternate" in error and "\n" not in error
        assert list_logits(str(tmp_path / "store")) == []

        # (a dataset keeps the skip_invalid of its first upload: upload other bytes to change it)
        lenient = client.upload(write_jsonl(records[:-1], tmp_path / "d2.jsonl"), skip_invalid=True)
        done = client.wait(client.submit(lenient["id"], "v01", k=K)["id"], progress=False, timeout=300)
        assert done["state"] == "done", done
    (m,) = list_logits(str(tmp_path / "store"))
    assert m.num_samples == 5 and m.complete
