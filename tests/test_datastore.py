"""LogitsWriter / LogitsReader / store CLI on a local store: round trip, resume, crash safety, verify."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from datastore import LogitsMeta, LogitsReader, LogitsWriter, UserError, list_logits, logits_id, logits_uri
from datastore.cli import store_app
from datastore.fs import resolve
from datastore.sample import ScoredSample

BOUND = 5 / 256
K = 6


def meta(**changes) -> LogitsMeta:
    fields = dict(
        dataset_id="ds-1",
        teacher_name="tiny-llama",
        teacher_revision="r1",
        tokenizer_fingerprint="sp32k",
        k=K,
        chat_template="model",
        max_length=512,
        all_positions=False,
        extra={"note": "test"},
    )
    fields.update(changes)
    return LogitsMeta(**fields)


def sample(i: int, n_tokens: int = 40) -> ScoredSample:
    rng = np.random.default_rng(i)
    ids = rng.integers(0, 5000, size=n_tokens).astype(np.int32)
    mask = np.zeros(n_tokens, dtype=bool)
    mask[n_tokens // 2 :] = True
    positions = np.flatnonzero(mask[1:]).astype(np.int32)
    n = len(positions)
    topk_ids = np.stack([rng.choice(5000, K, replace=False) for _ in range(n)]).astype(np.int32)
    lp = -np.sort(rng.exponential(3.0, size=(n, K)), axis=1).astype(np.float32)
    gold = lp[:, -1] - 1.5
    for j, t in enumerate(positions[::2]):
        ids[t + 1] = topk_ids[2 * j, 1]
        gold[2 * j] = lp[2 * j, 1]
    return ScoredSample(
        sample_id=f"sample-{i:03d}",
        input_ids=ids,
        loss_mask=mask,
        positions=positions,
        topk_ids=topk_ids,
        topk_logprobs=lp,
        gold_logprob=gold.astype(np.float32),
        text=f"text {i}",
    )


def check(a: ScoredSample, b: ScoredSample) -> None:
    assert a.sample_id == b.sample_id
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert np.abs(a.topk_logprobs.astype(np.float64) - b.topk_logprobs).max() <= BOUND
    assert np.abs(a.gold_logprob.astype(np.float64) - b.gold_logprob).max() <= BOUND


@pytest.fixture
def uri(tmp_path) -> str:
    return logits_uri(str(tmp_path / "store"), logits_id(meta()))


def test_write_read_get_scan(uri):
    samples = [sample(i) for i in range(10)]
    with LogitsWriter(uri, meta(), shard_rows=4) as w:
        for s in samples:
            w.write(s)
    m = w.manifest
    assert m.complete and len(m.shards) == 3 and m.num_samples == 10
    assert m.num_positions == sum(len(s.positions) for s in samples)
    assert m.encoding["logprob_max_abs_error"] == BOUND

    r = LogitsReader(uri)
    assert len(r) == 10
    for a, b in zip(samples, r.iter_samples(), strict=True):
        check(a, b)
    assert [len(b) for b in r.iter_batches(3)] == [3, 3, 3, 1]
    check(samples[6], r.get("sample-006"))
    with pytest.raises(KeyError):
        r.get("nope")
    lf = r.scan()
    df = lf.select("sample_id", "num_positions").collect()
    assert df.height == 10 and df["num_positions"].sum() == m.num_positions
    assert df["sample_id"].to_list() == [s.sample_id for s in samples]


def test_get_opens_only_the_shard_that_holds_the_id(uri):
    samples = [sample(i) for i in range(40)]
    with LogitsWriter(uri, meta(), shard_rows=2) as w:  # 20 shards
        for s in samples:
            w.write(s)
    r = LogitsReader(uri)
    check(samples[33], r.get("sample-033"))
    assert r.shards_indexed <= 2  # the right shard, plus at most one Bloom false positive
    with pytest.raises(KeyError):
        r.get("sample-999")
    assert r.shards_indexed <= 4


@pytest.mark.parametrize("rows", [7, 9, 10, 13])
def test_get_finds_every_id_of_shards_whose_bloom_size_is_not_a_multiple_of_8(uri, rows):
    """A shard of 7, 9, 10, 13 ... rows has a Bloom filter of 10 bits per id stored in whole bytes: `get`
    must hash into the filter's own bit count (0.2 used the rounded one and missed every id)."""
    samples = [sample(i) for i in range(rows)]
    with LogitsWriter(uri, meta(), shard_rows=rows) as w:
        for s in samples:
            w.write(s)
    r = LogitsReader(uri)
    for s in samples:
        check(s, r.get(s.sample_id))
    assert r.shards_indexed == 1


