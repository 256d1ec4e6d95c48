"""Round trips of the top-k codec: ids exact, logprobs within the stated bound of the fp32 input."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from datastore import LogitsMeta, LogitsReader, LogitsWriter, codec
from datastore.sample import ScoredSample

BOUND = 5 / 256  # the default step 5/128 nat, round to nearest


def make_sample(
    rng: np.random.Generator,
    sid: str,
    *,
    k: int = 10,
    n_tokens: int = 60,
    vocab: int = 32000,
    gold_rate: float = 0.7,
    all_positions: bool = False,
) -> ScoredSample:
    """A random but well-formed sample: Zipf-ish ids, sorted logprobs, gold often in the top-k."""
    ids = np.minimum(rng.zipf(1.3, size=n_tokens), vocab - 1).astype(np.int32)
    mask = np.zeros(n_tokens, dtype=bool)
    mask[n_tokens // 3 :] = True
    positions = np.arange(n_tokens - 1) if all_positions else np.flatnonzero(mask[1:])
    n = len(positions)
    topk_ids = np.empty((n, k), dtype=np.int32)
    for i in range(n):
        topk_ids[i] = rng.choice(vocab, size=k, replace=False)
    logits = rng.normal(0, 3, size=(n, k + 20))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    topk_lp = -np.sort(-logp[:, :k], axis=1).astype(np.float32)
    gold_lp = (topk_lp[:, -1] - rng.exponential(2.0, size=n)).astype(np.float32) if k else np.zeros(n)
    for i, t in enumerate(positions):
        if rng.random() < gold_rate:
            r = rng.integers(k)
            ids[t + 1] = topk_ids[i, r]
            gold_lp[i] = topk_lp[i, r]
        else:
            while ids[t + 1] in topk_ids[i]:
                ids[t + 1] = rng.integers(vocab)
    text = "user: hi\nassistant: " + " ".join(map(str, ids[:5]))
    return ScoredSample(
        sample_id=sid,
        input_ids=ids,
        loss_mask=mask,
        positions=positions.astype(np.int32),
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        gold_logprob=gold_lp.astype(np.float32),
        text=text,
        assistant_spans=np.array([[10, len(text)]], dtype=np.int32),
        truncated=bool(rng.random() < 0.5),
    )


def roundtrip(samples: list[ScoredSample], k: int, config: codec.CodecConfig = codec.CodecConfig()):
    for s in samples:
        codec.validate(s, k)
    data = codec.encode_shard(samples, k, config)
    table, ctx = codec.read_shard_bytes(data)
    return codec.decode_rows(table, ctx)


def assert_same(a: ScoredSample, b: ScoredSample, bound: float = BOUND) -> None:
    assert b.sample_id == a.sample_id
    assert b.input_ids.dtype == np.int32 and b.topk_ids.dtype == np.int32
    assert b.topk_logprobs.dtype == np.float32 and b.gold_logprob.dtype == np.float32
    assert b.loss_mask.dtype == bool and b.positions.dtype == np.int32
    np.testing.assert_array_equal(b.input_ids, a.input_ids)
    np.testing.assert_array_equal(b.loss_mask, a.loss_mask)
    np.testing.assert_array_equal(b.positions, a.positions)
    np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
    assert b.topk_logprobs.shape == a.topk_logprobs.shape
    # the bound, checked in float64 against the float32 input
    if a.topk_logprobs.size:
        err = np.abs(
            b.topk_logprobs.astype(np.float64) - np.asarray(a.topk_logprobs, np.float32).astype(np.float64)
        )
        assert err.max() <= bound
    if a.gold_logprob.size:
        gerr = np.abs(
            b.gold_logprob.astype(np.float64) - np.asarray(a.gold_logprob, np.float32).astype(np.float64)
        )
        assert gerr.max() <= bound
    assert b.text == a.text
    np.testing.assert_array_equal(b.assistant_spans, np.asarray(a.assistant_spans).reshape(-1, 2))
    assert b.truncated == a.truncated


def test_random_roundtrip():
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, f"s{i}", n_tokens=int(rng.integers(2, 200))) for i in range(40)]
    for a, b in zip(samples, roundtrip(samples, 10), strict=True):
        assert_same(a, b)


@pytest.mark.parametrize("k", [1, 2, 50])
def test_k_extremes(k):
    rng = np.random.default_rng(k)
    samples = [make_sample(rng, f"s{i}", k=k, n_tokens=80, all_positions=True) for i in range(5)]
    for a, b in zip(samples, roundtrip(samples, k), strict=True):
        assert_same(a, b)


def test_adversarial_values():
    rng = np.random.default_rng(1)
    s = make_sample(rng, "adv", k=8, n_tokens=40, vocab=300_000, all_positions=True)
    n = len(s.positions)
    s.topk_ids[:, :] = rng.choice(2**31 - 1, size=(n, 8), replace=False).reshape(n, 8)
    s.topk_ids[0] = [2**31 - 1, 0, 2**17, 2**17 + 1, 2**24, 131071, 7, 8]
    s.input_ids[:] = rng.integers(2**17, 2**17 + 50_000, size=len(s.input_ids))
    s.input_ids[1] = 2**31 - 1  # gold of position 0, at rank 0
    s.topk_logprobs[0] = [0.0, 0.0, 0.0, -1e-7, -1e-7, -80.0, -80.0, -80.0]  # ties, 0, -80
    s.topk_logprobs[1] = -80.0  # all equal
    s.topk_logprobs[2] = [-0.01, -5.0, -40.0, -79.99, -80.0, -200.0, -1000.0, -65536.0]
    s.gold_logprob[0] = 0.0
    s.gold_logprob[1:] = -100.0  # not in the top-k (ids are random): stored on its own
    s.gold_logprob[2] = -70000.0 + 4464.0  # far below the last rank
    out = roundtrip([s], 8)[0]
    assert_same(s, out)
    assert out.topk_logprobs[0, 5] == pytest.approx(-80.0, abs=BOUND)


def test_gold_in_topk_with_a_different_logprob_is_kept_exact():
    rng = np.random.default_rng(2)
    s = make_sample(rng, "g", k=4, gold_rate=1.0)
    s.gold_logprob[:] = s.topk_logprobs[:, -1] - 3.0  # backend disagrees with its own top-k
    assert_same(s, roundtrip([s], 4)[0])


def test_empty_and_long_samples():
    rng = np.random.default_rng(3)
    empty = ScoredSample(
        sample_id="empty",
        input_ids=np.zeros(0, np.int32),
        loss_mask=np.zeros(0, bool),
        positions=np.zeros(0, np.int32),
        topk_ids=np.zeros((0, 5), np.int32),
        topk_logprobs=np.zeros((0, 5), np.float32),
        gold_logprob=np.zeros(0, np.float32),
    )
    no_positions = make_sample(rng, "prompt-only", k=5, n_tokens=3)
    no_positions.loss_mask[:] = False
    no_positions = ScoredSample(
        sample_id="prompt-only",
        input_ids=no_positions.input_ids,
        loss_mask=no_positions.loss_mask,
        positions=np.zeros(0, np.int32),
        topk_ids=np.zeros((0, 5), np.int32),
        topk_logprobs=np.zeros((0, 5), np.float32),
        gold_logprob=np.zeros(0, np.float32),
        text=None,
    )
    long = make_sample(rng, "long", k=5, n_tokens=6000)
    samples = [empty, no_positions, long]
    for a, b in zip(samples, roundtrip(samples, 5), strict=True):
        assert_same(a, b)
    # a shard of only empty samples
    assert_same(empty, roundtrip([empty], 5)[0])


def test_finer_step_config_meets_its_bound():
    rng = np.random.default_rng(4)
    samples = [make_sample(rng, f"s{i}") for i in range(5)]
    cfg = codec.CodecConfig(step_units=1, step_log2=5)
    assert cfg.max_abs_error == 1 / 64
    for a, b in zip(samples, roundtrip(samples, 10, cfg), strict=True):
        assert_same(a, b, bound=1 / 64)


def test_rejects_contract_violations():
    rng = np.random.default_rng(5)
    s = make_sample(rng, "bad", k=4)
    s.topk_logprobs[0] = s.topk_logprobs[0][::-1]
    with pytest.raises(ValueError, match="sorted"):
        codec.validate(s, 4)
    s = make_sample(rng, "nan", k=4)
    s.topk_logprobs[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        codec.validate(s, 4)
    s = make_sample(rng, "shape", k=4)
    with pytest.raises(ValueError, match="shapes"):
        codec.validate(s, 5)


def test_compression_beats_naive_on_zipfian_data():
    """Sanity on size: far below the fp32+int32 raw layout (8 B/entry) even on noisy random data."""
    rng = np.random.default_rng(6)
    samples = [make_sample(rng, f"s{i}", n_tokens=300, vocab=2000) for i in range(20)]
    data = codec.encode_shard(samples, 10)
    entries = sum(len(s.positions) for s in samples) * 10
    assert len(data) / entries < 3.0


# ---------------------------------------------------------------- encoding v2 specifics, v1 compatibility

FIXTURE_V1 = Path(__file__).parent / "data" / "logits-v1"


def v1_fixture_samples() -> list[ScoredSample]:
    """The samples tests/data/logits-v1 was written from (by the v1 writer of 2026-11-28)."""
    rng = np.random.default_rng(2024)
    return [make_sample(rng, f"s{i}", k=6, n_tokens=int(rng.integers(2, 60)), vocab=50000) for i in range(6)]


def test_v1_shards_written_before_v2_still_decode(tmp_path):
    shutil.copytree(FIXTURE_V1, tmp_path / "ds")
    reader = LogitsReader(str(tmp_path / "ds"))
    assert reader.manifest.encoding["codec"] == codec.CODEC_V1
    expected = v1_fixture_samples()
    got = list(reader.iter_samples())
    assert [s.sample_id for s in got] == [s.sample_id for s in expected]
    for a, b in zip(expected, got, strict=True):
        assert_same(a, b)
    assert_same(expected[5], reader.get("s5"))
    # a 0.1 dataset is migrated to a Delta table before anyone writes to it; resuming it then keeps
    # writing v1 shards, so one dataset has one encoding
    from datastore.migrate import migrate_dataset

    migrate_dataset(str(tmp_path / "ds"))
    meta = reader.manifest.meta
    extra = make_sample(np.random.default_rng(9), "late", k=6)
    with LogitsWriter(str(tmp_path / "ds"), meta, shard_rows=4) as w:
        w.write(extra)
    reader = LogitsReader(str(tmp_path / "ds"))
    assert_same(extra, reader.get("late"))
    data = (tmp_path / "ds" / reader.manifest.shards[-1].file).read_bytes()
    assert codec.read_shard_bytes(data)[1].codec == codec.CODEC_V1


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_version_roundtrips(version):
    rng = np.random.default_rng(10 + version)
    samples = [make_sample(rng, f"s{i}", n_tokens=int(rng.integers(2, 120))) for i in range(12)]
    cfg = codec.CodecConfig(version=version)
    data = codec.encode_shard(samples, 10, cfg)
    table, ctx = codec.read_shard_bytes(data)
    assert ctx.codec == {1: codec.CODEC_V1, 2: codec.CODEC_V2, 3: codec.CODEC_NAME}[version]
    for a, b in zip(samples, codec.decode_rows(table, ctx), strict=True):
        assert_same(a, b)
    # any slice of rows, as LogitsReader.get asks for (the v2 stream is the whole shard's)
    table, ctx = codec.read_shard_bytes(data)
    rows = [7, 2]
    for i, b in zip(rows, codec.decode_rows(table.take(rows), ctx), strict=True):
        assert_same(samples[i], b)


def test_neg_inf_and_below_floor_are_stored_at_the_floor(tmp_path):
    """vLLM returns -inf for masked tokens: stored at LOGPROB_FLOOR (probability exactly 0 either way),
    never a failure; the other entries keep the bound."""
    rng = np.random.default_rng(11)
    s = make_sample(rng, "masked", k=6, n_tokens=30, all_positions=True)
    s.topk_logprobs[0, 3:] = -np.inf
    s.topk_logprobs[1, 5] = -1e30  # finite but far below the floor
    s.topk_logprobs[2, :] = -np.inf  # a whole row (a tiny vocabulary with everything masked)
    s.gold_logprob[0] = -np.inf
    s.gold_logprob[3] = -7e4
    codec.validate(s, 6)
    meta = LogitsMeta(dataset_id="d", teacher_name="t", teacher_revision="0", tokenizer_fingerprint="f",
                      k=6, chat_template="c", max_length=64, all_positions=True)
    with LogitsWriter(str(tmp_path / "ds"), meta) as w:
        w.write(s)
    out = LogitsReader(str(tmp_path / "ds")).get("masked")
    floor = codec.LOGPROB_FLOOR  # stored as the grid point nearest to it

    def at_floor(a):
        return np.all(np.abs(np.asarray(a, np.float64) - floor) <= BOUND) and np.all(np.exp(np.float64(a)) == 0)

    assert at_floor(out.topk_logprobs[0, 3:]) and at_floor(out.topk_logprobs[1, 5])
    assert at_floor(out.topk_logprobs[2])
    assert at_floor(out.gold_logprob[[0, 3]])  # the stored probability, 0, is exact
    np.testing.assert_array_equal(out.topk_ids, s.topk_ids)
    finite = np.isfinite(s.topk_logprobs) & (s.topk_logprobs >= floor)
    err = np.abs(out.topk_logprobs[finite].astype(np.float64) - s.topk_logprobs[finite].astype(np.float64))
    assert err.max() <= BOUND
    ok = np.abs(s.gold_logprob) < 2**16
    assert np.abs(out.gold_logprob[ok].astype(np.float64) - s.gold_logprob[ok]).max() <= BOUND
    s.topk_logprobs[4, 0] = np.nan  # NaN is a broken backend, not a masked token
    with pytest.raises(ValueError, match="NaN"):
        codec.validate(s, 6)


def test_adversarial_rows_v2():
    """Ties everywhere, k = 64 over a 152k vocabulary (Qwen's padded head), k = 1, huge gaps."""
    rng = np.random.default_rng(12)
    big = make_sample(rng, "qwen", k=64, n_tokens=50, vocab=152_064, all_positions=True)
    big.topk_ids[0] = np.arange(152_064 - 64, 152_064)  # ids past a 151,665-token tokenizer
    big.topk_logprobs[1] = -3.0  # 64-way tie
    big.topk_logprobs[2] = np.linspace(0, -60000, 64).astype(np.float32)  # huge gaps
    big.topk_logprobs[2, 0] = 0.0
    one = make_sample(rng, "k1", k=1, n_tokens=40, all_positions=True)
    for k, s in ((64, big), (1, one)):
        for a, b in zip([s], roundtrip([s], k), strict=True):
            assert_same(a, b)


def test_truncate_topk_matches_its_definition():
    rng = np.random.default_rng(13)
    logits = rng.normal(0, 2.5, size=(200, 400))
    lp64 = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-lp64, axis=1)[:, :12]
    ids = order.astype(np.int32)
    lp = np.take_along_axis(lp64, order, 1).astype(np.float32)
    for p, x in ((0.9, None), (None, 2.0), (0.5, 1.0), (1.0, None), (None, 0.0)):
        tid, tlp = codec.truncate_topk(ids, lp, top_p=p, within_nats=x)
        for i in range(len(ids)):  # float64 reference, row by row
            probs = np.exp(lp[i].astype(np.float64))
            n_p = 12 if p is None else next((j + 1 for j in range(12) if probs[: j + 1].sum() >= p), 12)
            n_x = 12 if x is None else int((lp[i].astype(np.float64) >= float(lp[i, 0]) - x).sum())
            n = max(1, min(n_p, n_x))
            np.testing.assert_array_equal(tid[i, :n], ids[i, :n])
            assert np.all(tid[i, n:] == -1) and np.all(np.isneginf(tlp[i, n:]))
            np.testing.assert_array_equal(tlp[i, :n], lp[i, :n])
    with pytest.raises(ValueError, match="top_p"):
        codec.truncate_topk(ids, lp, top_p=0.0)
    with pytest.raises(ValueError, match="within_nats"):
        codec.truncate_topk(ids, lp, within_nats=-1.0)


