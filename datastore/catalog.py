"""The store's catalog: every logits and targets dataset under a store root, as plain dicts that the CLI
(`logitfuse store ls`), the service (``GET /v1/logits``) and a web page share.

A dataset whose log or manifest cannot be read is one entry with ``status: "broken"`` and its error;
it never fails the listing. A store root that does not exist is a `UserError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

from datastore import fs
from datastore.errors import UserError
from datastore.targets import TARGETS_DIR

KINDS = ("logits", "targets")
_DIRS = {"logits": fs.LOGITS_DIR, "targets": TARGETS_DIR}


def check_store(store_uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root) of a store root. Raises UserError when it does not exist or is a dataset."""
    filesystem, root = fs.resolve(store_uri)
    try:
        info = filesystem.get_file_info(root)
    except OSError as e:
        raise UserError(f"store {store_uri}: cannot be read ({str(e).splitlines()[0]})") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"no store at {store_uri}: the path does not exist (give the directory or s3:// "
                        f"prefix that holds logits/ and targets/)")
    if info.type != pafs.FileType.Directory:
        raise UserError(f"store {store_uri} is a file, not a store directory")
    if fs.exists(filesystem, fs.join(root, fs.MANIFEST)) or fs.join(root, fs.DELTA_LOG) in {
        i.path for i in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    }:
        raise UserError(f"{store_uri} is a dataset, not a store: give the store root (the directory that "
                        f"holds logits/ and targets/)")
    return filesystem, root


def _entry_fields(kind: str, m) -> dict[str, Any]:
    entries = m.num_positions * m.meta.k
    common = {
        "status": "ok",
        "k": m.meta.k,
        "samples": m.num_samples,
        "positions": m.num_positions,
        "tokens": m.num_tokens,
        "bytes": m.num_bytes,
        "bytes_per_entry": round(m.num_bytes / entries, 4) if entries else None,
        "shards": len(m.shards),
        "version": m.version,
        "table": m.table,
        "team": m.team,
        "teams": list(m.teams),
        "created": m.created,
        "updated": m.updated,
        "complete": m.complete,
        "code_version": m.code_version,
    }
    if kind == "logits":
        meta = m.meta
        return {**common, "teacher": meta.teacher_name, "revision": meta.teacher_revision,
                "tokenizer": meta.tokenizer_fingerprint, "template": meta.chat_template,
                "dataset": meta.dataset_id, "max_length": meta.max_length, "all_positions": meta.all_positions}
    meta = m.meta
    return {**common, "teacher": meta.pivot, "pivot": meta.pivot, "revision": "", "tokenizer": meta.pivot_tokenizer,
            "template": "", "dataset": str(meta.extra.get("dataset_id", "")), "sources": list(meta.sources),
            "source_teachers": list(meta.sources), "fusion": meta.fusion, "align": meta.align,
            "vocab_map": meta.vocab_map, "mode": str(meta.extra.get("mode", ""))}


def has_store_layout(store_uri: str) -> bool:
    """True when `store_uri` is a directory holding a store's ``logits/`` or ``targets/`` folder."""
    filesystem, root = fs.resolve(store_uri)
    return bool(set(_DIRS.values()) & set(fs.list_dirs(filesystem, root)))


def store_kind_of(dataset_uri: str) -> str | None:
    """"logits" or "targets" when `dataset_uri` sits where a store keeps datasets of that kind
    (``STORE/logits/<id>``, ``STORE/targets/<id>``), else None: its layout, not its content."""
    parent = os.path.basename(os.path.dirname(fs.resolve(dataset_uri)[1].rstrip("/")))
    return next((k for k, d in _DIRS.items() if d == parent), None)


def describe(kind: str, uri: str, name: str, with_manifest: bool = False) -> dict[str, Any]:
    """The catalog entry of one dataset directory (never raises for a broken dataset)."""
    from datastore.reader import load_logits_manifest
    from datastore.targets import load_targets_manifest

    entry: dict[str, Any] = {"kind": kind, "id": name, "uri": uri}
    try:
        m = load_logits_manifest(uri) if kind == "logits" else load_targets_manifest(uri)
    except Exception as e:  # noqa: BLE001 - any failure to read a dataset is reported in its line
        text = str(e).strip().splitlines()
        entry.update(status="broken", error=(text[0] if text else type(e).__name__).replace(uri + ": ", ""))
        return entry
    entry.update(_entry_fields(kind, m))
    if with_manifest:
        entry["manifest"] = m
    return entry


