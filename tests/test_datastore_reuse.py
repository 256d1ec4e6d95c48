"""Reuse at sample level: a dataset overlapping an earlier one (same teacher and settings, any team)
scores only its new samples, reads back as if scored from scratch, and survives removing the earlier one."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from clients.cli import app
from clients.corpus import chat_samples, write_jsonl
from datastore.catalog import catalog
from datastore.codec import CodecConfig
from datastore.reader import LogitsReader
from teacher_server.backends.hf import HFBackend
from teacher_server.extract import ExtractSettings, extract
from tests.test_extract import teacher_dir  # noqa: F401  (module fixture: a tiny saved teacher)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_extending_a_dataset_scores_only_the_new_samples(tmp_path, teacher_dir):  # noqa: F811
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
    second = extract(backend, b, store, "t", settings, progress=False)
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

    # removing the earlier dataset never takes samples from under the one that reused them
    runner = CliRunner()
    assert runner.invoke(app, ["store", "rm", first.uri]).exit_code == 0
    assert first.uri not in {e["uri"] for e in catalog(store)}
    res = runner.invoke(app, ["store", "verify", second.uri])
    assert res.exit_code == 0, res.output
    assert len(LogitsReader(second.uri)) == 22
