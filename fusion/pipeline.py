"""The fusion stage over stored data: pivot + source logits datasets in, targets datasets out.

`fuse_logits` is what ``logitfuse fuse`` and the demo run. It reads a pivot logits dataset and one or more
source logits datasets of the same chat dataset, pairs their samples by id (never by position: extraction
writes length-sorted order, which differs between tokenizers), aligns every source to the pivot (sequence,
then vocabulary), fuses (MinCE / AvgCE) and writes the targets through `datastore.targets`.

- ``mode="pairwise"`` (FuseChat): one targets dataset per source, fusing the pivot and that source. With
  one source it is written at ``out``; with several, at ``out/<targets id>`` each (the store's layout,
  ``STORE/targets/<targets id>``, when ``out`` is ``STORE/targets``).
- ``mode="multi"`` (FuseLLM): one targets dataset at ``out``, fusing the pivot and every source.

With ``vocab_map="ms"`` a first pass aligns the whole dataset and counts the mapping statistics of each
(pivot, source) pair; they are saved next to the targets, ``<targets>/mapping_statistics/<source logits
id>.npz``, before any target is written, so a resumed run reuses the same ones. A source that shares the
pivot's tokenizer needs no statistics (every mapping is the identity there).

Data flow per pivot shard: decode it, read only the needed rows of the source shards that hold its ids
(located once from their ``sample_id`` columns), align and fuse sample by sample. Memory is one pivot
shard, its source rows and the alignments cached between the passes (bounded, see `ALIGN_CACHE_BYTES`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.fs as pafs

from datastore import fs
from datastore.errors import UserError
from datastore.reader import LogitsReader
from datastore.sample import ScoredSample
from datastore.shards import read_columns
from datastore.targets import TargetSample, TargetsMeta, TargetsWriter, targets_id
from datastore.words import plural
from fusion._sparse import SparseDist
from fusion.align import (
    ALIGN_METHODS,
    KIND_NAMES,
    AlignedDistributions,
    Alignment,
    AlignmentError,
    align_distributions,
    align_sample,
    pivot_gold_nll,
)
from fusion.fuse import AVGCE_WEIGHTS, FUSION_METHODS, fuse, response_mask
from fusion.vocab import MappingStatistics, TokenTable, VocabMap, build_vocab_map

VOCAB_MAPS = ("ms", "mined", "em")
MODES = ("pairwise", "multi")
STATS_DIR = "mapping_statistics"
REPORT_FILE = "fusion_report.json"
REPORT_EXAMPLES = 2  # aligned samples kept per source in the report
REPORT_EXAMPLE_GROUPS = 40  # groups kept per example
ALIGN_CACHE_BYTES = 256 * 2**20  # alignments kept from the statistics pass for the fusion pass


# ---------------------------------------------------------------------------------------------- report


@dataclass
class SourceReport:
    """What aligning one source to the pivot did, summed over the samples it was fused on."""

    name: str
    uri: str
    logits_id: str
    samples: int = 0  # samples aligned and fused
    missing: int = 0  # pivot samples this source does not hold
    unaligned: int = 0  # samples whose alignment failed (the pivot's own distribution was used)
    first_error: str = ""
    groups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KIND_NAMES, 0))
    chars: int = 0
    chars_aligned: int = 0
    positions: int = 0  # pivot scored positions of the aligned samples
    positions_from_source: int = 0
    source_mass: float = 0.0  # source top-k probability carried to those positions
    unmapped_mass: float = 0.0  # ... of which no pivot token stands for the source token
    dropped_mass: float = 0.0  # ... of which the top-k cut dropped after merging duplicates / n-1 pieces
    statistics_pairs: int = 0  # distinct (pivot, source) token pairs in the mapping statistics
    statistics_bytes: int = 0  # in memory
    statistics_file_bytes: int = 0  # on disk (compressed .npz)
    #: a few aligned samples as token strings side by side, for people to look at (dashboard, report)
    examples: list[dict] = field(default_factory=list)

    @property
    def group_shares(self) -> dict[str, float]:
        total = sum(self.groups.values())
        return {k: (v / total if total else 0.0) for k, v in self.groups.items()}

    @property
    def mapped_share(self) -> float:
        """Share of the carried source probability that landed on pivot tokens."""
        return 1.0 - self.unmapped_mass / self.source_mass if self.source_mass else 0.0

    @property
    def chars_aligned_share(self) -> float:
        return self.chars_aligned / self.chars if self.chars else 0.0

    @property
    def from_source_share(self) -> float:
        return self.positions_from_source / self.positions if self.positions else 0.0


@dataclass
class TargetsReport:
    """One targets dataset written by the run."""

    uri: str
    targets_id: str
    candidates: list[str]  # pivot first, then its sources
    written: int = 0
    already_done: int = 0
    # over the whole dataset: a resumed run counts what earlier runs fused too (`_count_whole_dataset`)
    winners: Counter = field(default_factory=Counter)
    ce_sum: dict[str, float] = field(default_factory=dict)  # summed per-sample CE of each candidate

    def mean_ce(self) -> dict[str, float]:
        """Mean per-sample CE of each candidate over the samples `winners` counts (the whole dataset)."""
        n = self.written + self.already_done
        return {name: v / n for name, v in self.ce_sum.items()} if n else {}


@dataclass
class FuseReport:
    pivot: str
    align: str
    vocab_map: str
    fusion: str
    mode: str
    k: int
    avgce_weights: str = "softmax-ce"
    samples: int = 0
    sources: list[SourceReport] = field(default_factory=list)
    targets: list[TargetsReport] = field(default_factory=list)
    seconds: float = 0.0
    statistics_seconds: float = 0.0

    def lines(self) -> list[str]:
        """The human report ``logitfuse fuse`` prints."""
        if self.samples == 0 and self.targets and all(t.already_done for t in self.targets):  # a rerun
            return [f"nothing to fuse: the targets were already complete ({plural(t.already_done, 'sample')} in "
                    f"{t.uri})" for t in self.targets]
        out = [
            f"fused {plural(self.samples, 'sample')} in {self.seconds:.1f}s"
            + (f" ({self.statistics_seconds:.1f}s building mapping statistics)" if self.vocab_map == "ms" else "")
            + f": align={self.align} vocab-map={self.vocab_map} fusion={self.fusion} "
            f"mode={self.mode} k={self.k}"
            + (f" avgce-weights={self.avgce_weights}" if self.fusion == "avgce" else "")
        ]
        for s in self.sources:
            g = s.group_shares
            groups = " ".join(f"{name} {g[name]:.1%}" for name in KIND_NAMES)
            out.append(
                f"  source {s.name}: groups {groups}; source mass mapped {s.mapped_share:.1%}; chars aligned "
                f"{s.chars_aligned_share:.2%}; positions from source {s.from_source_share:.1%}"
                + (f"; {s.missing} missing" if s.missing else "")
                + (f"; {s.unaligned} unaligned (first: {s.first_error})" if s.unaligned else "")
                + (
                    f"; mapping statistics {s.statistics_pairs:,} pairs, {_size(s.statistics_bytes)} in memory,"
                    f" {_size(s.statistics_file_bytes)} on disk"
                    if s.statistics_pairs
                    else ""
                )
            )
        for t in self.targets:
            winners = ", ".join(f"{name} {t.winners.get(name, 0)}" for name in t.candidates)
            ce = ", ".join(f"{name} {v:.3f}" for name, v in t.mean_ce().items())
            out.append(
                f"  targets {t.uri}: {t.written} written, {t.already_done} already there; winners: {winners}"
                + (f"; mean CE: {ce}" if ce else "")
            )
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        for s, sd in zip(self.sources, d["sources"], strict=True):
            sd.update(
                group_shares=s.group_shares,
                mapped_share=s.mapped_share,
                chars_aligned_share=s.chars_aligned_share,
                from_source_share=s.from_source_share,
            )
        for t, td in zip(self.targets, d["targets"], strict=True):
            td["winners"] = dict(t.winners)
            td["mean_ce"] = t.mean_ce()
        return d


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class _Input:
    reader: LogitsReader
    name: str
    tokenizer: object
    table: TokenTable
    index: dict[str, tuple[int, int]] | None = None  # sample id -> (shard number, row)

    @property
    def logits_id(self) -> str:
        return self.reader.manifest.logits_id


def _open(uri: str, role: str) -> LogitsReader:
    try:
        return LogitsReader(uri)
    except UserError as e:
        raise UserError(f"--{role} {uri}: {e}") from None


def _sample_index(reader: LogitsReader) -> dict[str, tuple[int, int]]:
    """Where each sample lives, from the small ``sample_id`` columns only."""
    fsys, root = fs.resolve(reader.uri)
    index: dict[str, tuple[int, int]] = {}
    for number, shard in enumerate(reader.manifest.shards):
        ids = read_columns(fsys, root, shard, ["sample_id"]).column("sample_id").to_pylist()
        index.update((sid, (number, row)) for row, sid in enumerate(ids))
    return index


def _is_dataset_dir(uri: str) -> bool:
    """True when `uri` holds a Delta log (a dataset of any kind, readable or not)."""
    return fs.DELTA_LOG in fs.list_dirs(*fs.resolve(uri))


def _is_store_targets(uri: str) -> bool:
    """True when `uri` is a store's ``targets/`` folder (``STORE/targets`` beside ``STORE/logits``)."""
    path = uri.rstrip("/")
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    return (os.path.basename(path) == "targets" and not _is_dataset_dir(uri)
            and "logits" in fs.list_dirs(*fs.resolve(parent)))