def test_logits_id_is_stable_and_canonical():
    a = meta(extra={"a": 1, "b": 2})
    b = meta(extra={"b": 2, "a": 1})
    assert logits_id(a) == logits_id(b)
    assert len(logits_id(a)) == 16 and int(logits_id(a), 16) >= 0
    assert logits_id(meta(k=7)) != logits_id(meta())


def test_resume_after_crash_is_exactly_once(uri, monkeypatch):
    samples = [sample(i) for i in range(11)]
    w = LogitsWriter(uri, meta(), shard_rows=3)
    for s in samples[:7]:  # shards 0 and 1 committed, sample 6 only buffered
        w.write(s)
    del w  # crash: no close()

    # a crash between the shard write and its Delta commit: the file lands, no version references it
    w = LogitsWriter(uri, meta(), shard_rows=3)
    assert w.done_ids == {s.sample_id for s in samples[:6]}
    root = resolve(uri)[1]
    before = set(os.listdir(root))
    monkeypatch.setattr(w.table, "commit", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    for s in samples[6:8]:
        w.write(s)
    with pytest.raises(OSError):
        w.write(samples[8])
    monkeypatch.undo()
    orphans = set(os.listdir(root)) - before
    assert len(orphans) == 1 and orphans.pop().startswith("shard-")  # the orphan
    open(os.path.join(root, ".tmp-partial"), "wb").write(b"half a shard")
    r = LogitsReader(uri)
    assert len(r) == 6 and not r.manifest.complete  # readers never see the orphan
    assert r.manifest.table == "delta" and r.manifest.version == 2

    w = LogitsWriter(uri, meta(), shard_rows=3)
    assert w.done_ids == {s.sample_id for s in samples[:6]}
    for s in samples:
        if s.sample_id not in w.done_ids:
            w.write(s)
    m = w.close()
    assert m.complete and m.num_samples == 11

    got = list(LogitsReader(uri).iter_samples())
    assert sorted(s.sample_id for s in got) == [s.sample_id for s in samples]
    for s in got:
        check(samples[int(s.sample_id.split("-")[1])], s)


def test_meta_mismatch_and_duplicates(uri):
    with LogitsWriter(uri, meta(), shard_rows=2) as w:
        w.write(sample(0))
    with pytest.raises(UserError, match="teacher_revision"):
        LogitsWriter(uri, meta(teacher_revision="r2"))
    w = LogitsWriter(uri, meta())
    with pytest.raises(UserError, match="sample-000"):
        w.write(sample(0))
    w.write(sample(1))
    with pytest.raises(UserError, match="sample-001"):
        w.write(sample(1))


def test_bad_uris():
    with pytest.raises(UserError):
        resolve("gs://bucket/x")
    with pytest.raises(UserError):
        resolve("s3://")
    with pytest.raises(UserError, match="no logits dataset"):
        LogitsReader("/nonexistent/place")


def _store_with_data(tmp_path) -> tuple[str, str]:
    store = str(tmp_path / "store")
    uri = logits_uri(store, logits_id(meta()))
    with LogitsWriter(uri, meta(), shard_rows=3) as w:
        for i in range(7):
            w.write(sample(i))
    return store, uri


def test_cli_ls_show_verify_ok(tmp_path):
    store, uri = _store_with_data(tmp_path)
    runner = CliRunner()
    res = runner.invoke(store_app, ["ls", store])
    assert res.exit_code == 0 and logits_id(meta()) in res.output and "tiny-llama" in res.output
    res = runner.invoke(store_app, ["show", uri])
    assert res.exit_code == 0 and "samples       7" in res.output and "B/entry" in res.output
    res = runner.invoke(store_app, ["verify", uri])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("OK") and "7 samples" in res.output
    assert [m.logits_id for m in list_logits(store)] == [logits_id(meta())]


def test_cli_verify_detects_flipped_byte_and_missing_shard(tmp_path):
    store, uri = _store_with_data(tmp_path)
    root = resolve(uri)[1]
    names = [s.file for s in LogitsReader(uri).manifest.shards]
    runner = CliRunner()
    path = os.path.join(root, names[1])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    res = runner.invoke(store_app, ["verify", uri])
    assert res.exit_code == 1 and f"{names[1]}: sha256 mismatch" in res.output

    shutil.copy(os.path.join(root, names[0]), path)  # a shard copied over another: duplicate ids
    os.remove(os.path.join(root, names[2]))
    res = runner.invoke(store_app, ["verify", uri])
    assert res.exit_code == 1
    assert f"{names[2]}: missing" in res.output
    assert f"{names[1]}: sha256 mismatch" in res.output
    with pytest.raises(ValueError, match="sha256"):
        list(LogitsReader(uri).iter_samples())
    with pytest.raises(ValueError, match="sha256"):  # scan() never reads an unverified shard
        LogitsReader(uri).scan()
