"""`LogitsWriter`: appends ScoredSamples to a logits dataset (a Delta Lake table), one atomic shard commit
at a time, resumable, with sample-range claims for concurrent writers.

Commits, resuming and claims are `datastore.shards.ShardedWriter`'s; this module adds the logits encoding.
"""

from __future__ import annotations

from datastore import codec
from datastore.errors import UserError
from datastore.leases import LEASE_SECONDS
from datastore.manifest import LogitsMeta, Manifest, logits_id, snapshot_fields
from datastore.sample import ScoredSample
from datastore.schema import SHARD_SCHEMA
from datastore.shards import ShardedWriter
from datastore.table import Snapshot

KIND = "logits"


class LogitsWriter(ShardedWriter):
    """Write a logits dataset at `uri` (a dataset directory: ``STORE/logits/<logits_id(meta)>``, see
    `datastore.logits_uri`). Re-opening an existing dataset resumes it: skip `done_ids`, write the rest.
    Concurrent writers of one dataset use `claims` (see `teacher_server.extract`).

    Args:
        uri: the dataset directory, local or s3://.
        meta: the dataset's identity; must equal the stored one when the dataset exists.
        shard_rows: samples per shard for `write`; when this writer creates the dataset, also the
            samples per claimed range (fixed in the table for every later writer).
        codec_config: encoding parameters for a new dataset (an existing one keeps its own; a different
            logprob step is refused).
        team: the writing team recorded in the log (default: ``$LOGITFUSE_TEAM``).
        lease_seconds: lease duration for `claims`.
    """

    kind = "logits dataset"
    schema = SHARD_SCHEMA

    def __init__(
        self,
        uri: str,
        meta: LogitsMeta,
        shard_rows: int = 512,
        *,
        codec_config: codec.CodecConfig | None = None,
        team: str | None = None,
        lease_seconds: float = LEASE_SECONDS,
    ):
        self._requested_codec = codec_config
        super().__init__(uri, meta, shard_rows, team=team, lease_seconds=lease_seconds)

    def _info(self) -> dict:
        config = self._requested_codec or codec.CodecConfig()
        return {"kind": KIND, "id": logits_id(self.meta), "meta": self.meta.model_dump(mode="json"),
                "encoding": config.describe()}

    def _open_info(self, info: dict) -> None:
        self.codec = config_from(info["encoding"])
        requested = self._requested_codec
        if requested is not None and requested.step != self.codec.step:
            raise UserError(f"{self.uri} was written with logprob step {self.codec.step}, not {requested.step}")

    def _manifest_from_snapshot(self, snap: Snapshot) -> Manifest:
        return manifest_from_snapshot(snap)

    def _validate(self, sample: ScoredSample) -> ScoredSample:
        codec.validate(sample, self.meta.k)
        return sample

    def _encode(self, samples: list[ScoredSample]) -> bytes:
        return codec.encode_shard(samples, self.meta.k, self.codec)

    def _topk_bytes(self, data: bytes) -> int:
        return codec.topk_bytes(data)

    def _renamed(self, data: bytes, sample_ids: list[str]) -> bytes:
        return codec.rename_samples(data, sample_ids, self.codec)

    def _sample_keys(self, samples: list[ScoredSample]) -> list[str]:
        from datastore.reuse import sample_key, scoring_key

        scoring = scoring_key(self.meta)
        return [sample_key(scoring, s.text, s.input_ids, s.loss_mask, s.positions) for s in samples]


def manifest_from_snapshot(snap: Snapshot) -> Manifest:
    """The `Manifest` view of a logits table snapshot (`datastore.table`)."""
    common = snapshot_fields(snap, KIND)
    info = snap.info
    return Manifest(**common, logits_id=info["id"], meta=LogitsMeta.model_validate(info["meta"]))


def config_from(encoding: dict) -> codec.CodecConfig:
    return codec.CodecConfig(
        step_units=int(encoding.get("step_units", 5)),
        step_log2=int(encoding.get("step_log2", 7)),
        zstd_level=int(encoding.get("zstd_level", 17)),
        version=codec.CODECS.get(encoding.get("codec"), 2),  # a dataset keeps its encoding
    )
