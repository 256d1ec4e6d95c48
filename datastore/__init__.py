"""The datastore: compressed, versioned Parquet shards of teacher top-k distributions.

Public API:
    ScoredSample                       the logical record (datastore.sample)
    LogitsMeta, Manifest, logits_id    what a logits dataset is and holds (datastore.manifest)
    LogitsWriter(uri, meta, shard_rows=512)   resumable, atomic writer (datastore.writer)
    LogitsReader(uri)                  iter_samples / iter_batches / get / scan (datastore.reader)
    logits_uri(store, logits_id), resolve(uri), list_logits(store)   store layout (datastore.fs)
    CodecConfig                        encoding parameters and their error bound (datastore.codec)
    UserError                          bad input (datastore.errors)
"""

from datastore.codec import CodecConfig
from datastore.errors import UserError
from datastore.fs import list_logits, logits_uri, resolve
from datastore.manifest import LogitsMeta, Manifest, ShardInfo, logits_id
from datastore.reader import LogitsReader
from datastore.sample import ScoredSample
from datastore.writer import LogitsWriter

__all__ = [
    "CodecConfig",
    "LogitsMeta",
    "LogitsReader",
    "LogitsWriter",
    "Manifest",
    "ScoredSample",
    "ShardInfo",
    "UserError",
    "list_logits",
    "logits_id",
    "logits_uri",
    "resolve",
]