def test_truncated_rows_roundtrip_and_read_as_zero_mass():
    """Variable-k rows come back padded with id -1 / logprob -inf; fusion reads them unchanged (zero mass)."""
    from fusion._sparse import SparseDist, coo_topk
    from fusion.fuse import fuse_sample, gold_ids

    rng = np.random.default_rng(14)
    samples = [make_sample(rng, f"t{i}", k=10, n_tokens=int(rng.integers(2, 150))) for i in range(10)]
    cut = []
    for s in samples:
        ids, lp = codec.truncate_topk(s.topk_ids, s.topk_logprobs, top_p=0.6)
        cut.append(ScoredSample(s.sample_id, s.input_ids, s.loss_mask, s.positions, ids, lp, s.gold_logprob,
                                s.text, s.assistant_spans, s.truncated))
    assert any((c.topk_ids == -1).any() for c in cut)
    out = roundtrip(cut, 10)
    for a, b in zip(cut, out, strict=True):
        np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
        v = a.topk_ids >= 0
        assert np.all(np.isneginf(b.topk_logprobs[~v]))
        assert np.abs(b.topk_logprobs[v].astype(np.float64) - a.topk_logprobs[v]).max(initial=0) <= BOUND
        assert np.abs(b.gold_logprob.astype(np.float64) - a.gold_logprob).max(initial=0) <= BOUND
    with pytest.raises(ValueError, match="truncated"):
        codec.encode_shard(cut, 10, codec.CodecConfig(version=1))
    # the pivot's own distribution: padding has probability 0 and never matches a gold token
    b, full = out[3], samples[3]
    dist = SparseDist.from_topk(b.topk_ids, b.topk_logprobs)
    assert np.all(dist.probs[b.topk_ids == -1] == 0)
    np.testing.assert_allclose(dist.prob_of(gold_ids(b)), SparseDist.from_topk(
        np.where(b.topk_ids >= 0, full.topk_ids, -1), np.where(b.topk_ids >= 0, full.topk_logprobs, -np.inf)
    ).prob_of(gold_ids(full)), atol=0.03)
    # summing entries (what mapping a source does) drops the padding; fusing the pivot alone keeps its rows
    n = len(b.positions)
    merged = coo_topk(np.repeat(np.arange(n), 10), b.topk_ids, dist.probs, n, 10)
    np.testing.assert_array_equal(merged.ids, b.topk_ids)
    res = fuse_sample(b, [], method="avgce", k=10)
    np.testing.assert_array_equal(res.dist.ids, b.topk_ids)
    assert np.all(res.dist.probs[b.topk_ids == -1] == 0) and np.isfinite(res.ces).all()


