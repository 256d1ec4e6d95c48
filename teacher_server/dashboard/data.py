"""What the dashboard shows, as plain dicts: the same values its `.json` twins return.

Nothing here renders HTML. Everything is read from the store (datasets, fusion reports written next to
targets datasets), the job database, or the training-run directories named in `teachers.yaml` (`runs`).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from datastore import fs

#: how many positions the dataset page reads to draw its histograms (the first shards, in order)
HISTOGRAM_POSITIONS = 50_000
FUSION_REPORT = "fusion_report.json"  # written by `logitfuse fuse` beside each targets dataset
TRAIN_LOG = Path("logs") / "train.jsonl"  # written by `logitfuse train` under its --out directory


# ------------------------------------------------------------------------------------------ catalog


def catalog(store: str) -> list[dict]:
    """Every logits and targets dataset in `store` (`datastore.catalog.catalog`, the same entries as
    `logitfuse store ls` and `GET /v1/logits`), each with `error` set (None when readable): a broken
    dataset is one row, never a failed listing. A store not created yet lists nothing."""
    from datastore.catalog import catalog as store_catalog

    rows = store_catalog(store, missing_ok=True)
    for r in rows:
        r.setdefault("error", None)
    return rows


def _describe(row: dict) -> dict:
    """The dataset's metadata (its log's view, without the per-shard lists) and its shards."""
    from datastore.catalog import describe

    entry = describe(row["kind"], row["uri"], row["id"], with_manifest=True)
    m = entry.get("manifest")
    if m is None:
        return {"metadata": None, "shards": []}
    meta = m.model_dump(mode="json", exclude={"shards"})
    shards = [{"file": s.file, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256} for s in m.shards]
    return {"metadata": meta, "shards": shards}


def dataset_detail(store: str, kind: str, dataset_id: str) -> dict:
    """One dataset's catalog row, metadata, shards and (logits) histogram data.

    Raises LookupError when the store holds no such dataset.
    """
    row = next((r for r in catalog(store) if r["kind"] == kind and r["id"] == dataset_id), None)
    if row is None:
        raise LookupError(f"no {kind} dataset {dataset_id!r} in {store}")
    detail = {"row": row, "metadata": None, "shards": []}
    if row.get("error"):
        return detail
    detail.update(_describe(row))
    if kind == "logits":
        detail["histograms"] = _histograms_cached(row["uri"], str(row.get("version")))
    if kind == "targets":
        report = _read_json(fs.join(row["uri"], FUSION_REPORT))
        if report is not None:
            detail["fusion_report"] = report
    return detail


_CACHE: OrderedDict[tuple[str, str], dict] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _histograms_cached(uri: str, version: str) -> dict:
    key = (uri, version)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = histograms(uri)
    with _CACHE_LOCK:
        _CACHE[key] = value
        while len(_CACHE) > 32:
            _CACHE.popitem(last=False)
    return value


def histograms(uri: str, max_positions: int = HISTOGRAM_POSITIONS) -> dict:
    """Per-position entropy and gold-token rank over the first `max_positions` stored positions.

    Entropy (nats) is computed from the stored top-k with the mass outside the top-k counted as one
    more outcome, `-Σ p_i ln p_i - r ln r` with `r = 1 - Σ p_i`: a lower bound on the entropy of the full
    distribution. The gold rank is the 1-based rank of the actual next token in the top-k, or `>k`.

    Returns {"positions", "k", "entropy": {"edges", "counts"}, "gold_rank": {"labels", "counts"},
    "mean_entropy", "gold_in_topk"}.
    """
    from datastore.reader import LogitsReader

    reader = LogitsReader(uri)
    entropies: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    seen = 0
    k = 0
    for s in reader.iter_samples():
        if seen >= max_positions:
            break
        if len(s.positions) == 0:
            continue
        k = max(k, s.topk_ids.shape[1])
        lp = s.topk_logprobs.astype(np.float64)
        p = np.where(np.isfinite(lp), np.exp(lp), 0.0)
        rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1) - np.where(rest > 0, rest * np.log(rest), 0.0)
        entropies.append(h)
        gold = s.input_ids[s.positions + 1]
        hit = s.topk_ids == gold[:, None]
        ranks.append(np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0))
        seen += len(s.positions)
    ent = np.concatenate(entropies) if entropies else np.zeros(0)
    rk = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    top = max(1.0, math.ceil(float(ent.max()) if ent.size else 1.0))
    counts, edges = np.histogram(ent, bins=20, range=(0.0, top))
    labels = [str(i) for i in range(1, k + 1)] + [f">{k}"]
    rank_counts = [int((rk == i).sum()) for i in range(1, k + 1)] + [int((rk == 0).sum())]
    return {
        "positions": int(ent.size),
        "k": int(k),
        "entropy": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
        "gold_rank": {"labels": labels, "counts": rank_counts},
        "mean_entropy": round(float(ent.mean()), 4) if ent.size else None,
        "gold_in_topk": round(float((rk > 0).mean()), 4) if rk.size else None,
    }


# ------------------------------------------------------------------------------------------ fusion


def _read_json(uri: str) -> dict | None:
    try:
        filesystem, path = fs.resolve(uri)
        if not fs.exists(filesystem, path):
            return None
        return json.loads(fs.read_bytes(filesystem, path))
    except (OSError, ValueError):
        return None


def fusion_reports(store: str) -> list[dict]:
    """The fusion report of every targets dataset in the store that has one, newest first.

    Each: {"id", "uri", "report"}; `report` is `fusion.pipeline.FuseReport.to_dict()` as written by
    `logitfuse fuse` (group shares, source mass mapped, characters aligned, winners, examples).
    """
    out = []
    for row in catalog(store):
        if row["kind"] != "targets":
            continue
        report = _read_json(fs.join(row["uri"], FUSION_REPORT))
        if report is not None:
            out.append({"id": row["id"], "uri": row["uri"], "created": row.get("created"), "report": report})
    out.sort(key=lambda r: r.get("created") or "", reverse=True)
    return out


# ------------------------------------------------------------------------------------------ training runs


def _run_dirs(roots: list[str]) -> dict[str, Path]:
    """Training runs under the configured directories: a directory holding `logs/train.jsonl`, or its
    children that do. Named by directory name (with the parent's name when two collide)."""
    found: dict[str, Path] = {}
    for root in roots:
        base = Path(root).expanduser()
        candidates = [base] if (base / TRAIN_LOG).is_file() else sorted(
            p for p in base.glob("*") if (p / TRAIN_LOG).is_file()) if base.is_dir() else []
        for run in candidates:
            name = run.name if run.name not in found else f"{run.parent.name}/{run.name}"
            found[name] = run
    return found


def _history(run: Path) -> list[dict]:
    rows = []
    with open(run / TRAIN_LOG, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                rows.append(rec)
    return rows


def training_runs(roots: list[str]) -> list[dict]:
    """A summary per training run: name, path, steps logged, last step, first and last loss."""
    out = []
    for name, run in _run_dirs(roots).items():
        hist = _history(run)
        cfg = _read_local_json(run / "train_config.json") or {}
        out.append({
            "name": name,
            "path": str(run),
            "targets": cfg.get("targets"),
            "model": cfg.get("model"),
            "lambda": cfg.get("lambda", cfg.get("lambda_")),
            "steps": len(hist),
            "last_step": hist[-1]["step"] if hist else None,
            "first_loss": hist[0].get("loss") if hist else None,
            "last_loss": hist[-1].get("loss") if hist else None,
        })
    return out


def training_run(roots: list[str], name: str) -> dict:
    """One run's summary and its logged history (one dict per logged step). Raises LookupError."""
    runs = _run_dirs(roots)
    if name not in runs:
        raise LookupError(f"no training run {name!r}; known: {', '.join(sorted(runs)) or 'none'}")
    summary = next(r for r in training_runs(roots) if r["name"] == name)
    return {**summary, "history": _history(runs[name])}


def _read_local_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
