"""`LogitsWriter`: appends ScoredSamples to a logits dataset, one atomic shard at a time, resumable.

Crash safety and resuming are `datastore.shards.ShardedWriter`'s; this module adds the logits encoding.
"""

from __future__ import annotations

from datastore import codec
from datastore.errors import UserError
from datastore.manifest import LogitsMeta, Manifest, logits_id
from datastore.sample import ScoredSample
from datastore.shards import ShardedWriter


class LogitsWriter(ShardedWriter):
    """Write a logits dataset at `uri` (a dataset directory: ``STORE/logits/<logits_id(meta)>``, see
    `datastore.logits_uri`). Re-opening an existing dataset resumes it: skip `done_ids`, write the rest."""

    kind = "logits dataset"

    def __init__(
        self,
        uri: str,
        meta: LogitsMeta,
        shard_rows: int = 512,
        *,
        codec_config: codec.CodecConfig | None = None,
    ):
        self._requested_codec = codec_config
        super().__init__(uri, meta, shard_rows)

    def _load_manifest(self, data: bytes) -> Manifest:
        manifest = Manifest.model_validate_json(data)
        self.codec = _config_from(manifest.encoding)
        requested = self._requested_codec
        if requested is not None and requested.step != self.codec.step:
            raise UserError(f"{self.uri} was written with logprob step {self.codec.step}, not {requested.step}")
        return manifest

    def _new_manifest(self) -> Manifest:
        self.codec = self._requested_codec or codec.CodecConfig()
        return Manifest(logits_id=logits_id(self.meta), meta=self.meta, encoding=self.codec.describe())

    def _validate(self, sample: ScoredSample) -> ScoredSample:
        codec.validate(sample, self.meta.k)
        return sample

    def _encode(self, samples: list[ScoredSample]) -> bytes:
        return codec.encode_shard(samples, self.meta.k, self.codec)

    def _topk_bytes(self, data: bytes) -> int:
        return codec.topk_bytes(data)


def _config_from(encoding: dict) -> codec.CodecConfig:
    return codec.CodecConfig(
        step_units=int(encoding.get("step_units", 5)),
        step_log2=int(encoding.get("step_log2", 7)),
        zstd_level=int(encoding.get("zstd_level", 17)),
        version=1 if encoding.get("codec") == codec.CODEC_V1 else 2,  # a dataset keeps its encoding
    )