def test_padding_must_end_a_row():
    rng = np.random.default_rng(15)
    s = make_sample(rng, "pad", k=4)
    s.topk_ids[0, 1] = -1
    with pytest.raises(ValueError, match="padding"):
        codec.validate(s, 4)
    s = make_sample(rng, "pad0", k=4)
    s.topk_ids[0, :] = -1
    with pytest.raises(ValueError, match="padding"):
        codec.validate(s, 4)


def test_real_model_distribution_compresses_below_goal():
    """Size on a real chat model's top-10 is the bench's (bench/bench_codec.py); here only that v2 is
    smaller than v1 on Zipfian rows with rank-dependent gaps, where its per-rank models pay off."""
    rng = np.random.default_rng(16)
    samples = [make_sample(rng, f"z{i}", n_tokens=300, vocab=3000) for i in range(20)]
    v1 = len(codec.encode_shard(samples, 10, codec.CodecConfig(version=1)))
    v2 = len(codec.encode_shard(samples, 10))
    assert v2 < v1


def test_vllm_neg_inf_prompt_logprobs_are_stored_not_rejected(tmp_path):
    """The vLLM backend's conversion keeps vLLM's -inf (a masked token, here also the gold) and the store
    takes it at the floor: one sample with -inf no longer fails a whole extraction job."""
    from collections import namedtuple

    from teacher_server.backends.vllm import VLLMBackend
    from teacher_server.render import TokenizedSample

    Logprob = namedtuple("Logprob", "logprob rank")
    ids = np.array([5, 9, 7, 3], dtype=np.int32)
    ts = TokenizedSample("v", ids, np.ones(4, bool), np.arange(3, dtype=np.int32), "t", np.zeros((0, 2), np.int32),
                         False)
    prompt_logprobs = [None] + [
        {9: Logprob(-0.1, 1), 4: Logprob(-2.5, 2), 6: Logprob(-np.inf, 3)},
        {4: Logprob(-0.2, 1), 1: Logprob(-1.9, 2), 8: Logprob(-3.0, 3), 7: Logprob(-np.inf, 4)},
        {3: Logprob(0.0, 1), 2: Logprob(-np.inf, 2), 1: Logprob(-np.inf, 3)},
    ]
    top = VLLMBackend._topk(ts, prompt_logprobs, 3)
    assert np.isneginf(top.gold_logprob[1]) and np.isneginf(top.topk_logprobs[0, 2])
    sample = ScoredSample("v", ids, np.ones(4, bool), np.arange(3, dtype=np.int32), top.topk_ids,
                          top.topk_logprobs, top.gold_logprob)
    meta = LogitsMeta(dataset_id="d", teacher_name="t", teacher_revision="0", tokenizer_fingerprint="f",
                      k=3, chat_template="c", max_length=8, all_positions=True)
    with LogitsWriter(str(tmp_path / "ds"), meta) as w:
        w.write(sample)
    out = LogitsReader(str(tmp_path / "ds")).get("v")
    np.testing.assert_array_equal(out.topk_ids, top.topk_ids)
    assert np.all(np.exp(out.topk_logprobs[np.isneginf(top.topk_logprobs)].astype(np.float64)) == 0)
    assert np.exp(np.float64(out.gold_logprob[1])) == 0 and abs(out.gold_logprob[0] + 0.1) <= BOUND


