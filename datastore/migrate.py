"""`logitfuse store migrate`: datasets written by logitfuse 0.1 (``manifest.json`` + ``shard-NNNNNN.parquet``)
become Delta tables in place. The shard files are not rewritten: each is verified against the manifest's
sha256, then one ``migrate`` commit adds them all with their recorded facts (and the manifest's
``complete``); stored tokenizer files are recorded by a ``tokenizer`` commit; ``manifest.json`` is renamed
``manifest.json.migrated`` last, so an interrupted migration is simply run again.
"""

from __future__ import annotations

import json

from datastore import fs
from datastore.errors import UserError
from datastore.shards import read_verified
from datastore.table import COMPLETE_KEY, TOKENIZER_KEY, DeltaDataset

MIGRATED = fs.MANIFEST + ".migrated"


def migrate_dataset(uri: str) -> str:
    """Convert the 0.1 dataset at `uri`; returns one line saying what was done. Raises UserError when
    there is no 0.1 manifest, it is corrupt, or a shard fails its checksum (nothing is changed then)."""
    from datastore.reader import parse_legacy_manifest as parse_logits
    from datastore.schema import SHARD_SCHEMA
    from datastore.targets import TARGETS_SCHEMA, is_targets_manifest
    from datastore.targets import parse_legacy_manifest as parse_targets

    table = DeltaDataset(uri)
    manifest_path = fs.join(table.root, fs.MANIFEST)
    if not fs.exists(table.fs, manifest_path):
        if table.exists():
            return f"{uri}: already a Delta table, nothing to do"
        raise UserError(f"{uri}: no {fs.MANIFEST} to migrate")
    data = fs.read_bytes(table.fs, manifest_path)
    is_targets = is_targets_manifest(data)
    try:
        m = parse_targets(data) if is_targets else parse_logits(data)
    except ValueError as e:
        raise UserError(f"{uri}: corrupt {fs.MANIFEST} ({str(e).splitlines()[0]})") from None
    for shard in m.shards:
        try:
            read_verified(table.fs, table.root, shard)
        except (ValueError, OSError) as e:
            why = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{uri}: shard {shard.file} fails verification ({why}); nothing migrated") from None
    if not table.exists():
        info = {"kind": "targets" if is_targets else "logits",
                "id": m.targets_id if is_targets else m.logits_id,
                "meta": m.meta.model_dump(mode="json"), "encoding": m.encoding,
                "range_rows": max((s.rows for s in m.shards), default=512), "team": "",
                "code_version": m.code_version, "migrated_from": m.format}
        table.create(TARGETS_SCHEMA if is_targets else SHARD_SCHEMA, info)
    snap = table.snapshot()
    if not snap.shards and m.shards:
        table.commit(m.shards, "migrate", {COMPLETE_KEY: "1" if m.complete else ""})
    names = fs.list_files(table.fs, fs.join(table.root, fs.TOKENIZER_DIR))
    if names and not snap.tokenizer:
        record = {}
        for name in names:
            blob = fs.read_bytes(table.fs, fs.join(table.root, fs.TOKENIZER_DIR, name))
            record[name] = {"sha256": fs.sha256_hex(blob), "bytes": len(blob)}
        table.commit([], "tokenizer", {TOKENIZER_KEY: json.dumps(record, sort_keys=True)})
    if fs.is_local(table.fs):
        import os

        os.replace(manifest_path, fs.join(table.root, MIGRATED))
    else:
        table.fs.move(manifest_path, fs.join(table.root, MIGRATED))
    version = table.snapshot().version
    return f"{uri}: migrated {len(m.shards)} shards ({m.num_samples} samples) to Delta table version {version}"
