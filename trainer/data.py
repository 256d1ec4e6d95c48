"""Streaming input of the trainer: targets shards (local or S3) -> packed, ready-to-train tensors.

Order. The stream is one global sequence of packed rows, a pure function of ``(seed, epoch)`` and the manifest:
it does not depend on the number of processes, so a run on N processes trains on exactly the global batches
of a run on one (same ``--batch-size``), and a run can resume on another number of processes.

1. The shards are permuted with ``rng(seed, epoch)``; their samples, shard after shard, are cut into
   windows of ``shuffle_buffer`` samples and each window is permuted with ``rng(seed, epoch, 0, window)``
   (shuffle by shard plus a bounded buffer; the 0 keeps the order one-process runs always had).
2. Samples are packed greedily, in that order, into rows of ``seq_len`` tokens; a sample that does not fit
   starts the next row (a sample longer than ``seq_len`` is truncated to its first ``seq_len`` tokens).
   Rows run on across epoch ends.

Ranks. The rows come in groups of ``world_size * batch_size``: one micro-batch for every rank. Rank ``r``
takes rows ``r * batch_size ... (r + 1) * batch_size - 1`` of every group, so the ranks' samples are
disjoint and together are the group. Every rank walks the same sample order (it needs each sample's length
to know where rows end; a sample's length is a slice of the decoded shard), decoding the shards the current
window spans, but builds tensors only for its own rows. Reading every shard on every rank costs little:
the targets are ~50 bytes per trained position and decode at over a million positions per CPU-second
(bench/bench_trainer.py), far above what a GPU trains per second.

Attention never crosses samples: each sample's ``position_ids`` restart at 0 and no attention mask is
passed, which transformers (Llama, Mistral, Mixtral, Qwen2; eager, sdpa and flash-attention-2) turns into a
block-diagonal causal mask (`transformers.masking_utils.find_packed_sequence_indices`). The padding at the
end of a row is one more block whose outputs are never used.

Rows of the loss. For every position ``t`` whose next token is a response token (``loss_mask[t + 1]``) the
batch has one row: its flat index in ``[B * seq_len]``, the gold next token ``input_ids[t + 1]`` and the
fused top-k of that position, or ``-1`` ids where the targets have none. Target positions whose next token
is not a response token are dropped. Samples with no response token are skipped.

Resume. `StreamState` ``(epoch, index)`` names the first sample of the global order that is not in an
emitted group. Packing restarts cleanly from there, so a stream rebuilt from a saved state yields exactly
the rows the original would have, for any number of ranks. Each `PackedBatch` carries the state after its
group, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from datastore.errors import UserError
from datastore.targets import ShardArrays, TargetsReader


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 2048
    batch_size: int = 1  # packed rows per micro-batch (per rank)
    shuffle_buffer: int = 1024
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    pad_id: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1 or self.shuffle_buffer < 1:
            raise UserError("seq_len must be >= 2, batch_size and shuffle_buffer >= 1")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is not in [0, world_size={self.world_size})")


@dataclass(frozen=True)
class StreamState:
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


@dataclass
class PackedBatch:
    """One micro-batch, ready for the model and `trainer.losses.chunked_head_loss`."""

    input_ids: torch.Tensor  # int64 [B, L]
    position_ids: torch.Tensor  # int64 [B, L], restarting at 0 for every sample (and for the padding)
    row_index: torch.Tensor  # int64 [R] flat index b * L + t of each trained position t
    gold: torch.Tensor  # int64 [R] the next token input_ids[t + 1]
    topk_ids: torch.Tensor  # int64 [R, K], -1 = padding / no target
    topk_probs: torch.Tensor  # float32 [R, K]
    num_samples: int
    num_tokens: int  # real (non-padding) tokens
    num_targets: int  # rows that have a fusion target
    state: StreamState  # where the stream resumes after this batch

    def to(self, device) -> PackedBatch:
        for name in ("input_ids", "position_ids", "row_index", "gold", "topk_ids", "topk_probs"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


@dataclass
class _Prepared:
    """One sample cut to seq_len, with its loss rows in sample coordinates."""

    tokens: np.ndarray  # int32 [T]
    rows: np.ndarray  # int64 [R] positions t with loss_mask[t + 1]
    ids: np.ndarray  # int32 [R, K]
    probs: np.ndarray  # float32 [R, K]
    num_targets: int


class TargetStream:
    """An endless iterator of `PackedBatch`es over a targets dataset (epochs run on), for one rank."""

    def __init__(self, uri: str, config: DataConfig, state: StreamState | None = None):
        self.reader = TargetsReader(uri)
        self.config = config
        self.k = self.reader.k
        self.state = state or StreamState()
        shards = self.reader.manifest.shards
        if not shards or self.reader.manifest.num_samples == 0:
            raise UserError(f"targets dataset {uri} has no samples")
        self._cache: dict[int, ShardArrays] = {}
        self._epoch_plan: tuple[int, list[int], np.ndarray] | None = None
        self._window: tuple[int, int, list[tuple[int, int]]] | None = None

    # ------------------------------------------------------------ order

    def _units(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """The shards of an epoch in their shuffled order, and the cumulative sample counts."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            c = self.config
            shards = self.reader.manifest.shards
            order = list(range(len(shards)))
            if c.shuffle:
                order = [int(j) for j in np.random.default_rng([c.seed, epoch]).permutation(len(shards))]
            bounds = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum([shards[i].rows for i in order], out=bounds[1:])
            self._epoch_plan = (epoch, order, bounds)
        return self._epoch_plan[1], self._epoch_plan[2]

    def epoch_size(self, epoch: int = 0) -> int:
        """Samples in an epoch, all ranks together (before skipping samples without response tokens)."""
        return int(self._units(epoch)[1][-1])

    def _window_refs(self, epoch: int, w: int) -> list[tuple[int, int]]:
        """(shard, row) of the samples of window ``w`` of an epoch, in their shuffled order."""
        key = (epoch, w)
        if self._window is not None and self._window[:2] == key:
            return self._window[2]
        c = self.config
        units, bounds = self._units(epoch)
        lo, hi = w * c.shuffle_buffer, min(int(bounds[-1]), (w + 1) * c.shuffle_buffer)
        refs: list[tuple[int, int]] = []
        u = int(np.searchsorted(bounds, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            shard = units[u]
            start, stop = pos - int(bounds[u]), min(hi, int(bounds[u + 1])) - int(bounds[u])
            refs.extend((shard, r) for r in range(start, stop))
            pos = int(bounds[u]) + stop
            u += 1
        if c.shuffle:
            order = np.random.default_rng([c.seed, epoch, 0, w]).permutation(len(refs))
            refs = [refs[j] for j in order]
        self._window = (epoch, w, refs)
        # keep only the shards this window needs decoded
        needed = {s for s, _ in refs}
        for s in list(self._cache):
            if s not in needed:
                del self._cache[s]
        return refs

    def _shard(self, i: int) -> ShardArrays:
        if i not in self._cache:
            arrays = self.reader.read_shard(i, with_extras=False)
            if arrays.topk_ids.size and int(arrays.topk_ids.max()) >= self._vocab_limit:
                raise UserError(
                    f"{self.reader.uri}: shard {i} has target id {int(arrays.topk_ids.max())} >= the model's "
                    f"vocabulary size {self._vocab_limit}: targets and --model do not match"
                )
            if arrays.input_ids.size and int(arrays.input_ids.max()) >= self._vocab_limit:
                raise UserError(
                    f"{self.reader.uri}: shard {i} has token id {int(arrays.input_ids.max())} >= the model's "
                    f"vocabulary size {self._vocab_limit}: targets and --model do not match"
                )
            self._cache[i] = arrays
        return self._cache[i]

    _vocab_limit = 2**31 - 1

    def check_vocab(self, vocab_size: int) -> None:
        """Make every shard read raise UserError on ids outside ``[0, vocab_size)``."""
        self._vocab_limit = int(vocab_size)

    def _samples(self, state: StreamState) -> Iterator[tuple[StreamState, int, int, int]]:
        """The samples with a response token from `state` on, in the global order: (its position, shard,
        row, tokens it takes in a packed row). Samples without a response token are passed over."""
        epoch, index = state.epoch, state.index
        L = self.config.seq_len
        while True:
            n, whole = self.epoch_size(epoch), index == 0
            produced = False
            while index < n:
                w, off = divmod(index, self.config.shuffle_buffer)
                shard, row = self._window_refs(epoch, w)[off]
                a = self._shard(shard)
                t0, t1 = int(a.tok_offsets[row]), int(a.tok_offsets[row + 1])
                t1 = min(t1, t0 + L)
                if a.loss_mask[t0 + 1 : t1].any():
                    produced = True
                    yield StreamState(epoch, index), shard, row, t1 - t0
                index += 1
            if whole and not produced:
                raise UserError(f"{self.reader.uri}: no sample has a response token (every loss_mask is False)")
            epoch, index = epoch + 1, 0

    def _prepare(self, a: ShardArrays, row: int) -> _Prepared | None:
        L = self.config.seq_len
        t0, t1 = int(a.tok_offsets[row]), int(a.tok_offsets[row + 1])
        t1 = min(t1, t0 + L)
        tokens = a.input_ids[t0:t1]
        trained = np.flatnonzero(a.loss_mask[t0 + 1 : t1])  # t such that loss_mask[t + 1]
        if not len(trained):
            return None
        p0, p1 = int(a.pos_offsets[row]), int(a.pos_offsets[row + 1])
        positions = a.positions[p0:p1]
        ids = np.full((len(trained), self.k), -1, dtype=np.int32)
        probs = np.zeros((len(trained), self.k), dtype=np.float32)
        where = np.searchsorted(trained, positions)
        hit = where < len(trained)
        hit[hit] = trained[where[hit]] == positions[hit]
        ids[where[hit]] = a.topk_ids[p0:p1][hit]
        probs[where[hit]] = a.topk_probs[p0:p1][hit]
        return _Prepared(tokens, trained, ids, probs, int(hit.sum()))

    # ------------------------------------------------------------ packing

    def __iter__(self) -> Iterator[PackedBatch]:
        """This rank's micro-batches: rows ``rank * batch_size ...`` of each group of ``world_size *
        batch_size`` packed rows of the global order."""
        c = self.config
        L = c.seq_len
        samples = self._samples(self.state)
        pending: tuple[StreamState, int, int, int] | None = None
        while True:
            rows: list[list[_Prepared]] = []
            for j in range(c.world_size * c.batch_size):
                mine = j // c.batch_size == c.rank
                row: list[_Prepared] = []
                used = 0
                while True:
                    if pending is None:
                        pending = next(samples)
                    _, shard, index, length = pending
                    if used and used + length > L:
                        break
                    if mine:  # decoded now, while the sample's window (and shard) is the current one
                        prepared = self._prepare(self._shard(shard), index)
                        assert prepared is not None
                        row.append(prepared)
                    used += length
                    pending = None
                if mine:
                    rows.append(row)
            # the sample waiting in `pending` is the first one not in this group
            self.state = pending[0]
            yield self._collate(rows)

    def _collate(self, rows: list[list[_Prepared]]) -> PackedBatch:
        c = self.config
        L, B = c.seq_len, len(rows)
        input_ids = np.full((B, L), c.pad_id, dtype=np.int64)
        position_ids = np.empty((B, L), dtype=np.int64)
        row_index, gold, ids, probs = [], [], [], []
        n_samples = n_tokens = n_targets = 0
        ar = np.arange(L, dtype=np.int64)
        for b, row in enumerate(rows):
            off = 0
            for prep in row:
                T = len(prep.tokens)
                input_ids[b, off : off + T] = prep.tokens
                position_ids[b, off : off + T] = ar[:T]
                base = b * L + off
                row_index.append(base + prep.rows)
                gold.append(prep.tokens[prep.rows + 1])
                ids.append(prep.ids)
                probs.append(prep.probs)
                off += T
                n_samples += 1
                n_targets += prep.num_targets
            position_ids[b, off:] = ar[: L - off]
            n_tokens += off
        return PackedBatch(
            input_ids=torch.from_numpy(input_ids),
            position_ids=torch.from_numpy(position_ids),
            row_index=torch.from_numpy(np.concatenate(row_index).astype(np.int64)),
            gold=torch.from_numpy(np.concatenate(gold).astype(np.int64)),
            topk_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
            topk_probs=torch.from_numpy(np.concatenate(probs)),
            num_samples=n_samples,
            num_tokens=n_tokens,
            num_targets=n_targets,
            state=self.state,
        )


def estimate_rows_per_epoch(uri: str, seq_len: int) -> int:
    """Packed rows of one epoch over all ranks, from the stored lengths alone (greedy packing in stored
    order; the shuffled order packs within a few percent of it). Used to turn epochs into steps."""
    from datastore.shards import read_columns

    reader = TargetsReader(uri)
    rows, used = 0, 0
    for shard in reader.manifest.shards:
        lengths = read_columns(reader._fs, reader._root, shard, ["num_tokens"]).column("num_tokens").to_numpy()
        for n in np.minimum(lengths, seq_len):
            if used and used + n > seq_len:
                rows, used = rows + 1, 0
            used += int(n)
    return rows + (1 if used else 0)
