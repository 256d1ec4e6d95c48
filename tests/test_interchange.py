"""`store export` read back by other tools' own readers; `store import` of vLLM prompt_logprobs and of the export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clients.cli import app
from datastore import LogitsReader, LogitsWriter, UserError, logits_id, logits_uri
from datastore.fs import save_tokenizer
from datastore.interchange import PAD_LOGPROB, export_dataset, import_dataset
from datastore.sample import ScoredSample
from datastore.tokenizers import tokenizer_fingerprint
from tests.test_datastore import BOUND, K, meta, sample


def stored_meta(tokenizer):
    return meta(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))


@pytest.fixture(scope="module")
def stored(tmp_path_factory, spm_tokenizer) -> tuple[str, list[ScoredSample]]:
    """Five samples (one with assistant spans, one with no scored position) in a local store, with their
    tokenizer stored as an extract stores it."""
    m = stored_meta(spm_tokenizer)
    uri = logits_uri(str(tmp_path_factory.mktemp("store")), logits_id(m))
    samples = [sample(i) for i in range(4)]
    samples[1].assistant_spans = np.array([[1, 3], [4, 6]], dtype=np.int32)
    samples[2].truncated = True
    empty = sample(9, n_tokens=6)
    empty.loss_mask[:] = False
    empty.positions = np.zeros(0, np.int32)
    empty.topk_ids, empty.topk_logprobs = np.zeros((0, K), np.int32), np.zeros((0, K), np.float32)
    empty.gold_logprob = np.zeros(0, np.float32)
    samples.append(empty)
    with LogitsWriter(uri, m, shard_rows=2) as w:
        for s in samples:
            w.write(s)
    save_tokenizer(uri, spm_tokenizer)
    return uri, list(LogitsReader(uri).iter_samples())  # the stored (dequantised) values


def test_parquet_export_reads_back_with_datasets_and_polars(stored, tmp_path):
    import datasets
    import polars as pl

    uri, samples = stored
    out = tmp_path / "pq"
    assert export_dataset(uri, "parquet", out, rows_per_file=2) == 5
    files = sorted(str(p) for p in out.glob("*.parquet"))
    assert [Path(f).name for f in files] == [f"data-0000{i}-of-00003.parquet" for i in range(3)]
    by_hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf_cache"))
    by_polars = pl.read_parquet(files)
    assert by_hf.num_rows == by_polars.height == 5
    for i, s in enumerate(samples):
        for row in (by_hf[i], by_polars.row(i, named=True)):
            assert row["sample_id"] == s.sample_id and row["text"] == s.text and row["truncated"] == s.truncated
            assert list(row["input_ids"]) == s.input_ids.tolist() and list(row["loss_mask"]) == s.loss_mask.tolist()
            assert list(row["positions"]) == s.positions.tolist()
            assert [list(r) for r in row["topk_ids"]] == s.topk_ids.tolist()
            np.testing.assert_array_equal(np.asarray([list(r) for r in row["topk_logprobs"]], np.float32).reshape(-1, K)
                                          if len(s.positions) else np.zeros((0, K), np.float32), s.topk_logprobs)
            np.testing.assert_array_equal(np.asarray(row["gold_logprob"], np.float32), s.gold_logprob)
            assert [list(r) for r in row["assistant_spans"]] == s.assistant_spans.tolist()


def test_axolotl_export_has_the_kd_plugin_columns_aligned_to_next_tokens(stored, tmp_path):
    import polars as pl

    uri, samples = stored
    export_dataset(uri, "axolotl", tmp_path / "ax")
    table = pl.read_parquet(sorted(str(p) for p in (tmp_path / "ax").glob("*.parquet")))
    assert {"input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"} <= set(table.columns)
    for i, s in enumerate(samples):
        row = table.row(i, named=True)
        t = len(s.input_ids)
        ids, lps, mask = (np.asarray(row[c]) for c in ("target_token_ids", "target_logprobs", "target_mask"))
        assert ids.shape == lps.shape == mask.shape == (t, K)
        assert row["labels"] == np.where(s.loss_mask, s.input_ids, -100).tolist()
        assert row["attention_mask"] == [1] * t
        np.testing.assert_array_equal(ids[s.positions], s.topk_ids)  # row t: distribution of input_ids[t + 1]
        np.testing.assert_array_equal(lps[s.positions].astype(np.float32), s.topk_logprobs)
        assert (mask[s.positions] == s.loss_mask[s.positions + 1][:, None]).all()
        others = np.setdiff1d(np.arange(t), s.positions)
        assert (mask[others] == 0).all() and (lps[others] == np.float32(PAD_LOGPROB)).all() and (mask[-1] == 0).all()


def test_hf_export_loads_from_disk(stored, tmp_path):
    import datasets

    uri, samples = stored
    result = CliRunner().invoke(app, ["store", "export", uri, "--format", "hf", "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "exported 5 samples" in result.output
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert ds.num_rows == 5 and ds["sample_id"] == [s.sample_id for s in samples]
    for row, s in zip(ds, samples, strict=True):
        assert row["input_ids"] == s.input_ids.tolist() and row["topk_ids"] == s.topk_ids.tolist()
        np.testing.assert_array_equal(np.asarray(row["gold_logprob"], np.float32), s.gold_logprob)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no cache or stage left beside it


def test_export_of_an_incomplete_dataset_says_so(tmp_path):
    partial = logits_uri(str(tmp_path / "store"), logits_id(meta()))
    w = LogitsWriter(partial, meta(), shard_rows=2)  # two samples committed, the writer never closed
    for i in range(2):
        w.write(sample(i))
    result = CliRunner().invoke(app, ["store", "export", partial, "--format", "parquet", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "exported 2 samples" in result.output and "the dataset is incomplete" in result.output


def test_export_errors_and_overwrite(stored, tmp_path):
    uri, _ = stored
    with pytest.raises(UserError, match=r"unknown export format 'csv': expected one of parquet, axolotl, hf"):
        export_dataset(uri, "csv", tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(UserError, match=r"exists and is not an empty directory \(--overwrite replaces it\)"):
        export_dataset(uri, "parquet", tmp_path / "busy")
    export_dataset(uri, "parquet", tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "f").exists() and list((tmp_path / "busy").glob("*.parquet"))
    # --overwrite never deletes what it reads: not the store holding the dataset, not the dataset itself,
    # and nothing is written inside the dataset (found by a tester: the whole store was replaced)
    store = Path(uri).parent.parent
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    for out, how in [(store, "holds the input"), (Path(uri), "is the input"), (Path(uri) / "x", "lies inside the input")]:
        with pytest.raises(UserError, match=f"--out {re.escape(str(out))} {how} {re.escape(str(Path(uri)))};"):
            export_dataset(uri, "parquet", out, overwrite=True)
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before
    assert len(list(LogitsReader(uri).iter_samples())) == 5


def test_parquet_export_imports_back_into_the_same_dataset(stored, tmp_path, spm_tokenizer):
    uri, samples = stored
    export_dataset(uri, "parquet", tmp_path / "pq", rows_per_file=10)
    (file,) = (tmp_path / "pq").glob("*.parquet")
    report = import_dataset(file, "parquet", str(tmp_path / "store2"))
    assert report.uri == logits_uri(str(tmp_path / "store2"), logits_id(stored_meta(spm_tokenizer)))
    assert report.written == 5
    # the export's tokenizer/ came along: the imported dataset is usable by fusion and the trainer
    assert tokenizer_fingerprint(LogitsReader(report.uri).tokenizer()) == tokenizer_fingerprint(spm_tokenizer)
    back = list(LogitsReader(report.uri).iter_samples())
    for a, b in zip(back, samples, strict=True):
        assert a.sample_id == b.sample_id
        for name in ("input_ids", "loss_mask", "positions", "topk_ids", "topk_logprobs", "gold_logprob"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)  # on the codec grid: exact
        np.testing.assert_array_equal(a.assistant_spans, b.assistant_spans)
        assert (a.text, a.truncated) == (b.text, b.truncated)
    again = import_dataset(file, "parquet", str(tmp_path / "store2"))
    assert (again.written, again.already_stored) == (0, 5)


# ---- vLLM's OpenAI-compatible prompt_logprobs ----


def vllm_response(s: ScoredSample, vocab: int, rng) -> dict:
    """What vLLM's /v1/completions returns for the sample's tokens with prompt_logprobs=K and
    return_token_ids: the top K of every prompt position, plus the prompt token when it is not among them."""
    entries: list[dict | None] = [None]
    for t in range(len(s.input_ids) - 1):
        top = rng.choice(vocab, K, replace=False)
        lps = np.sort(-rng.exponential(2.0, K))[::-1]
        entry = {str(int(tok)): {"logprob": float(lp), "rank": r + 1, "decoded_token": "x"}
                 for r, (tok, lp) in enumerate(zip(top, lps, strict=True))}
        gold = int(s.input_ids[t + 1])
        if str(gold) not in entry:
            entry[str(gold)] = {"logprob": float(lps[-1] - 1.0), "rank": int(K + 1 + rng.integers(0, 50)),
                                "decoded_token": "y"}
        entries.append(entry)
    return {"id": f"cmpl-{s.sample_id}", "object": "text_completion", "created": 0, "model": "teacher-7b",
            "choices": [{"index": 0, "text": "", "prompt_logprobs": entries,
                         "prompt_token_ids": s.input_ids.tolist(), "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(s.input_ids), "total_tokens": len(s.input_ids)}}


def test_vllm_prompt_logprobs_import_round_trip_and_bad_lines(tmp_path, spm_tokenizer):
    rng = np.random.default_rng(0)
    vocab = len(spm_tokenizer)
    sources = []
    for i in range(4):
        ids = rng.integers(0, vocab, 12).astype(np.int32)
        sources.append(ScoredSample(f"s{i}", ids, np.ones(12, bool), np.arange(11, dtype=np.int32),
                                    np.zeros((11, K), np.int32), np.zeros((11, K), np.float32), np.zeros(11, np.float32)))
    responses = [vllm_response(s, vocab, rng) for s in sources]
    good_lines = [json.dumps(responses[0]), json.dumps(responses[1])]
    # a `vllm run-batch` output line carries its custom_id
    good_lines.append(json.dumps({"id": "b", "custom_id": "s2", "response": {"status_code": 200, "body": responses[2]},
                                  "error": None}))
    no_ids = json.loads(json.dumps(responses[3]))
    del no_ids["choices"][0]["prompt_token_ids"]
    nan = json.loads(json.dumps(responses[3]))
    first = next(iter(nan["choices"][0]["prompt_logprobs"][4]))
    nan["choices"][0]["prompt_logprobs"][4][first]["logprob"] = float("nan")
    lacking = json.loads(json.dumps(responses[3]))
    gold = str(int(sources[3].input_ids[3]))
    lacking["choices"][0]["prompt_logprobs"][3].pop(gold, None)
    huge = json.loads(json.dumps(responses[3]))
    huge["choices"][0]["prompt_token_ids"][2] = 10**30
    bad_lines = [json.dumps(no_ids), "{not json", json.dumps(nan), json.dumps(lacking),
                 good_lines[0],  # repeats s0
                 "[" * 100000 + "]" * 100000, json.dumps(huge)]
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(good_lines + bad_lines) + "\n")
    store = str(tmp_path / "store")

    result = CliRunner().invoke(app, ["store", "import", str(path), "--format", "vllm", "--store", store,
                                            "--tokenizer", spm_tokenizer.name_or_path])
    assert result.exit_code == 2
    for line, reason in [(4, r"choices\[0\].prompt_token_ids missing"), (5, "Expecting property name"),
                         (6, r"prompt_logprobs\[4\]\[\d+\]: logprob nan is not a finite value"),
                         (7, rf"prompt_logprobs\[3\] lacks the prompt token {gold}"), (8, "duplicate sample id 'cmpl-s0'"),
                         (9, "maximum recursion depth|expected a JSON object"), (10, r"choices\[0\]\.prompt_token_ids\[2\] = 1000000000000000000000000000000 is not a token id")]:
        assert re.search(rf"responses.jsonl: line {line}: {reason}", result.output), result.output
    assert "7 invalid lines, listed above; nothing imported" in result.output
    assert not (tmp_path / "store").exists()

    report = import_dataset(path, "vllm", store, tokenizer=spm_tokenizer, skip_invalid=True)
    assert report.written == 3 and len(report.problems) == 7
    reader = LogitsReader(report.uri)
    m = reader.manifest.meta
    assert (m.k, m.teacher_name, m.all_positions) == (K, "teacher-7b", True)
    assert m.tokenizer_fingerprint == tokenizer_fingerprint(spm_tokenizer)
    assert tokenizer_fingerprint(reader.tokenizer()) == m.tokenizer_fingerprint  # stored for fusion
    for got, resp in zip(reader.iter_samples(), responses[:3], strict=True):
        choice = resp["choices"][0]
        assert got.input_ids.tolist() == choice["prompt_token_ids"]
        for t, entry in enumerate(choice["prompt_logprobs"][1:]):
            top = sorted(((int(tok), e["logprob"]) for tok, e in entry.items() if e["rank"] <= K),
                         key=lambda x: -x[1])
            assert got.topk_ids[t].tolist() == [tok for tok, _ in top]
            np.testing.assert_allclose(got.topk_logprobs[t], [lp for _, lp in top], atol=BOUND)
            gold_lp = entry[str(choice["prompt_token_ids"][t + 1])]["logprob"]
            assert abs(got.gold_logprob[t] - gold_lp) <= BOUND


def test_import_needs_a_tokenizer_and_one_k(tmp_path, spm_tokenizer):
    rng = np.random.default_rng(1)
    s = ScoredSample("a", rng.integers(0, 100, 5).astype(np.int32), np.ones(5, bool), np.arange(4, dtype=np.int32),
                     np.zeros((4, K), np.int32), np.zeros((4, K), np.float32), np.zeros(4, np.float32))
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(vllm_response(s, 100, rng)) + "\n")
    with pytest.raises(UserError, match="--format vllm needs --tokenizer"):
        import_dataset(path, "vllm", str(tmp_path / "store"))
    with pytest.raises(UserError, match="unknown import format 'csv'"):
        import_dataset(path, "csv", str(tmp_path / "store"))


def test_import_errors_name_the_missing_tokenizer_and_the_wrong_format(stored, tmp_path, spm_tokenizer):
    """Found by a new user: an export whose tokenizer/ is gone, imported without --tokenizer, used to give
    a dataset that `fuse` refused later; a directory or a Parquet file given as --format vllm was 'no such
    file' or one invalid line per row. Each is now one line naming what to give, and nothing is stored."""
    import shutil

    uri, _ = stored
    export_dataset(uri, "parquet", tmp_path / "pq")
    (file,) = (tmp_path / "pq").glob("*.parquet")
    assert (tmp_path / "pq" / "tokenizer").is_dir()
    shutil.rmtree(tmp_path / "pq" / "tokenizer")
    store = str(tmp_path / "store")
    for path, fmt, tok, needle in [
        (tmp_path / "pq", "parquet", None, "give --tokenizer"),
        (file, "parquet", None, "no tokenizer/ beside it"),
        (tmp_path / "pq", "vllm", None, "--format vllm needs --tokenizer"),
        (tmp_path / "pq", "vllm", spm_tokenizer, "a directory; --format vllm reads one JSONL file"),
        (file, "vllm", spm_tokenizer, "a Parquet file, not JSONL: use --format parquet"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            import_dataset(path, fmt, store, tokenizer=tok)
    assert not Path(store).exists()
    report = import_dataset(file, "parquet", store, tokenizer=spm_tokenizer)  # --tokenizer: as good as tokenizer/
    assert report.written == 5 and LogitsReader(report.uri).tokenizer() is not None


def test_review_cases_directory_import_binary_lines_and_file_out(stored, tmp_path, spm_tokenizer):
    """Found by review: an export directory imports as a whole (rows numbered across its files); a
    non-UTF-8 line is one invalid line, not a traceback; --overwrite never replaces a plain file."""
    uri, samples = stored
    export_dataset(uri, "parquet", tmp_path / "pq", rows_per_file=2)
    assert len(list((tmp_path / "pq").glob("*.parquet"))) == 3
    report = import_dataset(tmp_path / "pq", "parquet", str(tmp_path / "store2"))
    assert report.written == len(samples)
    assert [s.sample_id for s in LogitsReader(report.uri).iter_samples()] == [s.sample_id for s in samples]

    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\xff\xfe\x00binary\n")
    said: list[str] = []
    with pytest.raises(UserError, match="no valid samples"):
        import_dataset(junk, "vllm", str(tmp_path / "store3"), tokenizer=spm_tokenizer, on_problem=said.append)
    assert len(said) == 1 and "line 1: not UTF-8 text" in said[0]
    assert not (tmp_path / "store3").exists()

    plain = tmp_path / "afile"
    plain.write_text("keep me")
    with pytest.raises(UserError, match="is a file, not a directory"):
        export_dataset(uri, "parquet", plain, overwrite=True)
    assert plain.read_text() == "keep me"


def test_import_refuses_ids_past_the_tokenizer_and_spans_outside_the_text(stored, tmp_path, spm_tokenizer):
    """A parquet row whose top-k id is far past the tokenizer (10^9), or whose assistant span lies outside
    its text, is refused by row at import instead of reaching fusion or the trainer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri, _ = stored
    export_dataset(uri, "parquet", tmp_path / "pq", rows_per_file=10)
    (file,) = (tmp_path / "pq").glob("*.parquet")
    table = pq.read_table(file)
    rows = table.to_pylist()
    assert max(max(map(max, r["topk_ids"])) for r in rows if r["topk_ids"]) < len(spm_tokenizer)
    rows[0]["topk_ids"][0][0] = 10**9
    rows[1]["assistant_spans"] = [[1_000_000, 5]]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "bad.parquet")
    report = import_dataset(tmp_path / "bad.parquet", "parquet", str(tmp_path / "s"), tokenizer=spm_tokenizer)
    assert report.uri is None and not (tmp_path / "s").exists()
    assert len(report.problems) == 2
    assert "row 1: top-k id 1000000000 >= the tokenizer's" in report.problems[0]
    assert "row 2:" in report.problems[1] and "assistant_spans must be character spans" in report.problems[1]