def test_large_shard_class_counts_beyond_one_byte():
    """A shard whose classes count more than 62k symbols (log-quantised counts past one byte)."""
    rng = np.random.default_rng(17)
    samples = [make_sample(rng, f"big{i}", k=2, n_tokens=3000, vocab=500, all_positions=True) for i in range(24)]
    assert sum(len(s.positions) for s in samples) > 70_000
    for a, b in zip(samples, roundtrip(samples, 2), strict=True):
        assert_same(a, b)


# ---------------------------------------------------------------- encoding v3: exact round trips

FIXTURE_V2 = Path(__file__).parent / "data" / "shard-v2.parquet"


def assert_exact(a: ScoredSample, b: ScoredSample, config: codec.CodecConfig = codec.CodecConfig()) -> None:
    """Decoded == the quantised input, bit for bit: ids equal, every logprob (top-k and gold) equal to
    ``dequantise(quantise(x))`` of the fp32 input (the floor for -inf), padding (id -1) back as -inf."""
    sl = (config.step_units, config.step_log2)
    np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
    np.testing.assert_array_equal(b.input_ids, a.input_ids)
    np.testing.assert_array_equal(b.positions, a.positions)
    np.testing.assert_array_equal(b.loss_mask, a.loss_mask)
    pad = np.asarray(a.topk_ids) == codec.PAD_ID
    want = codec.dequantise(codec.quantise(np.where(pad, 0.0, a.topk_logprobs), *sl), *sl)
    want[pad] = -np.inf
    np.testing.assert_array_equal(b.topk_logprobs, want)
    np.testing.assert_array_equal(b.gold_logprob, codec.dequantise(codec.quantise(a.gold_logprob, *sl), *sl))
    assert (b.sample_id, b.text, b.truncated) == (a.sample_id, a.text, a.truncated)


