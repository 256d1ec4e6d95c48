"""What a logits dataset is (`LogitsMeta`, hashed into its id) and what it holds (`Manifest`).

`Manifest` is the in-memory view of one version of a dataset: built from the dataset's Delta transaction
log (`datastore.table`, the one source of truth), or parsed from the ``manifest.json`` of a dataset
written by logitfuse 0.1 (read-only; `logitfuse store migrate` converts it).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, computed_field

FORMAT = "logitfuse.logits/1"


class LogitsMeta(BaseModel):
    """Identity of a logits dataset: one per (dataset, teacher, k, template, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_id: str
    teacher_name: str
    teacher_revision: str
    tokenizer_fingerprint: str
    k: int = Field(ge=1, le=1024)
    chat_template: str
    max_length: int = Field(ge=1)
    all_positions: bool
    extra: dict = Field(default_factory=dict)


def logits_id(meta: LogitsMeta) -> str:
    """Stable 16-hex id: sha256 of the canonical JSON (sorted keys, no spaces) of the meta."""
    canonical = json.dumps(meta.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def meta_differences(a: LogitsMeta, b: LogitsMeta) -> list[str]:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return [f"{name}: {da[name]!r} != {db[name]!r}" for name in da if da[name] != db[name]]


def code_version() -> str:
    try:
        return importlib.metadata.version("logitfuse")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (logitfuse not installed)"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _bloom_hashes(sample_id: str, num_bits: int) -> list[int]:
    digest = hashlib.blake2b(sample_id.encode(), digest_size=16).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "little") % num_bits for i in range(BLOOM_HASHES)]


BLOOM_BITS_PER_ID = 10  # with 4 hashes: about 1% false positives
BLOOM_HASHES = 4


def id_bloom(sample_ids: list[str]) -> str:
    """A Bloom filter of a shard's sample ids, base64 in the manifest: `LogitsReader.get` reads only the
    shards whose filter admits the id (about 1% false positives) instead of every shard."""
    num_bits = max(64, BLOOM_BITS_PER_ID * len(sample_ids))
    bits = bytearray((num_bits + 7) // 8)
    for sid in sample_ids:
        for h in _bloom_hashes(sid, num_bits):
            bits[h >> 3] |= 1 << (h & 7)
    return base64.b64encode(bytes(bits)).decode()


def bloom_admits(bloom: str, sample_id: str, rows: int) -> bool:
    """Whether the `id_bloom` of a shard of `rows` sample ids may hold `sample_id` (False: it does not).

    The filter's bit count is `id_bloom`'s, ``max(64, 10 * rows)``, which the stored bytes only round up
    to a multiple of 8: it is recomputed from `rows` (0.2 used the rounded count, so a shard whose count
    is not a multiple of 8 — 7, 9, 10, ... rows — admitted none of its own ids and `get` missed them).
    A filter whose size does not fit `rows` admits everything (the caller then reads the shard)."""
    bits = base64.b64decode(bloom)
    num_bits = max(64, BLOOM_BITS_PER_ID * rows)
    if (num_bits + 7) // 8 != len(bits):
        return True
    return all(bits[h >> 3] >> (h & 7) & 1 for h in _bloom_hashes(sample_id, num_bits))


class ShardInfo(BaseModel):
    file: str  # name relative to the dataset directory
    rows: int
    bytes: int
    sha256: str
    positions: int
    tokens: int
    topk_bytes: int  # compressed bytes of the top-k columns and the context table (see bench)
    id_bloom: str = ""  # `id_bloom` of the shard's sample ids; empty: unknown, `get` reads the shard
    writer: str = ""  # holder id of the process that committed it (`datastore.leases.holder_id`)
    team: str = ""  # team of that writer
    sample_keys: list[str] = Field(default_factory=list)  # content key of each row (`datastore.reuse`)


def snapshot_fields(snap, kind: str) -> dict:
    """The `ShardedManifest` fields of a Delta table snapshot (`datastore.table.Snapshot`) holding a dataset
    of `kind` ("logits" or "targets"), plus `info` (the table's dataset metadata) for the caller's own
    fields. Raises UserError when the table holds another kind."""
    from datastore.errors import UserError

    info = snap.info
    if info.get("kind") != kind:
        raise UserError(f"not a {kind} dataset (its table holds {info.get('kind')!r})")
    return dict(
        table="delta", version=snap.version, code_version=info.get("code_version", "unknown"),
        created=snap.created, updated=snap.updated, complete=snap.complete, shards=snap.shards,
        range_rows=int(info.get("range_rows", 0)), team=info.get("team", ""), teams=snap.teams,
        encoding=info["encoding"],
    )


class ShardedManifest(BaseModel):
    """The part of a dataset's manifest about shards (which exist, in commit order) and versions; its
    totals are sums over the shards.

    `table` is "delta" for a Delta Lake dataset (`version` = its table version) and "manifest-0.1" for a
    dataset still in the 0.1 layout (`version` -1). `range_rows` is the number of samples per claimed
    range (`datastore.shards.ShardedWriter.claims`), fixed when the dataset is created. `team` is the team
    that created the dataset, `teams` every team that committed shards."""

    model_config = ConfigDict(extra="ignore")

    format: str
    table: str = "manifest-0.1"
    version: int = -1
    code_version: str = Field(default_factory=code_version)
    created: str = Field(default_factory=now)
    updated: str = Field(default_factory=now)
    complete: bool = False
    range_rows: int = 0
    team: str = ""
    teams: list[str] = Field(default_factory=list)
    shards: list[ShardInfo] = Field(default_factory=list)

    @computed_field
    @property
    def num_samples(self) -> int:
        return sum(s.rows for s in self.shards)

    @computed_field
    @property
    def num_positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @computed_field
    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @computed_field
    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()



class Manifest(ShardedManifest):
    """`manifest.json` of a logits dataset."""

    format: str = FORMAT
    logits_id: str
    meta: LogitsMeta
    encoding: dict

    @computed_field
    @property
    def bytes_per_entry(self) -> float | None:
        """All shard bytes / (positions x k): the honest storage cost of one (id, logprob) entry."""
        entries = self.num_positions * self.meta.k
        return round(self.num_bytes / entries, 4) if entries else None