def _is_there(uri: str) -> bool:
    """True when `uri` is a directory (a prefix holding objects, on S3) or a file."""
    fsys, root = fs.resolve(uri)
    return fsys.get_file_info(root).type != pafs.FileType.NotFound


def _holds_targets(uri: str, meta: TargetsMeta) -> bool:
    """True when `uri` holds a targets dataset with `meta`'s settings."""
    from datastore.targets import load_targets_manifest

    if not _is_dataset_dir(uri):
        return False
    try:
        return targets_id(load_targets_manifest(uri).meta) == targets_id(meta)
    except UserError:  # unreadable, or another kind
        return False


def _unique_names(names: list[str]) -> list[str]:
    """Candidate names as the targets record them (`winner`, `ce`): teacher names, ``#2``... on repeats."""
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _pairs(
    pivot: _Input, sources: list[_Input], skip: set[str] | None = None
) -> Iterator[tuple[ScoredSample, list[ScoredSample | None]]]:
    """Each pivot sample (in the pivot's order) with the same sample of every source (None if absent).

    A pivot shard is decoded once; for it, only the rows it needs are decoded from the source shards
    that hold them, so each source shard is read about as often as pivot shards overlap it.
    """
    for shard in pivot.reader.manifest.shards:
        batch = [p for p in pivot.reader.read_shard(shard) if not skip or p.sample_id not in skip]
        if not batch:
            continue
        found: list[dict[str, ScoredSample]] = []
        for src in sources:
            wanted: dict[int, list[int]] = defaultdict(list)
            for p in batch:
                loc = src.index.get(p.sample_id)
                if loc is not None:
                    wanted[loc[0]].append(loc[1])
            got: dict[str, ScoredSample] = {}
            for number, rows in sorted(wanted.items()):
                for s in src.reader.read_shard(src.reader.manifest.shards[number], rows=sorted(rows)):
                    got[s.sample_id] = s
            found.append(got)
        for p in batch:
            yield p, [got.get(p.sample_id) for got in found]