def v2_fixture_samples() -> list[ScoredSample]:
    """The samples tests/data/shard-v2.parquet was written from (by the v2 encoder of 2026-11-29)."""
    rng = np.random.default_rng(2026)
    out = [make_sample(rng, f"v2-{i}", k=6, n_tokens=int(rng.integers(2, 60)), vocab=50000) for i in range(6)]
    out[2].topk_ids, out[2].topk_logprobs = codec.truncate_topk(out[2].topk_ids, out[2].topk_logprobs, top_p=0.7)
    out[3].topk_logprobs[0, 3:] = -np.inf
    return out


def test_v2_shards_written_before_v3_still_decode_exactly():
    table, ctx = codec.read_shard_bytes(FIXTURE_V2.read_bytes())
    assert ctx.codec == codec.CODEC_V2
    for a, b in zip(v2_fixture_samples(), codec.decode_rows(table, ctx), strict=True):
        assert_exact(a, b)


def _sample(sid, input_ids, positions, topk_ids, topk_lp, gold_lp, loss_mask=None) -> ScoredSample:
    input_ids = np.asarray(input_ids, np.int32)
    mask = np.ones(len(input_ids), bool) if loss_mask is None else loss_mask
    return ScoredSample(sid, input_ids, mask, np.asarray(positions, np.int32), np.asarray(topk_ids, np.int32),
                        np.asarray(topk_lp, np.float32), np.asarray(gold_lp, np.float32), text=f"text {sid}")


