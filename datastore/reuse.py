"""Reuse at sample level: a scored sample is identified by its content, so a dataset that overlaps
datasets already scored by the same teacher with the same settings computes only its new samples.

`sample_key` hashes what determines a sample's stored values: the scoring settings (teacher, revision,
tokenizer fingerprint, k, template, max length, positions mode: `LogitsMeta` without `dataset_id`) and the
rendered sample (text, tokens after truncation, loss mask, scored positions). `LogitsWriter` records each
shard's keys in the log (`ShardInfo.sample_keys`), so `ReuseIndex` is built from the logs alone.

Reused samples are *copied*, so every dataset stays self-contained: removing one (`logitfuse store rm`)
never takes samples from under another. `ReuseIndex.plan` copies them in one of two ways:

- a **whole shard** of an earlier dataset whose every row the new range wants (an extended dataset's
  ranges line up with the original's shards) is committed again with only its sample ids rewritten
  (`ShardCopy`, `datastore.codec.rename_samples`): the top-k stream and every other column are carried
  over as stored, nothing is decoded or re-encoded;
- the other samples are decoded from their shard, renamed, and encoded with the new range's scored
  samples, on the same quantisation grid (a decoded value ``-5q/128`` quantises back to ``q``).

Either way a reused sample reads back exactly as it was stored before. Only datasets with the same
logprob step are used (another step would quantise the values twice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter, OrderedDict, defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from datastore.manifest import LogitsMeta, ShardInfo
from datastore.sample import ScoredSample


def scoring_key(meta: LogitsMeta) -> str:
    """The settings that determine a sample's scores: the logits meta without its input dataset."""
    fields = meta.model_dump(mode="json")
    fields.pop("dataset_id")
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def sample_key(scoring: str, text: str | None, input_ids: np.ndarray, loss_mask: np.ndarray,
               positions: np.ndarray) -> str:
    """32-hex content key of one rendered sample under `scoring` (`scoring_key`)."""
    h = hashlib.sha256(scoring.encode())
    h.update(b"\0text\0" + (text or "").encode())
    h.update(b"\0ids\0" + np.ascontiguousarray(input_ids, dtype="<i4").tobytes())
    h.update(b"\0mask\0" + np.packbits(np.asarray(loss_mask, dtype=bool)).tobytes())
    h.update(b"\0pos\0" + np.ascontiguousarray(positions, dtype="<i4").tobytes())
    return h.hexdigest()[:32]


def _grid(encoding: dict) -> tuple:
    """What must match for a stored value to be reused: the logprob step."""
    return int(encoding.get("step_units", 5)), int(encoding.get("step_log2", 7))


def _codec(encoding: dict) -> tuple:
    """What must match for a shard's bytes to be copied as they are: codec version and step."""
    return encoding.get("codec"), *_grid(encoding)


@dataclass
class ShardCopy:
    """A whole shard of an earlier dataset, to be committed under new sample ids (`Claim.commit`).

    Attributes:
        source_uri: the earlier dataset.
        shard: its log's facts about the shard (rows, positions, tokens, content keys, sha256).
        sample_ids: the new dataset's id of each row, in row order.
        data: the shard's bytes, already checked against `shard.sha256`.
    """

    source_uri: str
    shard: ShardInfo
    sample_ids: list[str]
    data: bytes


@dataclass
class ReusePlan:
    """How a range's reusable samples are copied: whole shards (`copies`) and decoded samples
    (`samples`, new id -> `ScoredSample` already renamed)."""

    copies: list[ShardCopy] = field(default_factory=list)
    samples: dict[str, ScoredSample] = field(default_factory=dict)

    @property
    def sample_ids(self) -> set[str]:
        """Every new sample id the plan provides."""
        return {i for c in self.copies for i in c.sample_ids} | set(self.samples)


@dataclass
class _Source:
    uri: str
    fs: object
    root: str
    shards: list[ShardInfo]
    encoding: dict


