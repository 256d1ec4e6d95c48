"""Reuse at sample level: a scored sample is identified by its content, so a dataset that overlaps
datasets already scored by the same teacher with the same settings computes only its new samples.

`sample_key` hashes what determines a sample's stored values: the scoring settings (teacher, revision,
tokenizer fingerprint, k, template, max length, positions mode: `LogitsMeta` without `dataset_id`) and the
rendered sample (text, tokens after truncation, loss mask, scored positions). `LogitsWriter` records each
shard's keys in the log (`ShardInfo.sample_keys`), so `ReuseIndex` is built from the logs alone.

Reused samples are *copied*: decoded from the earlier dataset and committed into the new one under the new
sample id, re-encoded on the same quantisation grid (a decoded value ``-5q/128`` quantises back to ``q``),
so they read back exactly as stored before, and every dataset stays self-contained: removing one
(`logitfuse store rm`) never takes samples from under another.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np

from datastore.manifest import LogitsMeta


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


class ReuseIndex:
    """Content key -> where an earlier logits dataset of the store holds that sample, for one scoring
    key. Broken or other-settings datasets are skipped."""

    def __init__(self, locations: dict[str, tuple[str, int, int]], readers: dict):
        self._locations, self._readers = locations, readers

    def __len__(self) -> int:
        return len(self._locations)

    @classmethod
    def build(cls, store_uri: str, meta: LogitsMeta, exclude_uri: str | None = None) -> ReuseIndex:
        from datastore.catalog import catalog
        from datastore.reader import LogitsReader

        want = scoring_key(meta)
        locations: dict[str, tuple[str, int, int]] = {}
        readers = {}
        for entry in catalog(store_uri, kind="logits", missing_ok=True, with_manifest=True):
            if entry["status"] != "ok" or entry["uri"].rstrip("/") == (exclude_uri or "").rstrip("/"):
                continue
            m = entry["manifest"]
            if scoring_key(m.meta) != want or not any(s.sample_keys for s in m.shards):
                continue
            reader = LogitsReader(entry["uri"])
            readers[entry["uri"]] = reader
            for i, shard in enumerate(reader.manifest.shards):
                for row, key in enumerate(shard.sample_keys):
                    locations.setdefault(key, (entry["uri"], i, row))
        return cls(locations, readers)

    def has(self, key: str) -> bool:
        return key in self._locations

    def fetch(self, wanted: list[tuple[str, str]]) -> dict[str, object]:
        """[(content key, new sample id)] -> {new sample id: ScoredSample} for the keys the index holds
        (several new ids may share a key: identical samples), each read from one verified shard (rows of
        a shard decoded together) and renamed."""
        by_shard: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        for key, new_id in wanted:
            if key in self._locations:
                uri, i, row = self._locations[key]
                by_shard[(uri, i)].append((row, new_id))
        out = {}
        for (uri, i), rows in by_shard.items():
            reader = self._readers[uri]
            got = reader.read_shard(reader.manifest.shards[i], rows=[r for r, _ in rows])
            for sample, (_row, new_id) in zip(got, rows, strict=True):
                sample.sample_id = new_id
                out[new_id] = sample
        return out