def test_v3_edge_cases_roundtrip_exactly():
    """Empty sample, a one-position sample, k = 1, ids at the end of a 49,152 vocabulary and of int32,
    -inf and floor logprobs, a shard of one sample; each alone and all in one shard."""
    empty = _sample("empty", [], [], np.zeros((0, 3)), np.zeros((0, 3)), [])
    one = _sample("one", [49151, 49150], [0], [[49150, 49151, 0]], [[-0.01, -4.0, -np.inf]], [-0.01])
    ends = _sample("ends", [2**31 - 1, 49151, 2**31 - 1, 49151], [0, 1, 2],
                   [[49151, 2**31 - 1, 49150], [2**31 - 1, 49151, 49150], [49151, 49150, 2**31 - 2]],
                   [[0.0, -1e-7, -80.0], [-np.inf, -np.inf, -np.inf], [-3.0, -1e30, -np.inf]],
                   [0.0, -np.inf, -7e4])
    prompt_only = _sample("prompt", [5, 6, 7], [], np.zeros((0, 3)), np.zeros((0, 3)), [], np.zeros(3, bool))
    for group in ([empty], [one], [ends], [prompt_only],
                  [empty, one, ends, prompt_only, dataclasses.replace(one, sample_id="one-again")]):
        for a, b in zip(group, roundtrip(group, 3), strict=True):
            assert_exact(a, b)
    k1 = _sample("k1", [3, 3, 3, 9, 3], [0, 1, 2, 3], [[3], [3], [9], [49151]], [[-0.5], [-0.5], [-2.0], [-np.inf]],
                 [-0.5, -0.5, -2.0, -9.0])
    assert_exact(k1, roundtrip([k1], 1)[0])


