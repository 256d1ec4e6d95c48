"""trainer.data: packing (tokens, shift, targets, no cross-sample attention), shuffling, per-rank sharding,
exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from datastore.errors import UserError
from datastore.targets import TargetSample, TargetsMeta, TargetsWriter
from trainer.data import DataConfig, StreamState, TargetStream, estimate_rows_per_epoch

K = 3
VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def random_sample(i: int, k: int = K, vocab: int = VOCAB, max_len: int = 30) -> TargetSample:
    rng = np.random.default_rng(1000 + i)
    T = int(rng.integers(4, max_len))
    tokens = rng.integers(1, vocab, T).astype(np.int32)
    tokens[0] = i % vocab  # makes samples recognisable
    mask = np.zeros(T, bool)
    mask[int(rng.integers(1, min(T - 1, 8))) :] = True
    positions = np.arange(T - 1, dtype=np.int32)  # every position scored; only response ones are used
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in positions]).astype(np.int32)
    probs = rng.dirichlet(np.ones(k), len(positions)).astype(np.float32) * 0.9
    return TargetSample(f"s{i:05d}", tokens, mask, positions, ids, probs)


def write_targets(path, n: int, shard_rows: int = 7, pivot_tokenizer=None, **kw) -> tuple[str, dict[str, TargetSample]]:
    """`n` random samples; with `pivot_tokenizer`, the meta records its fingerprint and size as fusion does."""
    recorded = {}
    if pivot_tokenizer is not None:
        from datastore.tokenizers import tokenizer_fingerprint

        recorded = dict(pivot_tokenizer=tokenizer_fingerprint(pivot_tokenizer), pivot_vocab_size=len(pivot_tokenizer))
    meta = TargetsMeta(pivot="p", sources=["s"], align="offsets", vocab_map="ms", fusion="mince", k=K, **recorded)
    samples = [random_sample(i, **kw) for i in range(n)]
    with TargetsWriter(str(path), meta, shard_rows=shard_rows) as w:
        for s in samples:
            w.write(s)
    return str(path), {s.sample_id: s for s in samples}


def unpack(batch, L: int):
    """Split a packed batch back into per-sample token arrays (using the position-id restarts)."""
    out = []
    for b in range(batch.input_ids.shape[0]):
        pos = batch.position_ids[b].numpy()
        starts = np.flatnonzero(pos == 0)
        for j, s in enumerate(starts):
            e = starts[j + 1] if j + 1 < len(starts) else L
            out.append((b, s, batch.input_ids[b, s:e].numpy()))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_targets(tmp_path_factory.mktemp("targets") / "t", 60)


def test_packing_shift_and_targets(dataset):
    uri, samples = dataset
    L = 64
    by_first = {}
    for s in samples.values():
        by_first.setdefault((int(s.input_ids[0]), len(s.input_ids)), []).append(s)
    stream = TargetStream(uri, DataConfig(seq_len=L, batch_size=2, shuffle_buffer=16, seed=3))
    batch = next(iter(stream))
    flat_ids = batch.input_ids.reshape(-1)
    # the shift: row t's gold is token t + 1 of the same packed row
    torch.testing.assert_close(batch.gold, flat_ids[batch.row_index + 1])
    assert batch.position_ids.shape == (2, L) and batch.input_ids.shape == (2, L)
    rows = {int(r): i for i, r in enumerate(batch.row_index)}
    seen = 0
    for b, start, toks in unpack(batch, L):
        matches = [s for s in by_first.get((int(toks[0]), len(toks)), []) if np.array_equal(s.input_ids, toks)]
        if not matches:
            continue  # the padding block at the end of a row
        s = matches[0]
        seen += 1
        trained = np.flatnonzero(s.loss_mask[1:])
        for t in range(len(toks) - 1):
            flat = b * L + start + t
            assert (flat in rows) == (t in set(trained.tolist()))  # only positions predicting a response token
            if flat in rows:
                r = rows[flat]
                np.testing.assert_array_equal(batch.topk_ids[r].numpy(), s.topk_ids[t])
                np.testing.assert_allclose(batch.topk_probs[r].numpy(), s.topk_probs[t], atol=2e-5)
                assert int(batch.gold[r]) == int(s.input_ids[t + 1])
    assert seen == batch.num_samples >= 3
    assert batch.num_targets == len(batch.row_index)


def epoch_ids(uri, samples, config: DataConfig, n_batches: int):
    stream = TargetStream(uri, config)
    got = []
    for batch in itertools.islice(iter(stream), n_batches):
        for _, _, toks in unpack(batch, config.seq_len):
            got.extend(sid for sid, s in samples.items() if np.array_equal(s.input_ids[: config.seq_len], toks))
    return got, stream


def test_epoch_sees_every_sample_once_and_shuffle_is_seeded(dataset):
    uri, samples = dataset
    cfg = DataConfig(seq_len=40, batch_size=1, shuffle_buffer=8, seed=1)
    n_rows = estimate_rows_per_epoch(uri, 40)
    stream = TargetStream(uri, cfg)
    got = []
    for batch in iter(stream):
        for _, _, toks in unpack(batch, 40):
            got.extend(sid for sid, s in samples.items() if np.array_equal(s.input_ids[:40], toks))
        if batch.state.epoch > 0:
            break
    got = got[: len(samples)]  # the last row may run on into the next epoch
    assert sorted(got) == sorted(samples)  # every sample once (none lacks a response token here)
    assert got != sorted(got)  # shuffled
    again, _ = epoch_ids(uri, samples, cfg, 5)
    other, _ = epoch_ids(uri, samples, DataConfig(seq_len=40, batch_size=1, shuffle_buffer=8, seed=2), 5)
    assert again == got[: len(again)] and other[:10] != got[:10]
    assert 0.7 * n_rows <= len(got) and n_rows > 0


def test_ranks_split_each_global_batch_of_the_one_process_stream(dataset):
    """The global batches do not depend on the number of ranks: rank r's micro-batch is rows r*m..(r+1)*m-1
    of what one process packs with m*world rows per micro-batch (so the ranks' samples are disjoint and
    together are the group), and a stream resumed from a 2-rank state on 1 or 3 ranks goes on with the same
    rows. Before, each rank packed its own shards: another order than one process, and ranks whose shards
    held fewer samples cycled through them faster."""
    uri, _ = dataset

    def stream(world, rank, rows, state=None):
        cfg = DataConfig(seq_len=40, batch_size=rows, shuffle_buffer=8, seed=5, rank=rank, world_size=world)
        return TargetStream(uri, cfg, state)

    one = list(itertools.islice(iter(stream(1, 0, 6)), 12))  # 72 rows: past the first epoch
    assert one[-1].state.epoch >= 1

    def check(groups, ranks, start):
        world = len(ranks)
        for g, batch in enumerate(one[start:]):
            parts = [ranks[r][g] for r in range(world)]
            for name in ("input_ids", "position_ids"):
                torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(batch, name))
            assert sum(p.num_targets for p in parts) == batch.num_targets
            assert all(p.state == batch.state for p in parts)

    for world in (2, 3, 6):
        ranks = [list(itertools.islice(iter(stream(world, r, 6 // world)), 12)) for r in range(world)]
        check(one, ranks, 0)
    two = [list(itertools.islice(iter(stream(2, r, 3)), 5)) for r in range(2)]
    for world in (1, 3):
        resumed = [list(itertools.islice(iter(stream(world, r, 6 // world, two[r % 2][4].state)), 7))
                   for r in range(world)]
        check(one, resumed, 5)
    # more ranks than shards (60 samples in 9 shards): every rank still gets rows
    many = [next(iter(stream(20, r, 1))) for r in range(20)]
    assert all(b.num_samples >= 1 for b in many)


def test_resume_reproduces_the_stream_exactly(dataset):
    uri, _ = dataset
    cfg = DataConfig(seq_len=48, batch_size=2, shuffle_buffer=5, seed=9)
    straight = list(itertools.islice(iter(TargetStream(uri, cfg)), 30))  # runs over epoch ends
    assert straight[-1].state.epoch >= 1
    for cut in (1, 7, 19):
        resumed = list(itertools.islice(iter(TargetStream(uri, cfg, straight[cut - 1].state)), 30 - cut))
        for a, b in zip(straight[cut:], resumed, strict=True):
            for name in ("input_ids", "position_ids", "row_index", "gold", "topk_ids", "topk_probs"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name))
            assert a.state == b.state
    assert StreamState.from_dict(straight[3].state.to_dict()) == straight[3].state


def test_long_samples_are_truncated_and_bad_ids_refused(tmp_path):
    uri, samples = write_targets(tmp_path / "long", 5, max_len=200)
    stream = TargetStream(uri, DataConfig(seq_len=16, shuffle=False))
    batch = next(iter(stream))
    assert batch.input_ids.shape == (1, 16) and int(batch.row_index.max()) < 15
    stream = TargetStream(uri, DataConfig(seq_len=16))
    stream.check_vocab(50)
    with pytest.raises(UserError, match="vocabulary size 50"):
        next(iter(stream))
    with pytest.raises(UserError):
        DataConfig(rank=2, world_size=2)


def test_samples_without_response_tokens_are_an_error_when_all_are(tmp_path):
    meta = TargetsMeta(pivot="p", sources=[], align="a", vocab_map="v", fusion="f", k=K)
    with TargetsWriter(str(tmp_path / "t"), meta) as w:
        w.write(TargetSample("a", np.arange(5, dtype=np.int32), np.zeros(5, bool), np.zeros(0, np.int32),
                             np.zeros((0, K), np.int32), np.zeros((0, K), np.float32)))
    with pytest.raises(UserError, match="no sample has a response token"):
        next(iter(TargetStream(str(tmp_path / "t"), DataConfig(seq_len=8))))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_packed_attention_equals_separate_forwards(arch):
    """position ids restarting per sample and no mask: transformers attends within each sample only."""
    from transformers import AutoModelForCausalLM

    from clients.tiny_models import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB, 1, 2, hidden_size=64, intermediate_size=64))
    model.eval()
    lengths = [5, 9, 3]
    seqs = [torch.randint(3, VOCAB, (n,)) for n in lengths]
    L = 20
    ids = torch.zeros(1, L, dtype=torch.long)
    pos = torch.zeros(1, L, dtype=torch.long)
    off = 0
    for s in seqs:
        ids[0, off : off + len(s)], pos[0, off : off + len(s)] = s, torch.arange(len(s))
        off += len(s)
    pos[0, off:] = torch.arange(L - off)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]  # a cache disables packing
        off = 0
        for s in seqs:
            alone = model(input_ids=s[None]).logits[0]
            torch.testing.assert_close(packed[off : off + len(s)], alone, rtol=1e-4, atol=1e-4)
            off += len(s)
