"""How extraction groups samples into padded batches (`teacher_server.batching.plan_batches`): what a user
pays for is padded tokens, so both bounds are checked on the batches themselves."""

from __future__ import annotations

import random

import pytest

from teacher_server.batching import MAX_PADDING, plan_batches


@pytest.mark.parametrize("seed", range(20))
def test_every_sample_once_and_padding_bounded(seed):
    rng = random.Random(seed)
    lengths = [int(rng.lognormvariate(4.5, 1.0)) + 2 for _ in range(rng.randint(1, 300))]
    budget = rng.choice([64, 512, 4096, 16384])
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        real = sum(lengths[i] for i in b)
        assert len(b) == 1 or padded <= budget
        assert len(b) == 1 or padded <= (1 + MAX_PADDING) * real
    # longest first: the first batch holds the longest sample
    assert max(lengths) in [lengths[i] for i in batches[0]]


def test_a_mixed_range_is_split_instead_of_padded_threefold():
    """The case that halved real-model extraction speed: 40 chats of 20..400 tokens fit a 16,384-token
    budget at once, padded to 16,000 tokens for 8,420 real ones."""
    lengths = [20 + 10 * i for i in range(39)] + [400]
    assert 40 * 400 <= 16384
    batches = plan_batches(lengths, 16384)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded <= 1.25 * sum(lengths) and len(batches) > 1
    assert plan_batches(lengths, 16384, max_padding=10.0) == [sorted(range(40), key=lambda i: -lengths[i])]


@pytest.mark.parametrize("seed", range(10))
def test_packed_batches_fill_the_budget_with_real_tokens(seed):
    """For an engine that packs sequences (vLLM), a batch costs its real tokens: the mixed range that a
    padded plan splits goes in one call, and a batch closes only before its real tokens pass the budget."""
    rng = random.Random(seed)
    lengths = [int(rng.lognormvariate(4.5, 1.0)) + 2 for _ in range(rng.randint(1, 300))]
    budget = rng.choice([64, 512, 4096])
    batches = plan_batches(lengths, budget, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for n, b in enumerate(batches):
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget
        if n + 1 < len(batches):  # closed only because the next sample did not fit
            assert sum(lengths[i] for i in b) + lengths[batches[n + 1][0]] > budget
    mixed = [20 + 10 * i for i in range(39)] + [400]
    assert len(plan_batches(mixed, 16384, packed=True)) == 1 < len(plan_batches(mixed, 16384))


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="batch_tokens 0"):
        plan_batches([3], 0)
    with pytest.raises(ValueError, match="max_padding -1"):
        plan_batches([3], 10, -1)