def test_v3_long_copy_chains_resolve():
    """Ids that stay in the top-k for a thousand positions (copies of copies) and a sample boundary
    right after them: a copy never crosses into another sample."""
    n = 1200
    ids = np.tile(np.array([11, 12, 13, 14], np.int32), (n, 1))
    ids[::7] = ids[::7][:, ::-1]  # the order changes now and then: copies from other ranks
    lp = np.tile(np.array([-0.3, -1.5, -2.0, -2.5], np.float32), (n, 1))
    a = _sample("chain", np.arange(n + 1) + 1000, np.arange(n), ids, lp, np.full(n, -6.0))  # no context repeats
    b = _sample("next", np.arange(6) + 5000, np.arange(5), ids[:5] + 1, lp[:5], np.full(5, -6.0))
    for x, y in zip([a, b], roundtrip([a, b], 4), strict=True):
        assert_exact(x, y)
    stats: dict = {}
    codec.encode_shard([a, b], 4, stats=stats)
    assert stats["copy"] > 0  # the chain was coded as copies


def test_v3_random_shards_roundtrip_exactly():
    """Property-style: random shards (1-7 samples, k 1-12, vocabularies from 5 to 2**31 ids, gold in or
    out of the top-k, truncated rows, -inf entries, prompt-only samples) decode to the quantised input
    exactly, under both logprob steps; v2 and v3 on the same input."""
    rng = np.random.default_rng(31)
    for case in range(24):
        k = int(rng.integers(1, 13))
        vocab = int(rng.choice([5, 60, 3000, 50000, 2**31 - 1]))
        samples = []
        for i in range(int(rng.integers(1, 8))):
            s = make_sample(rng, f"c{case}-{i}", k=k, n_tokens=int(rng.integers(2, 90)), vocab=max(vocab, k + 1),
                            gold_rate=float(rng.random()), all_positions=bool(rng.random() < 0.5))
            if vocab == 5 and len(s.positions):  # a tiny vocabulary: the same ids row after row
                s.topk_ids[:] = np.argsort(rng.random((len(s.positions), 6)), axis=1)[:, :k] if k <= 6 else s.topk_ids
            if rng.random() < 0.3 and len(s.positions):
                s.topk_ids, s.topk_logprobs = codec.truncate_topk(s.topk_ids, s.topk_logprobs, top_p=0.5)
            if rng.random() < 0.3 and s.topk_logprobs.size:
                s.topk_logprobs[rng.integers(len(s.positions)), -1] = -np.inf
            samples.append(s)
        config = codec.CodecConfig() if case % 2 else codec.CodecConfig(step_units=1, step_log2=5)
        for version in (2, 3):
            cfg = codec.CodecConfig(step_units=config.step_units, step_log2=config.step_log2, version=version)
            for a, b in zip(samples, roundtrip(samples, k, cfg), strict=True):
                assert_exact(a, b, cfg)