class _AlignmentCache:
    """Alignments of the statistics pass, kept (up to a byte budget) for the fusion pass."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._items: dict[tuple[int, str], Alignment] = {}

    def put(self, key: tuple[int, str], aln: Alignment) -> None:
        size = sum(a.nbytes for a in (aln.pivot_start, aln.pivot_end, aln.source_start, aln.source_end))
        if self.used + size <= self.budget:
            self._items[key] = aln
            self.used += size

    def pop(self, key: tuple[int, str]) -> Alignment | None:
        return self._items.pop(key, None)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True, disable=not enabled
    )


def _fit_k(dist: SparseDist, k: int) -> SparseDist:
    """Trim to the k most probable entries (rows are sorted) or pad with id -1 / probability 0."""
    have = dist.ids.shape[1]
    if have >= k:
        return SparseDist(np.ascontiguousarray(dist.ids[:, :k]), np.ascontiguousarray(dist.probs[:, :k]))
    n = dist.ids.shape[0]
    ids = np.concatenate([dist.ids, np.full((n, k - have), -1, np.int32)], axis=1)
    probs = np.concatenate([dist.probs, np.zeros((n, k - have), np.float32)], axis=1)
    return SparseDist(ids, probs)


# ---------------------------------------------------------------------------------------------- main


def fuse_logits(
    pivot_uri: str,
    source_uris: list[str],
    out_uri: str,
    *,
    align: str = "offsets",
    vocab_map: str = "ms",
    fusion: str = "mince",
    mode: str = "pairwise",
    k: int | None = None,
    avgce_weights: str = "softmax-ce",
    shard_rows: int = 512,
    progress: bool = True,
    align_cache_bytes: int = ALIGN_CACHE_BYTES,
) -> FuseReport:
    """Align each source logits dataset to the pivot's and fuse them into targets dataset(s) (see module
    docstring for the layout). Resumable: re-running with the same arguments writes only the samples a
    previous run did not commit. Raises `UserError` for bad input (one line)."""
    t0 = time.perf_counter()
    for value, allowed, option in (
        (align, ALIGN_METHODS, "--align"),
        (vocab_map, VOCAB_MAPS, "--vocab-map"),
        (fusion, FUSION_METHODS, "--fusion"),
        (mode, MODES, "--mode"),
        (avgce_weights, AVGCE_WEIGHTS, "--avgce-weights"),
    ):
        if value not in allowed:
            raise UserError(f"{option} {value!r}: expected one of {', '.join(allowed)}")
    source_uris = list(source_uris)
    if not source_uris:
        raise UserError("no --source given: fusion needs at least one source logits dataset")
    if k is not None and not 1 <= k <= 1024:
        raise UserError(f"--k {k}: must be between 1 and 1024 (0 or absent: the pivot's k)")

    fs.check_local_directory(out_uri, "--out")
    pivot_reader = _open(pivot_uri, "pivot")
    readers = [_open(uri, "source") for uri in source_uris]
    dataset_id = pivot_reader.manifest.meta.dataset_id
    ids_seen: set[str] = set()
    for uri, r in zip(source_uris, readers, strict=True):
        if r.manifest.meta.dataset_id != dataset_id:
            raise UserError(
                f"--source {uri} scored dataset {r.manifest.meta.dataset_id}, the pivot scored {dataset_id}: "
                "pivot and sources must score the same dataset"
            )
        if r.manifest.logits_id in ids_seen:
            raise UserError(f"--source {uri} is given twice")
        ids_seen.add(r.manifest.logits_id)
    for option, uri, r in [("--pivot", pivot_uri, pivot_reader)] + [
            ("--source", u, r) for u, r in zip(source_uris, readers, strict=True)]:
        if not r.manifest.complete:  # targets are committed once: fused from part of a source, never redone
            raise UserError(f"{option} {uri}: incomplete logits dataset ({r.manifest.num_samples} samples "
                            "committed, its extract has not finished): re-run that extract, then fuse")
    k = int(k or pivot_reader.manifest.meta.k)

    names = _unique_names(
        [pivot_reader.manifest.meta.teacher_name] + [r.manifest.meta.teacher_name for r in readers]
    )
    pivot = _input(pivot_reader, names[0], "pivot")
    sources = [_input(r, name, "source") for r, name in zip(readers, names[1:], strict=True)]
    for src in sources:
        src.index = _sample_index(src.reader)

    report = FuseReport(
        pivot=pivot_uri,
        align=align,
        vocab_map=vocab_map,
        fusion=fusion,
        mode=mode,
        k=k,
        avgce_weights=avgce_weights,
    )
    report.sources = [SourceReport(s.name, s.reader.uri, s.logits_id) for s in sources]

    # jobs: (indices of the sources fused in one targets dataset)
    groups = [list(range(len(sources)))] if mode == "multi" else [[j] for j in range(len(sources))]
    # several datasets, or --out a store's targets/ folder: each at OUT/<targets id> (the store's layout)
    by_id = len(groups) > 1 or _is_store_targets(out_uri)
    if len(groups) > 1 and _is_dataset_dir(out_uri):
        raise UserError(f"--out {out_uri}: a dataset ({fs.DELTA_LOG}/); with several sources --out is the folder that "
                        "gets one dataset per source (e.g. STORE/targets)")
    jobs = []
    for members in groups:
        meta = TargetsMeta(
            pivot=pivot.logits_id,
            sources=[sources[j].logits_id for j in members],
            align=align,
            vocab_map=vocab_map,
            fusion=fusion,
            k=k,
            extra={"mode": mode, "dataset_id": dataset_id}
            | ({"avgce_weights": avgce_weights} if fusion == "avgce" else {}),
            pivot_tokenizer=pivot_reader.manifest.meta.tokenizer_fingerprint,  # the trainer checks --model
            pivot_vocab_size=pivot.table.vocab_size,
        )
        # one dataset: at --out itself; several: OUT/<targets id>, the store's layout (STORE/targets/<id>)
        uri = fs.join(out_uri, targets_id(meta)) if by_id else out_uri
        if len(groups) > 1:
            older = fs.join(out_uri, sources[members[0]].logits_id)  # the layout before 2026-11-30
            if _holds_targets(older, meta):
                uri = older  # resume it where it is
        fs.check_dataset_directory(uri, "--out")
        jobs.append((uri, members, meta))
    # (directory there before, dataset there before) per job: what a failed run may remove
    before = [(_is_there(uri), _is_dataset_dir(uri)) for uri, _, _ in jobs]
    writers = []
    try:
        for uri, _, meta in jobs:
            writers.append(TargetsWriter(uri, meta, shard_rows=shard_rows))
        report = _fuse_into(pivot, sources, names, jobs, writers, report, vocab_map, align, fusion, k,
                            avgce_weights, progress, align_cache_bytes)
    except BaseException:
        for (uri, _, _), w, (dir_there, dataset_there) in zip(jobs, writers, before, strict=False):
            if not dataset_there:
                _discard_if_empty(uri, w, dir_there)
        raise
    report.seconds = time.perf_counter() - t0
    for (uri, _, _), _w in zip(jobs, writers, strict=True):
        fsys, root = fs.resolve(uri)
        fs.write_atomic(fsys, fs.join(root, REPORT_FILE), json.dumps(report.to_dict(), indent=2).encode())
    return report


def _discard_if_empty(uri: str, writer: TargetsWriter, existed: bool) -> None:
    """After a failed run (a damaged input shard, an interrupt), for a targets dataset this run created:
    removed when nothing was committed to it (the directory too, unless it was there before, empty), so a
    run that fails on bad input leaves nothing stored. A dataset with committed samples stays, to be
    resumed, and so does one holding the mapping statistics of a finished first pass (hours of work on a
    large dataset)."""
    fsys, root = fs.resolve(uri)
    if writer.done_ids or fs.list_files(fsys, fs.join(root, STATS_DIR)):
        return
    if existed:
        fsys.delete_dir_contents(root)
    else:
        fsys.delete_dir(root)


def _fuse_into(pivot, sources, names, jobs, writers, report, vocab_map, align, fusion, k, avgce_weights,
               progress, align_cache_bytes) -> FuseReport:
    """Passes 1 and 2 of `fuse_logits` into its open writers; closes them."""
    pivot_reader = pivot.reader
    for (uri, members, _), w in zip(jobs, writers, strict=True):
        report.targets.append(
            TargetsReport(uri, w.manifest.targets_id, [names[0]] + [sources[j].name for j in members])
        )
    done = [w.done_ids for w in writers]
    all_done = set.intersection(*done) if done else set()

    # pass 1: mapping statistics of each (pivot, source) pair, over the whole dataset
    cache = _AlignmentCache(align_cache_bytes)
    maps = _vocab_maps(pivot, sources, jobs, writers, vocab_map, align, cache, report, progress)

    # pass 2: align, map, fuse, write
    bar = _progress(len(pivot_reader), "fuse", progress)
    bar.update(len(all_done))
    try:
        for p, found in _pairs(pivot, sources, skip=all_done):
            report.samples += 1
            aligned: list[AlignedDistributions | None] = []
            for j, (src, s) in enumerate(zip(sources, found, strict=True)):
                aligned.append(_align_one(p, s, j, src, pivot, maps[j], align, k, cache, report.sources[j]))
            own = _fit_k(SparseDist.from_topk(p.topk_ids, p.topk_logprobs), k)
            own_nll, mask = pivot_gold_nll(p), response_mask(p)
            for (_uri, members, _meta), w, done_ids, tr in zip(jobs, writers, done, report.targets, strict=True):
                if p.sample_id in done_ids:
                    continue
                present = [j for j in members if aligned[j] is not None]
                cands = [own] + [aligned[j].dist for j in present]
                nll = [own_nll] + [aligned[j].gold_nll for j in present]
                cand_names = [names[0]] + [sources[j].name for j in present]
                res = fuse(cands, nll, mask, fusion, k=k, avgce_weights=avgce_weights)
                ce = {name: float(v) for name, v in zip(cand_names, res.ces, strict=True)}
                winner = cand_names[res.winner]
                w.write(
                    TargetSample(
                        sample_id=p.sample_id,
                        input_ids=p.input_ids,
                        loss_mask=p.loss_mask,
                        positions=p.positions,
                        topk_ids=res.dist.ids,
                        topk_probs=res.dist.probs,
                        winner=winner,
                        ce=ce,
                    )
                )
                tr.written += 1
                tr.winners[winner] += 1
                for name, v in ce.items():
                    tr.ce_sum[name] = tr.ce_sum.get(name, 0.0) + v
            bar.update(1)
    finally:
        bar.close()
    for w, tr in zip(writers, report.targets, strict=True):
        w.close()
        tr.already_done = len(w.done_ids) - tr.written
        if tr.already_done:
            _count_whole_dataset(tr)
    return report


def _count_whole_dataset(tr: TargetsReport) -> None:
    """Winners and summed CE of a resumed targets dataset over all its samples, from its ``winner`` and
    ``ce`` columns, so that the report (and the dashboard) does not count only the samples the last run
    fused. The per-source alignment statistics still cover this run's samples only."""
    from datastore.targets import TargetsReader

    reader = TargetsReader(tr.uri)
    fsys, root = fs.resolve(tr.uri)
    winners: Counter = Counter()
    ce_sum: dict[str, float] = defaultdict(float)
    for shard in reader.manifest.shards:
        table = read_columns(fsys, root, shard, ["winner", "ce"])
        winners.update(table.column("winner").to_pylist())
        for row in table.column("ce").to_pylist():
            for name, value in row:
                ce_sum[name] += value
    tr.winners, tr.ce_sum = winners, dict(ce_sum)


