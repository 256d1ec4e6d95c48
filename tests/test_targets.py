"""Targets datasets (datastore.targets): round trip within the stated precision, crash + resume leaves
every sample exactly once, bad input is a UserError."""

from __future__ import annotations

import os

import numpy as np
import pytest

from datastore.errors import UserError
from datastore.retention import gc_dataset
from datastore.targets import (
    PROB_SCALE,
    TargetSample,
    TargetsMeta,
    TargetsReader,
    TargetsWriter,
    list_targets,
    targets_id,
    targets_uri,
)

K = 4


def meta(**kw) -> TargetsMeta:
    base = dict(pivot="tiny-llama", sources=["tiny-qwen"], align="offsets", vocab_map="ms", fusion="mince", k=K)
    base.update(kw)
    return TargetsMeta(**base)


def sample(i: int, rng: np.random.Generator | None = None, k: int = K) -> TargetSample:
    rng = rng or np.random.default_rng(i)
    T = int(rng.integers(3, 40))
    input_ids = rng.integers(0, 1000, T).astype(np.int32)
    loss_mask = np.zeros(T, bool)
    loss_mask[T // 2 :] = True
    positions = np.nonzero(loss_mask[1:])[0].astype(np.int32)
    N = len(positions)
    ids = rng.integers(0, 1000, (N, k)).astype(np.int32)
    raw = rng.random((N, k)) ** 3
    probs = (raw / raw.sum(1, keepdims=True) * rng.uniform(0.5, 1.0, (N, 1))).astype(np.float32)
    if N:
        ids[0, -1], probs[0, -1] = -1, 0.0  # one padded entry
    return TargetSample(f"s{i:04d}", input_ids, loss_mask, positions, ids, probs, winner="tiny-qwen",
                        ce={"tiny-llama": 1.5 + i, "tiny-qwen": 1.25})


def check(got: TargetSample, want: TargetSample) -> None:
    assert got.sample_id == want.sample_id
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
    np.testing.assert_array_equal(got.positions, want.positions)
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    assert got.topk_probs.dtype == np.float32 and got.input_ids.dtype == np.int32
    err = want.topk_probs.astype(np.float64) - got.topk_probs.astype(np.float64)
    assert err.min(initial=0) >= -1e-7 and err.max(initial=0) < 1.0 / PROB_SCALE + 1e-7  # never rounded up
    assert np.all(got.topk_probs[got.topk_ids == -1] == 0)
    assert got.winner == want.winner and got.ce == pytest.approx(want.ce)


def test_round_trip(tmp_path):
    samples = [sample(i) for i in range(23)]
    uri = targets_uri(str(tmp_path), targets_id(meta()))
    with TargetsWriter(uri, meta(), shard_rows=5) as w:
        for s in samples:
            w.write(s)
    r = TargetsReader(uri)
    assert r.manifest.complete and len(r) == 23 and len(r.manifest.shards) == 5
    assert r.manifest.num_positions == sum(len(s.positions) for s in samples)
    for got, want in zip(r.iter_samples(), samples, strict=True):
        check(got, want)
    check(r.get("s0017"), samples[17])
    arrays = r.read_shard(1, with_extras=False)
    assert arrays.topk_ids.shape == (int(arrays.pos_offsets[-1]), K) and arrays.winner is None
    assert [m.targets_id for m in list_targets(str(tmp_path))] == [targets_id(meta())]
    with pytest.raises(KeyError):
        r.get("nope")


def test_rows_still_sum_to_at_most_one(tmp_path):
    s = sample(0)
    s.topk_probs = np.full_like(s.topk_probs, 0.25)  # sums to exactly 1 (float noise above is allowed)
    s.topk_probs[:, 0] += 2e-4
    s.topk_probs[s.topk_ids == -1] = 0
    with TargetsWriter(str(tmp_path / "t"), meta()) as w:
        w.write(s)
    got = next(TargetsReader(str(tmp_path / "t")).iter_samples())
    assert got.topk_probs.astype(np.float64).sum(1).max() <= 1.0 + 1e-6


def test_resume_after_crash_every_sample_once(tmp_path):
    uri = str(tmp_path / "targets")
    samples = [sample(i) for i in range(20)]
    w = TargetsWriter(uri, meta(), shard_rows=4)
    for s in samples[:10]:
        w.write(s)
    # crash: 8 committed, 2 buffered and lost; plus an orphan shard written before its manifest
    # update, and a temp file of an interrupted atomic write
    orphan = os.path.join(uri, "shard-000099.parquet")
    with open(orphan, "wb") as f:
        f.write(b"garbage")
    with open(os.path.join(uri, ".tmp-abc"), "wb") as f:
        f.write(b"partial")
    del w
    assert not TargetsReader(uri).manifest.complete

    w = TargetsWriter(uri, meta(), shard_rows=4)
    assert w.done_ids == {s.sample_id for s in samples[:8]}  # the orphan is not part of any version
    assert gc_dataset(uri, older_than_s=3600) == []  # young files may be another writer's: kept
    assert gc_dataset(uri, older_than_s=0) == [".tmp-abc", "shard-000099.parquet"]
    assert not os.path.exists(orphan) and not os.path.exists(os.path.join(uri, ".tmp-abc"))
    with w:
        for s in samples:
            if s.sample_id not in w.done_ids:
                w.write(s)
    got = list(TargetsReader(uri).iter_samples())
    assert sorted(g.sample_id for g in got) == sorted(s.sample_id for s in samples)
    by_id = {s.sample_id: s for s in samples}
    for g in got:
        check(g, by_id[g.sample_id])


def test_reopen_with_other_meta_or_duplicate_is_refused(tmp_path):
    uri = str(tmp_path / "t")
    with TargetsWriter(uri, meta()) as w:
        w.write(sample(0))
    with pytest.raises(UserError, match="different targets dataset"):
        TargetsWriter(uri, meta(fusion="avgce"))
    w = TargetsWriter(uri, meta())
    with pytest.raises(UserError, match="already in"):
        w.write(sample(0))


def _bad(**changes) -> TargetSample:
    s = sample(3)
    for name, value in changes.items():
        setattr(s, name, value)
    return s


@pytest.mark.parametrize(
    "bad, message",
    [
        (_bad(sample_id=""), "sample_id"),
        (_bad(loss_mask=np.ones(2, bool)), "loss_mask"),
        (_bad(loss_mask=np.ones(len(sample(3).input_ids), np.int32)), "bool"),
        (_bad(positions=sample(3).positions[::-1].copy()), "ascending"),
        (_bad(topk_ids=sample(3).topk_ids[:, :2]), "k=4"),
        (_bad(topk_probs=sample(3).topk_probs * 3), "sums to more than 1"),
        (_bad(topk_probs=-sample(3).topk_probs), ">= 0"),
        (_bad(topk_ids=np.full_like(sample(3).topk_ids, -2)), "padding"),
        (_bad(topk_probs=np.where(sample(3).topk_ids == -1, 0.1, sample(3).topk_probs * 0.5)), "probability 0"),
        (_bad(input_ids=np.array([], np.int32), loss_mask=np.array([], bool)), "empty"),
    ],
)
def test_bad_samples_are_user_errors(tmp_path, bad, message):
    w = TargetsWriter(str(tmp_path / "t"), meta())
    with pytest.raises(UserError, match=message):
        w.write(bad)


def test_bad_uris_and_datasets(tmp_path):
    with pytest.raises(UserError, match="no targets dataset"):
        TargetsReader(str(tmp_path / "missing"))
    with pytest.raises(UserError):
        TargetsReader("ftp://x/y")
    with pytest.raises(UserError, match="shard_rows"):
        TargetsWriter(str(tmp_path / "t"), meta(), shard_rows=0)
    (tmp_path / "logits").mkdir()
    (tmp_path / "logits" / "manifest.json").write_text('{"format": "logitfuse.logits/1"}')
    with pytest.raises(UserError, match="not a targets dataset"):
        TargetsReader(str(tmp_path / "logits"))


def test_corrupt_shard_is_detected(tmp_path):
    uri = str(tmp_path / "t")
    with TargetsWriter(uri, meta()) as w:
        w.write(sample(1))
    shard = os.path.join(uri, TargetsReader(uri).manifest.shards[0].file)
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        list(TargetsReader(uri).iter_samples())


def test_store_cli_shows_and_verifies_targets(tmp_path):
    from typer.testing import CliRunner

    from datastore.cli import store_app

    uri = targets_uri(str(tmp_path), targets_id(meta()))
    with TargetsWriter(uri, meta(), shard_rows=3) as w:
        for i in range(7):
            w.write(sample(i))
    runner = CliRunner()
    r = runner.invoke(store_app, ["ls", str(tmp_path)])
    assert r.exit_code == 0 and targets_id(meta()) in r.output
    r = runner.invoke(store_app, ["show", uri])
    assert r.exit_code == 0 and "mince" in r.output and "samples       7" in r.output
    r = runner.invoke(store_app, ["verify", uri])
    assert r.exit_code == 0 and "OK" in r.output and "7 samples" in r.output
    shard = os.path.join(uri, TargetsReader(uri).manifest.shards[1].file)
    open(shard, "ab").write(b"x")
    r = runner.invoke(store_app, ["verify", uri])
    assert r.exit_code == 1 and "sha256" in r.output