def test_writer_writes_v3_and_a_v2_dataset_keeps_v2(tmp_path):
    rng = np.random.default_rng(32)
    meta = LogitsMeta(dataset_id="d", teacher_name="t", teacher_revision="0", tokenizer_fingerprint="f",
                      k=10, chat_template="c", max_length=64, all_positions=False)
    shard_codecs = {}
    for name, cfg in (("new", None), ("old", codec.CodecConfig(version=2))):
        uri = str(tmp_path / name)
        with LogitsWriter(uri, meta, shard_rows=2, codec_config=cfg) as w:
            w.write(make_sample(rng, "a"))
        with LogitsWriter(uri, meta, shard_rows=2) as w:  # resumed with the default config
            w.write(make_sample(rng, "b"))
        reader = LogitsReader(uri)
        shard_codecs[name] = {codec.read_shard_bytes((tmp_path / name / s.file).read_bytes())[1].codec
                              for s in reader.manifest.shards}
        assert [s.sample_id for s in reader.iter_samples()] == ["a", "b"]
    assert shard_codecs == {"new": {codec.CODEC_NAME}, "old": {codec.CODEC_V2}}


def test_v3_repeated_ids_in_a_row_and_listed_gold():
    """v3 codes a listed id's index among those the row's gold and earlier entries do not hold: a row
    that repeats an id (nothing forbids it) or repeats the gold id must still come back exactly."""
    n = 60
    inp = np.tile(np.array([5, 7, 9], np.int32), n // 3 + 1)[: n + 1]  # contexts repeat: lists form
    ids = np.tile(np.array([7, 9, 5, 11], np.int32), (n, 1))
    ids[::4, 1] = ids[::4, 0]  # rank 1 repeats rank 0
    ids[1::4, 3] = inp[2::4][: len(ids[1::4])]  # the gold id again at rank 3
    lp = np.tile(np.array([-0.5, -1.0, -2.0, -3.0], np.float32), (n, 1))
    gold = np.full(n, -0.5, np.float32)
    s = _sample("rep", inp, np.arange(n), ids, lp, gold)
    codec.validate(s, 4)
    stats: dict = {}
    codec.encode_shard([s], 4, stats=stats)
    assert stats["id"] > 0
    assert_exact(s, roundtrip([s], 4)[0])
