"""Round trips of the top-k codec: ids exact, logprobs within the stated bound of the fp32 input."""

from __future__ import annotations

import numpy as np
import pytest

from datastore import codec
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
    with pytest.raises(ValueError, match="finite"):
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