class ReuseIndex:
    """Content key -> where an earlier logits dataset of the store holds that sample, for one scoring
    key and logprob step. Broken datasets, 0.1 datasets (no content keys) and other settings are
    skipped."""

    # decoded shards kept between ranges, in positions (~8 bytes each per top-k entry, ids and logprobs):
    # identical samples of a new dataset that sit in different ranges decode their shard once
    CACHE_POSITIONS = 1 << 20

    def __init__(self, sources: list[_Source], locations: dict[str, tuple[int, int, int]]):
        self._sources, self._locations = sources, locations
        self._decoded: OrderedDict[tuple[int, int], list[ScoredSample]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._locations)

    @classmethod
    def build(cls, store_uri: str, meta: LogitsMeta, encoding: dict, exclude_uri: str | None = None) -> ReuseIndex:
        """The index of every other logits dataset of `store_uri` scored with `meta`'s settings and
        stored with `encoding`'s logprob step (`datastore.codec.CodecConfig.describe`). A dataset's
        description is checked before its shards' facts are read, so datasets of other teachers or
        settings cost one log read each."""
        from datastore import fs
        from datastore.catalog import iter_datasets
        from datastore.table import DeltaDataset
        from datastore.writer import manifest_from_snapshot

        want, grid = scoring_key(meta), _grid(encoding)
        sources: list[_Source] = []
        locations: dict[str, tuple[int, int, int]] = {}
        for _kind, uri, _name in iter_datasets(store_uri, kind="logits", missing_ok=True):
            if uri.rstrip("/") == (exclude_uri or "").rstrip("/"):
                continue
            try:
                table = DeltaDataset(uri)
                if not table.exists():  # 0.1 datasets hold no content keys
                    continue
                info = table.info()
                if info.get("kind") != "logits" or _grid(info.get("encoding") or {}) != grid or \
                        scoring_key(LogitsMeta.model_validate(info["meta"])) != want:
                    continue
                manifest = manifest_from_snapshot(table.snapshot())
            except Exception:  # noqa: BLE001 - a broken dataset is simply not reused
                continue
            src = len(sources)
            filesystem, root = fs.resolve(uri)
            sources.append(_Source(uri, filesystem, root, manifest.shards, manifest.encoding))
            for i, shard in enumerate(manifest.shards):
                for row, key in enumerate(shard.sample_keys):
                    locations.setdefault(key, (src, i, row))
        return cls(sources, locations)

    def has(self, key: str) -> bool:
        return key in self._locations

    def plan(self, wanted: list[tuple[str, str]], encoding: dict) -> ReusePlan:
        """[(content key, new sample id)] of one range -> how to copy those the index holds (several new
        ids may share a key: identical samples). A shard every row of which is wanted, stored with
        `encoding`'s codec, becomes a `ShardCopy`; the other samples are decoded (rows of a shard
        together) and renamed. Shards that cannot be read or fail their checksum are skipped: their
        samples are not in the plan, so the caller scores them."""
        from datastore.shards import read_verified

        pending: dict[str, deque[str]] = defaultdict(deque)
        candidates: dict[tuple[int, int], None] = {}
        for key, new_id in wanted:
            loc = self._locations.get(key)
            if loc is not None:
                pending[key].append(new_id)
                candidates.setdefault(loc[:2], None)
        out = ReusePlan()
        target = _codec(encoding)
        for src, i in candidates:
            source, shard = self._sources[src], self._sources[src].shards[i]
            need = Counter(shard.sample_keys)
            if _codec(source.encoding) != target or len(shard.sample_keys) != shard.rows or \
                    any(len(pending.get(k, ())) < n for k, n in need.items()):
                continue
            try:
                data = read_verified(source.fs, source.root, shard)
            except (OSError, ValueError):
                continue
            ids = [pending[k].popleft() for k in shard.sample_keys]
            out.copies.append(ShardCopy(source.uri, shard, ids, data))

        by_shard: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)
        for key, ids in pending.items():
            src, i, row = self._locations[key]
            by_shard[(src, i)].extend((row, new_id) for new_id in ids)
        for (src, i), rows in by_shard.items():
            try:
                decoded = self._decode(src, i)
            except (OSError, ValueError):
                continue
            for row, new_id in rows:
                # a new object per id: a row wanted twice (identical samples) is one decoded object
                out.samples[new_id] = dataclasses.replace(decoded[row], sample_id=new_id)
        return out

    def _decode(self, src: int, i: int) -> list[ScoredSample]:
        """Every row of shard `i` of source `src`, decoded after its checksum is verified (kept in a
        small cache of recently decoded shards)."""
        from datastore import codec
        from datastore.shards import read_verified

        if (src, i) in self._decoded:
            self._decoded.move_to_end((src, i))
            return self._decoded[(src, i)]
        source, shard = self._sources[src], self._sources[src].shards[i]
        table, ctx = codec.read_shard_bytes(read_verified(source.fs, source.root, shard))
        decoded = codec.decode_rows(table, ctx)
        self._decoded[(src, i)] = decoded
        while sum(self._sources[s].shards[j].positions for s, j in self._decoded) > self.CACHE_POSITIONS \
                and len(self._decoded) > 1:
            self._decoded.popitem(last=False)
        return decoded