def iter_datasets(store_uri: str, kind: str | None = None, missing_ok: bool = False
                  ) -> Iterator[tuple[str, str, str]]:
    """(kind, dataset uri, id) of every dataset directory in a store (UserError: no such store, unless
    `missing_ok`, which lists nothing for a store not created yet)."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    if missing_ok:
        filesystem, root = fs.resolve(store_uri)
        if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
            return
    filesystem, root = check_store(store_uri)
    for k in KINDS if kind is None else (kind,):
        for name in fs.list_dirs(filesystem, fs.join(root, _DIRS[k])):
            yield k, fs.join(store_uri, _DIRS[k], name), name


def catalog(store_uri: str, kind: str | None = None, teacher: str | None = None, dataset: str | None = None,
            with_manifest: bool = False, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Every dataset of a store, one plain dict each (``kind``, ``id``, ``uri``, ``status`` "ok" or
    "broken" with ``error``; for readable ones teacher (for targets the pivot's teacher name when its
    logits are in the store, else its logits id; the id also in ``pivot``), revision, tokenizer, k,
    template, dataset, samples, for targets also sources / source_teachers (named the same way), fusion,
    align, vocab_map and mode, positions, tokens, bytes, bytes_per_entry, shards, version, team, teams,
    created, updated, complete).

    Args:
        kind: "logits" or "targets" only.
        teacher: keep datasets whose teacher name contains this text (for targets: the pivot's teacher
            name, or its logits id).
        dataset: keep datasets whose input dataset id starts with this text (targets: their pivot's).
        with_manifest: add the `Manifest` object under "manifest" (Python callers).
        missing_ok: a store root that does not exist yet lists nothing instead of raising.
    Raises:
        UserError: the store does not exist, or a filter value is not accepted.
    """
    out = []
    names: dict[str, str] = {}  # logits id -> teacher name
    for k, uri, name in iter_datasets(store_uri, kind, missing_ok):
        entry = describe(k, uri, name, with_manifest)
        if entry["status"] == "ok":
            if k == "logits":
                names[name] = entry["teacher"]
            else:
                _name_pivot(store_uri, entry, names)
            if teacher and teacher not in entry["teacher"] and teacher not in entry.get("pivot", ""):
                continue
            if dataset and not entry["dataset"].startswith(dataset):
                continue
        elif teacher or dataset:
            pass  # a broken dataset stays visible: its teacher and dataset are unknown
        out.append(entry)
    return out


def _name_pivot(store_uri: str, entry: dict[str, Any], names: dict[str, str]) -> None:
    """A targets entry's ``teacher`` and ``source_teachers``: the teacher names of its pivot's and its
    sources' logits datasets when they are in the same store (else their logits ids, kept in ``pivot`` and
    ``sources`` either way)."""
    for logits in [entry["pivot"], *entry["sources"]]:
        if logits not in names:
            found = describe("logits", fs.join(store_uri, _DIRS["logits"], logits), logits)
            names[logits] = found["teacher"] if found["status"] == "ok" else logits
    entry["teacher"] = names[entry["pivot"]]
    entry["source_teachers"] = [names[s] for s in entry["sources"]]


def find(store_uri: str, dataset_id: str, kind: str = "logits") -> dict[str, Any]:
    """The catalog entry of one dataset by id, as `catalog` lists it (a targets entry's ``teacher`` is its
    pivot's teacher name). Raises LookupError when the store has none, UserError for a malformed id."""
    if not dataset_id or "/" in dataset_id or dataset_id.startswith("."):
        raise UserError(f"dataset id {dataset_id!r}: expected the 16-hex id from the catalog")
    filesystem, root = check_store(store_uri)
    path = fs.join(root, _DIRS[kind], dataset_id)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        raise LookupError(f"no {kind} dataset {dataset_id} in the store")
    entry = describe(kind, fs.join(store_uri, _DIRS[kind], dataset_id), dataset_id)
    if kind == "targets" and entry["status"] == "ok":
        _name_pivot(store_uri, entry, {})
    return entry


def sample_to_json(sample) -> dict[str, Any]:
    """A `ScoredSample` as JSON-ready lists (what the service streams to a team without store access):
    input_ids [T], loss_mask [T], positions [N], topk_ids [N][k], topk_logprobs [N][k] (nats, as decoded
    from the store), gold_logprob [N], text, assistant_spans [S][2], truncated."""
    return {
        "id": sample.sample_id,
        "input_ids": sample.input_ids.tolist(),
        "loss_mask": sample.loss_mask.tolist(),
        "positions": sample.positions.tolist(),
        "topk_ids": sample.topk_ids.tolist(),
        "topk_logprobs": sample.topk_logprobs.tolist(),
        "gold_logprob": sample.gold_logprob.tolist(),
        "text": sample.text,
        "assistant_spans": sample.assistant_spans.tolist(),
        "truncated": bool(sample.truncated),
    }


def dataset_kind(uri: str) -> str | None:
    """"logits" or "targets" when `uri` is a dataset (Delta table or 0.1 manifest.json), else None.
    Raises UserError when its log or manifest is corrupt."""
    from datastore.table import CorruptDataset, DeltaDataset
    from datastore.targets import is_targets_manifest

    table = DeltaDataset(uri)
    if table.exists():
        table.table(refresh=False)
        kind = table.info().get("kind")
        return kind if kind in KINDS else None
    if table.fs.get_file_info(fs.join(table.root, fs.DELTA_LOG)).type == pafs.FileType.Directory:
        raise CorruptDataset(f"{uri}: its Delta log ({fs.DELTA_LOG}/) holds no readable first commit")
    path = fs.join(table.root, fs.MANIFEST)
    if fs.exists(table.fs, path):
        data = fs.read_bytes(table.fs, path)
        if is_targets_manifest(data):
            return "targets"
        import json

        try:
            json.loads(data)
        except ValueError:
            raise CorruptDataset(f"{uri}: corrupt {fs.MANIFEST} (not JSON)") from None
        return "logits"
    return None
