"""Retention: `logitfuse store rm` (delete a dataset) and `logitfuse store gc` (delete files no version
of a dataset references: shards of commits that never happened, temp files of interrupted writes, lease
files no live writer renews).

Only files older than a grace period are collected (default one hour): a concurrent writer's shard lies
in the dataset directory for a moment between its write and its commit, and must not be taken from it.
"""

from __future__ import annotations

import re
import time

import pyarrow.fs as pafs

from datastore import fs
from datastore.errors import UserError
from datastore.leases import LEASES_DIR
from datastore.table import DeltaDataset
from datastore.words import plural

GRACE_SECONDS = 3600.0
_SHARD_RE = re.compile(r"^shard-.*\.parquet$")


def _files(filesystem, root: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return [i for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File]


def gc_dataset(uri: str, older_than_s: float = GRACE_SECONDS, dry_run: bool = False) -> list[str]:
    """Delete (or with `dry_run` only list) the files of the dataset at `uri` that no version references
    and that are older than `older_than_s` seconds: unreferenced ``shard-*.parquet``, ``.tmp-*`` files,
    and lease files (a live holder rewrites its lease every third of the lease, so an old one is released
    or its holder dead). Returns their paths relative to the dataset.
    Raises UserError when `uri` is not a Delta dataset."""
    if not older_than_s >= 0:  # nan too: it would pass every age test
        raise UserError(f"--older-than {older_than_s}: must be >= 0 seconds")
    table = DeltaDataset(uri)
    if not table.exists():
        raise UserError(f"{uri}: not a Delta dataset (migrate 0.1 datasets first: logitfuse store migrate)")
    snap = table.snapshot()
    live = {s.file for s in snap.shards}
    now_ns = time.time_ns()
    out = []
    prefix = table.root.rstrip("/") + "/"
    for info in _files(table.fs, table.root):
        rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
        if rel.startswith(fs.DELTA_LOG + "/"):
            continue
        age_s = (now_ns - (info.mtime_ns or now_ns)) / 1e9
        if age_s < older_than_s:
            continue
        name = rel.rsplit("/", 1)[-1]
        parts = rel.split("/")
        orphan_shard = len(parts) == 1 and _SHARD_RE.match(name) and name not in live
        temp = name.startswith(".tmp-")
        # a holder rewrites its lease every third of the lease: an old lease file is released or dead
        old_lease = parts[0] == LEASES_DIR and len(parts) == 3
        if orphan_shard or temp or old_lease:
            out.append(rel)
            if not dry_run:
                fs.delete(table.fs, info.path)
    return sorted(out)


def rm_dataset(uri: str) -> str:
    """Delete a whole dataset directory (log, shards, tokenizer, leases). Raises UserError when `uri` is
    not a dataset (a store root or any other directory is never removed)."""
    from datastore.catalog import dataset_kind, store_kind_of
    from datastore.table import CorruptDataset

    filesystem, root = fs.resolve(uri)
    try:
        kind, broken = dataset_kind(uri), ""
    except CorruptDataset as e:
        # a dataset whose log cannot be read is what a user most wants gone: removed when it sits where
        # a store keeps datasets (STORE/logits/<id>, STORE/targets/<id>), never anywhere else
        kind, broken = store_kind_of(uri), "broken "
        if kind is None:
            raise UserError(f"{e} (not under a store's logits/ or targets/: not removed)") from None
    if kind is None:
        raise UserError(f"{uri}: not a dataset (expected STORE/logits/<id> or STORE/targets/<id>)")
    n = len(_files(filesystem, root))
    filesystem.delete_dir(root)
    return f"removed {broken}{kind} dataset {uri} ({plural(n, 'file')})"
