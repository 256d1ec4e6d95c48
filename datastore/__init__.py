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

from datastore._lazy import lazy_exports

# imported on first use (PEP 562): `from datastore.errors import UserError` stays free of pyarrow
_EXPORTS = {
    "CodecConfig": "datastore.codec",
    "UserError": "datastore.errors",
    "list_logits": "datastore.fs",
    "logits_uri": "datastore.fs",
    "resolve": "datastore.fs",
    "LogitsMeta": "datastore.manifest",
    "Manifest": "datastore.manifest",
    "ShardInfo": "datastore.manifest",
    "logits_id": "datastore.manifest",
    "LogitsReader": "datastore.reader",
    "ScoredSample": "datastore.sample",
    "LogitsWriter": "datastore.writer",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