def _input(reader: LogitsReader, name: str, role: str) -> _Input:
    try:
        tok = reader.tokenizer()
    except UserError as e:
        raise UserError(f"--{role} {reader.uri}: {e}") from None
    return _Input(reader, name, tok, TokenTable.from_tokenizer(tok))


def _vocab_maps(pivot, sources, jobs, writers, method, align, cache, report, progress) -> list[VocabMap]:
    """One `VocabMap` per source; for ``ms``, the statistics pass (or the statistics a previous run of
    the same targets saved)."""
    maps: list[VocabMap | None] = [None] * len(sources)
    need: list[int] = []
    stats: dict[int, MappingStatistics] = {}
    for j, src in enumerate(sources):
        if method != "ms" or src.table.fingerprint == pivot.table.fingerprint:
            maps[j] = build_vocab_map("em" if method == "ms" else method, pivot.table, src.table)
            continue
        saved = _load_saved_statistics(jobs, writers, j, src)
        if saved is not None:
            stats[j] = saved
        else:
            need.append(j)
    if need:
        t0 = time.perf_counter()
        for j in need:
            meta = {"pivot": pivot.logits_id, "source": sources[j].logits_id, "align": align}
            stats[j] = MappingStatistics(pivot.table.vocab_size, sources[j].table.vocab_size, meta)
        subset = [sources[j] for j in need]
        bar = _progress(len(pivot.reader), "mapping statistics", progress)
        try:
            for p, found in _pairs(pivot, subset):
                for j, s in zip(need, found, strict=True):
                    if s is None:
                        continue
                    try:
                        aln = align_sample(p, s, pivot.tokenizer, sources[j].tokenizer, align)
                    except AlignmentError:
                        continue  # counted in the fusion pass
                    stats[j].add(aln, p.input_ids, s.input_ids)
                    cache.put((j, p.sample_id), aln)
                bar.update(1)
        finally:
            bar.close()
        report.statistics_seconds = time.perf_counter() - t0
        for j in need:
            _save_statistics(jobs, writers, j, sources[j], stats[j])
    for j, st in stats.items():
        maps[j] = build_vocab_map("ms", pivot.table, sources[j].table, st)
        rep = report.sources[j]
        st.best_pivot()  # the per-source best-partner table is part of what MS keeps in memory
        rep.statistics_pairs, rep.statistics_bytes = st.num_pairs, st.nbytes
        rep.statistics_file_bytes = len(st.to_bytes())
    return maps


