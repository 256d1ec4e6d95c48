"""Reuse at sample level: a dataset overlapping an earlier one (same teacher and settings, any team)
scores only its new samples, reads back as if scored from scratch, and survives removing the earlier one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from clients.cli import app
from clients.corpus import chat_samples, write_jsonl
from datastore.catalog import catalog
from datastore.codec import CodecConfig
from datastore.reader import LogitsReader
from teacher_server import render
from teacher_server.backends.hf import HFBackend
from teacher_server.extract import ExtractSettings, extract

pytestmark = pytest.mark.usefixtures("one_thread")


def test_extending_a_dataset_scores_only_the_new_samples(tmp_path, teacher_dir, monkeypatch):
    from datastore.chat import load_dataset

    base = chat_samples(20, seed=8, max_turns=2)
    extra = chat_samples(22, seed=9, max_turns=2)[20:]
    for i, r in enumerate(extra):
        r["id"] = f"new-{i}"
    a = load_dataset(write_jsonl(base, tmp_path / "a.jsonl"))
    renamed = [{**r, "id": f"b-{r['id']}"} for r in base]  # another team's ids for the same chats
    b = load_dataset(write_jsonl(renamed + extra, tmp_path / "b.jsonl"))
    backend = HFBackend(teacher_dir, device="cpu")
    store = str(tmp_path / "store")
    settings = ExtractSettings(k=4, shard_rows=8)

    first = extract(backend, a, store, "t", settings, progress=False)
    assert first.samples_scored == 20 and first.samples_reused == 0
    tokenised: list[int] = []
    real = render._tokenize_batch
    monkeypatch.setattr(render, "_tokenize_batch", lambda texts, tok: (tokenised.append(len(texts)), real(texts, tok))[1])
    second = extract(backend, b, store, "t", settings, progress=False)
    monkeypatch.undo()
    assert sum(tokenised) == 22 + 2  # the input check tokenises every sample once; only the 2 scored ones again
    assert second.logits_id != first.logits_id
    assert second.samples_scored == 2 and second.samples_reused == 20  # only the new samples are scored
    other_k = extract(backend, a, store, "t", ExtractSettings(k=5, shard_rows=8), progress=False)
    assert other_k.samples_reused == 0  # other settings: nothing to reuse

    scratch = extract(backend, b, str(tmp_path / "scratch"), "t", settings, progress=False)
    got, ref = LogitsReader(second.uri), LogitsReader(scratch.uri)
    assert sorted(s.sample_id for s in got.iter_samples()) == sorted(s.sample_id for s in ref.iter_samples())
    earlier = LogitsReader(first.uri)
    for r in renamed + extra:
        x, y = got.get(r["id"]), ref.get(r["id"])
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.positions, y.positions)
        assert x.text == y.text and x.truncated == y.truncated
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=CodecConfig().step + 1e-6)
        if r["id"].startswith("b-"):  # a reused sample is exactly what was stored before
            e = earlier.get(r["id"][2:])
            np.testing.assert_array_equal(x.topk_ids, e.topk_ids)
            np.testing.assert_array_equal(x.topk_logprobs, e.topk_logprobs)
            np.testing.assert_array_equal(x.gold_logprob, e.gold_logprob)

    assert second.shards_copied == 3  # every range of b lines up with a shard of a: copied whole

    # new chats spread through the dataset, an old chat twice under two new ids and a new chat twice: most
    # ranges do not line up with a shard of a, so their samples are decoded and re-encoded; identical samples
    # each get their own row (0.2 committed one renamed object twice and failed)
    spread = [{**r, "id": f"c-{r['id']}"} for r in base[::-1]]
    spread.insert(5, {**base[3], "id": "c-again"})
    spread.insert(9, {**extra[0], "id": "c-new"})
    spread.insert(15, {**extra[0], "id": "c-new-again"})
    c = load_dataset(write_jsonl(spread, tmp_path / "c.jsonl"))
    third = extract(backend, c, store, "t", settings, progress=False)
    assert third.samples_scored + third.samples_reused == len(spread) and third.samples_scored <= 2
    assert third.shards_copied == 1  # a's last shard (4 rows) lies whole in c's first range; the rest decoded
    got = LogitsReader(third.uri)
    assert sorted(s.sample_id for s in got.iter_samples()) == sorted(r["id"] for r in spread)
    stored_as = {f"c-{r['id']}": (earlier, r["id"]) for r in base}  # where each chat of c was stored before
    stored_as.update({"c-again": (earlier, base[3]["id"]), "c-new": (got_b := LogitsReader(second.uri), "new-0"),
                      "c-new-again": (got_b, "new-0")})
    for r in spread:
        x = got.get(r["id"])
        reader, earlier_id = stored_as[r["id"]]
        e = reader.get(earlier_id)
        assert x.sample_id == r["id"] and x.text == e.text and x.truncated == e.truncated
        for name in ("input_ids", "loss_mask", "positions", "topk_ids", "topk_logprobs", "gold_logprob",
                     "assistant_spans"):
            np.testing.assert_array_equal(getattr(x, name), getattr(e, name), err_msg=f"{r['id']} {name}")

    # removing the earlier dataset never takes samples from under the one that reused them
    runner = CliRunner()
    assert runner.invoke(app, ["store", "rm", first.uri]).exit_code == 0
    assert first.uri not in {e["uri"] for e in catalog(store)}
    res = runner.invoke(app, ["store", "verify", second.uri])
    assert res.exit_code == 0, res.output
    assert len(LogitsReader(second.uri)) == 22


def test_a_dataset_stored_on_another_logprob_grid_is_not_reused(tmp_path, teacher_dir):
    """A sample stored at another quantisation step would be quantised twice: it is scored again."""
    from datastore.chat import load_dataset
    from datastore.manifest import LogitsMeta, logits_id
    from datastore.writer import LogitsWriter
    from teacher_server.extract import logits_meta

    backend = HFBackend(teacher_dir, device="cpu")
    store = str(tmp_path / "store")
    data = load_dataset(write_jsonl(chat_samples(4, seed=3, max_turns=2), tmp_path / "a.jsonl"))
    settings = ExtractSettings(k=4, shard_rows=8)
    first = extract(backend, data, store, "t", settings, progress=False)
    # the same samples and settings under another input dataset id, stored at 1/32 nat
    meta = LogitsMeta.model_validate({**logits_meta(backend, data, "t", settings).model_dump(), "dataset_id": "other"})
    coarse = CodecConfig(step_units=1, step_log2=5)
    with LogitsWriter(f"{store}/logits/{logits_id(meta)}", meta, shard_rows=8, codec_config=coarse) as w:
        for s in LogitsReader(first.uri).iter_samples():
            w.write(s)
    shutil.rmtree(first.uri)  # only the 1/32-nat copy is left in the store
    renamed = load_dataset(write_jsonl([{**r, "id": f"n-{r['id']}"} for r in chat_samples(4, seed=3, max_turns=2)],
                                       tmp_path / "b.jsonl"))
    again = extract(backend, renamed, store, "t", settings, progress=False)
    assert again.samples_reused == 0 and again.samples_scored == 4


def test_rename_samples_keeps_every_value_and_checks_its_input():
    from datastore import codec
    from tests.test_datastore import sample

    samples = [sample(i) for i in range(6)]
    for config in (CodecConfig(), CodecConfig(version=1)):
        data = codec.encode_shard(samples, 6, config)
        new_ids = [f"new-{i}" for i in range(6)]
        renamed = codec.rename_samples(data, new_ids, config)
        table, ctx = codec.read_shard_bytes(renamed)
        got = codec.decode_rows(table, ctx)
        table, ctx = codec.read_shard_bytes(data)
        ref = codec.decode_rows(table, ctx)
        assert [s.sample_id for s in got] == new_ids
        for x, y in zip(got, ref, strict=True):
            assert x.text == y.text and x.truncated == y.truncated
            for name in ("input_ids", "loss_mask", "positions", "topk_ids", "topk_logprobs", "gold_logprob",
                         "assistant_spans"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert codec.topk_bytes(renamed) == codec.topk_bytes(data) or config.version == 1
        with pytest.raises(ValueError, match="one distinct id per row"):
            codec.rename_samples(data, new_ids[:5], config)
        with pytest.raises(ValueError, match="one distinct id per row"):
            codec.rename_samples(data, ["same"] * 6, config)
    with pytest.raises(ValueError, match="differs from the dataset"):
        codec.rename_samples(codec.encode_shard(samples, 6), [f"n{i}" for i in range(6)],
                             CodecConfig(step_units=1, step_log2=5))