def _stats_paths(jobs, writers, j, src) -> list[tuple]:
    out = []
    for (uri, members, _), _w in zip(jobs, writers, strict=True):
        if j in members:
            fsys, root = fs.resolve(uri)
            out.append((fsys, fs.join(root, STATS_DIR, f"{src.logits_id}.npz")))
    return out


def _load_saved_statistics(jobs, writers, j, src) -> MappingStatistics | None:
    for fsys, path in _stats_paths(jobs, writers, j, src):
        if fs.exists(fsys, path):
            return MappingStatistics.from_bytes(fs.read_bytes(fsys, path))
    return None


def _save_statistics(jobs, writers, j, src, stats: MappingStatistics) -> None:
    data = stats.to_bytes()
    for fsys, path in _stats_paths(jobs, writers, j, src):
        fs.write_atomic(fsys, path, data)


def _example(p, s, aln, pivot_tok, source_tok, max_groups: int = REPORT_EXAMPLE_GROUPS) -> dict:
    """The first `max_groups` groups of one alignment as token strings: {"sample_id", "groups": [{"pivot":
    [str], "source": [str], "kind": "1-1" | "1-n" | "n-1" | "n-m"}]}."""
    kinds = aln.kinds()
    groups = []
    for g in range(min(aln.num_groups, max_groups)):
        ps, pe, ss, se = (int(a[g]) for a in (aln.pivot_start, aln.pivot_end, aln.source_start, aln.source_end))
        groups.append({
            "pivot": pivot_tok.convert_ids_to_tokens(p.input_ids[ps:pe].tolist()),
            "source": source_tok.convert_ids_to_tokens(s.input_ids[ss:se].tolist()),
            "kind": KIND_NAMES[int(kinds[g])],
        })
    return {"sample_id": p.sample_id, "groups": groups}


def _align_one(p, s, j, src, pivot, vmap, align, k, cache, rep: SourceReport) -> AlignedDistributions | None:
    """One source's distributions at the pivot's positions (None when absent or unalignable)."""
    if s is None:
        rep.missing += 1
        return None
    aln = cache.pop((j, p.sample_id))
    if aln is None:
        try:
            aln = align_sample(p, s, pivot.tokenizer, src.tokenizer, align)
        except AlignmentError as e:
            rep.unaligned += 1
            rep.first_error = rep.first_error or str(e)
            return None
    out = align_distributions(p, s, aln, vmap, k=k)
    rep.samples += 1
    if len(rep.examples) < REPORT_EXAMPLES:
        rep.examples.append(_example(p, s, aln, pivot.tokenizer, src.tokenizer))
    for name, c in aln.kind_counts().items():
        rep.groups[name] += c
    rep.chars += int(aln.coverage.get("chars", 0))
    rep.chars_aligned += int(aln.coverage.get("chars_aligned", 0))
    rep.positions += out.from_source.size
    rep.positions_from_source += int(out.from_source.sum())
    carried = float(out.source_mass.sum(dtype=np.float64))
    unmapped = float(out.unmapped_mass.sum(dtype=np.float64))
    kept = float(out.dist.probs[out.from_source].sum(dtype=np.float64))
    rep.source_mass += carried
    rep.unmapped_mass += unmapped
    rep.dropped_mass += max(carried - unmapped - kept, 0.0)
    return out
