"""`logitfuse store ls|show|verify|migrate|gc|rm|export|import`: the catalog, integrity, retention and
interchange commands of the datastore.

Registered by clients/cli.py as ``app.add_typer(store_app, name="store")``. Bad URIs, a missing store or
a corrupt log raise `UserError` (one line, exit 2); `verify` exits 1 when it finds a problem.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from datastore.errors import UserError
from datastore.words import plural
from datastore.words import size as _size

if TYPE_CHECKING:  # numpy, pyarrow and the readers load inside the commands: `--help` stays instant
    from datastore.reader import LogitsReader

store_app = typer.Typer(help="Inspect and check logits and targets datasets in a store (local directory or s3://).")


def _verdict(uri: str, problems: list[str], complete: bool, summary: str) -> None:
    """`verify`'s last lines: every problem and exit status 1, or one OK line."""
    if problems:
        for p in problems:
            typer.echo(f"FAIL {p}")
        typer.echo(f"{plural(len(problems), 'problem')} in {uri}")
        raise typer.Exit(1)
    typer.echo(f"OK {uri}: {summary}, {'complete' if complete else 'incomplete (writer not closed)'}")


LS_COLUMNS = ("kind", "id", "teacher", "revision", "tokenizer", "k", "template", "dataset", "samples", "bytes",
              "B/entry", "version", "team", "updated", "fused from")


@store_app.command("ls")
def ls(
    uri: str = typer.Argument(..., metavar="STORE", help="store root: local directory or s3://bucket/prefix"),
    teacher: str = typer.Option("", help="Only datasets whose teacher (pivot, for targets) contains this."),
    dataset: str = typer.Option("", help="Only datasets of this input dataset id (or its prefix)."),
    kind: str = typer.Option("", metavar="<logits|targets>", help="Only this kind: logits or targets."),
) -> None:
    """List the logits and targets datasets in a store (a broken dataset is one BROKEN line)."""
    from datastore.catalog import catalog

    entries = catalog(uri, kind=kind or None, teacher=teacher or None, dataset=dataset or None)
    if not entries:
        typer.echo(f"no datasets in {uri}" + (" matching the filters" if teacher or dataset or kind else ""))
        return
    rows = []
    for e in entries:
        if e["status"] != "ok":
            rows.append(None)
            continue
        bpe = e["bytes_per_entry"]
        rows.append([e["kind"], e["id"], e["teacher"][:24], e["revision"][:12], e["tokenizer"][:12], str(e["k"]),
                     e["template"][:10], e["dataset"][:16], str(e["samples"]), _size(e["bytes"]),
                     f"{bpe:.3f}" if bpe is not None else "-", str(e["version"]), e["team"] or "-",
                     (e["updated"] or "")[:19] + ("" if e["complete"] else " (incomplete)"), _recipe(e)])
    widths = [max([len(c)] + [len(r[i]) for r in rows if r]) for i, c in enumerate(LS_COLUMNS)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(LS_COLUMNS, widths, strict=True)).rstrip())
    for e, r in zip(entries, rows, strict=True):
        if r is None:
            typer.echo(f"BROKEN {e['kind']} {e['id']}: {e['error']}")
        else:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _recipe(entry: dict) -> str:
    """What made a targets dataset, for its `store ls` row: fusion, alignment, vocabulary map and the
    sources' teacher names (``-`` for logits)."""
    if entry["kind"] != "targets":
        return "-"
    return (f"{entry['fusion']} {entry['align']} {entry['vocab_map']}"
            f"{' ' + entry['mode'] if entry['mode'] == 'multi' else ''}: {', '.join(entry['source_teachers'])}")


def _targets_reader(uri: str):
    """A TargetsReader when `uri` holds a targets dataset (datastore.targets), else None."""
    from datastore.catalog import dataset_kind
    from datastore.targets import TargetsReader

    return TargetsReader(uri) if dataset_kind(uri) == "targets" else None


def _show_targets(reader) -> None:
    m = reader.manifest
    meta = m.meta
    typer.echo("\n".join([
        f"targets id    {m.targets_id}  ({'complete' if m.complete else 'INCOMPLETE'})",
        f"pivot         {meta.pivot}   sources {', '.join(meta.sources) or '-'}",
        f"tokenizer     {meta.pivot_tokenizer or 'not recorded'}   {plural(meta.pivot_vocab_size, 'token')}",
        f"fusion        {meta.fusion}   align {meta.align}   vocab map {meta.vocab_map}   k {meta.k}",
        f"samples       {m.num_samples}   positions {m.num_positions}   tokens {m.num_tokens}",
        f"bytes         {_size(m.num_bytes)} in {plural(len(m.shards), 'shard')}",
        f"encoding      probs {m.encoding.get('topk_probs')}",
        _version_line(m),
    ]))


def _version_line(m) -> str:
    table = f"Delta table version {m.version}" if m.table == "delta" else "0.1 manifest.json (store migrate)"
    return (f"written by    logitfuse {m.code_version}   team {m.team or '-'}   created {m.created}   "
            f"updated {m.updated}   {table}")


def _verify_targets(reader) -> tuple[list[str], str]:
    from datastore.table import CorruptShard

    m = reader.manifest
    problems: list[str] = []
    seen: set[str] = set()
    rows = 0
    for shard in m.shards:
        try:
            arrays = reader.read_shard(shard)
        except CorruptShard as e:
            problems.append(f"{shard.file}: {e.problem}")
            continue
        except Exception as e:  # noqa: BLE001 - any failure to read or decode is a finding
            problems.append(f"{shard.file}: {type(e).__name__}: {e}")
            continue
        if len(arrays) != shard.rows:
            problems.append(f"{shard.file}: {len(arrays)} rows, the log says {shard.rows}")
        dup = seen.intersection(arrays.sample_ids)
        if dup:
            problems.append(f"{shard.file}: duplicate sample {'id' if len(dup) == 1 else 'ids'} {sorted(dup)[:3]}")
        seen.update(arrays.sample_ids)
        rows += len(arrays)
    return problems, f"targets, {plural(len(m.shards), 'shard')}, {plural(rows, 'sample')}, {plural(m.num_positions, 'position')}"


@store_app.command("show")
def show(uri: str = typer.Argument(..., metavar="DATASET", help="dataset: STORE/logits/<logits_id> or STORE/targets/<id>")) -> None:
    """Print one logits (or targets) dataset's summary: identity, sizes, encoding, version, team."""
    targets = _targets_reader(uri)
    if targets is not None:
        _show_targets(targets)
        return
    from datastore.reader import LogitsReader

    m = LogitsReader(uri).manifest
    meta = m.meta
    topk = sum(s.topk_bytes for s in m.shards)
    entries = m.num_positions * meta.k
    lines = [
        f"logits id     {m.logits_id}  ({'complete' if m.complete else 'INCOMPLETE'})",
        f"dataset       {meta.dataset_id}",
        f"teacher       {meta.teacher_name} @ {meta.teacher_revision}  tokenizer {meta.tokenizer_fingerprint}",
        f"k             {meta.k}   template {meta.chat_template}   max_length {meta.max_length}   "
        f"all_positions {meta.all_positions}",
        f"samples       {m.num_samples}   positions {m.num_positions}   tokens {m.num_tokens}",
        f"bytes         {_size(m.num_bytes)} in {plural(len(m.shards), 'shard')}"
        + (f"   {m.num_bytes / entries:.3f} B/entry ({topk / entries:.3f} top-k only)" if entries else ""),
        f"encoding      {m.encoding.get('codec')}  step {m.encoding.get('logprob_step')} nat  "
        f"max |error| {m.encoding.get('logprob_max_abs_error')} nat  ids {m.encoding.get('ids')}",
        _version_line(m),
    ]
    typer.echo("\n".join(lines))


def _verify_tokenizer(reader: LogitsReader) -> list[str]:
    """Stored tokenizer files against the sha256 the log recorded; files that no commit recorded (an
    interrupted copy) are a problem too."""
    from datastore import fs
    from datastore.table import DeltaDataset

    table = DeltaDataset(reader.uri)
    if not table.exists():
        return []
    recorded = table.snapshot().tokenizer
    if recorded:
        return fs.tokenizer_problems(table.fs, table.root, recorded)
    if fs.list_files(table.fs, fs.join(table.root, fs.TOKENIZER_DIR)):
        return [f"{fs.TOKENIZER_DIR}/: files no commit recorded (an interrupted copy): re-run extract"]
    return []


def _verify_logits(reader: LogitsReader) -> tuple[list[str], str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datastore import codec, fs
    m = reader.manifest
    problems: list[str] = []
    seen: set[str] = set()
    rows = positions = tokens = 0
    for shard in m.shards:
        path = reader.shard_path(shard)
        try:
            data = fs.read_bytes(reader._fs, path)
        except (FileNotFoundError, OSError) as e:
            problems.append(f"{shard.file}: missing or unreadable ({e})")
            continue
        if len(data) != shard.bytes:
            problems.append(f"{shard.file}: {len(data)} bytes, the log says {shard.bytes}")
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            problems.append(f"{shard.file}: sha256 mismatch")
        try:
            n_rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            if n_rows != shard.rows:
                problems.append(f"{shard.file}: {n_rows} rows, the log says {shard.rows}")
            table, ctx = codec.read_shard_bytes(data)
            samples = codec.decode_rows(table, ctx)
        except Exception as e:  # noqa: BLE001 - any failure to decode is a finding, not a crash
            problems.append(f"{shard.file}: does not decode ({type(e).__name__}: {e})")
            continue
        n_pos = sum(len(s.positions) for s in samples)
        n_tok = sum(len(s.input_ids) for s in samples)
        if (n_pos, n_tok) != (shard.positions, shard.tokens) and (shard.positions or shard.tokens):
            problems.append(
                f"{shard.file}: {n_pos} positions/{n_tok} tokens, the log says "
                f"{shard.positions}/{shard.tokens}"
            )
        for s in samples:
            if s.sample_id in seen:
                problems.append(f"{shard.file}: duplicate sample id {s.sample_id!r}")
            seen.add(s.sample_id)
            cut = s.topk_ids < 0  # entries a --top-p / --within-nats cut: id -1, logprob -inf
            if not np.all(np.isfinite(s.topk_logprobs[~cut])) or not np.all(np.isneginf(s.topk_logprobs[cut])):
                problems.append(f"{shard.file}: {s.sample_id!r} has non-finite logprobs")
        rows, positions, tokens = rows + len(samples), positions + n_pos, tokens + n_tok
    problems += _verify_tokenizer(reader)
    return problems, (f"{plural(len(m.shards), 'shard')}, {plural(rows, 'sample')}, {plural(positions, 'position')}, "
                      f"{plural(tokens, 'token')}")


def verify_dataset(uri: str) -> tuple[list[str], str, bool]:
    """(problems, summary, complete) of one dataset: every shard re-read (size, sha256, rows, full
    decode, duplicate ids) and, for logits, the stored tokenizer files. Raises UserError when `uri` holds
    no dataset or its log is corrupt."""
    targets = _targets_reader(uri)
    if targets is not None:
        problems, summary = _verify_targets(targets)
        return problems, summary, targets.manifest.complete
    from datastore.reader import LogitsReader

    reader = LogitsReader(uri)
    problems, summary = _verify_logits(reader)
    return problems, summary, reader.manifest.complete


@store_app.command("verify")
def verify(uri: str = typer.Argument(..., metavar="DATASET|STORE", help="a dataset (STORE/logits/<id>, STORE/targets/<id>) or a store root")) -> None:
    """Re-read every shard (sha256, size, rows, full decode) and the tokenizer files, of one dataset or
    of every dataset under a store root. Exit 1 on any problem."""
    from datastore.catalog import dataset_kind

    if dataset_kind(uri) is not None:
        problems, summary, complete = verify_dataset(uri)
        _verdict(uri, problems, complete, summary)
        return
    failed = 0
    datasets = _store_datasets(uri, "verify")
    for ds_uri in datasets:
        try:
            problems, summary, complete = verify_dataset(ds_uri)
        except UserError as e:
            problems, summary, complete = [str(e).splitlines()[0]], "", False
        if problems:
            failed += 1
            for p in problems:
                typer.echo(f"FAIL {ds_uri}: {p}")
        else:
            typer.echo(f"OK {ds_uri}: {summary}, {'complete' if complete else 'incomplete'}")
    _end(failed, datasets, uri)
    typer.echo(f"OK {uri}: {plural(len(datasets), 'dataset')} verified")


@store_app.command("migrate")
def migrate(uri: str = typer.Argument(..., metavar="DATASET|STORE", help="a 0.1 dataset (with manifest.json) or a store root")) -> None:
    """Convert datasets written by logitfuse 0.1 (manifest.json) into Delta tables, in place: the shard
    files stay, one commit adds them with their recorded facts; manifest.json is then renamed
    manifest.json.migrated. Datasets already on Delta are left alone."""
    from datastore.catalog import dataset_kind
    from datastore.migrate import migrate_dataset

    single = dataset_kind(uri) is not None
    datasets = [uri] if single else _store_datasets(uri, "migrate")
    _end(_each(datasets, lambda ds_uri: typer.echo(migrate_dataset(ds_uri)), single), datasets, uri)


def _store_datasets(uri: str, what: str) -> list[str]:
    """Every dataset URI under the store root `uri`. Raises UserError when `uri` is a directory that is
    neither a dataset nor a store (no logits/ or targets/)."""
    from datastore import fs
    from datastore.catalog import has_store_layout, iter_datasets

    filesystem, root = fs.resolve(uri)
    if filesystem.get_file_info(root).type == fs.pafs.FileType.Directory and not has_store_layout(uri):
        raise UserError(f"{uri}: neither a dataset (no {fs.DELTA_LOG}/ nor {fs.MANIFEST}) nor a store (no logits/ "
                        f"or targets/): nothing to {what}")
    return [d for _k, d, _n in iter_datasets(uri)]


def _each(datasets: list[str], run, single: bool) -> int:
    """`run` on each dataset of a store; a dataset that fails (a stray folder, a broken log) is one FAIL
    line and the others still run. One dataset given by itself fails as usual (one line, exit 2).
    Returns the number that failed."""
    failed = 0
    for ds_uri in datasets:
        try:
            run(ds_uri)
        except UserError as e:
            if single:
                raise
            failed += 1
            typer.echo(f"FAIL {ds_uri}: {str(e).splitlines()[0]}")
    return failed


def _end(failed: int, datasets: list[str], uri: str) -> None:
    if failed:
        typer.echo(f"{failed} of {plural(len(datasets), 'dataset')} in {uri} {'has' if failed == 1 else 'have'} problems")
        raise typer.Exit(1)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):  # nan would pass every age test: no grace at all
        raise UserError(f"--older-than {text!r}: expected seconds or a number with s, m, h or d (e.g. 2h), >= 0")
    return value


@store_app.command("gc")
def gc(
    uri: str = typer.Argument(..., metavar="DATASET|STORE", help="a dataset or a store root"),
    older_than: str = typer.Option("1h", help="Only files older than this (seconds, or 30m, 2h, 7d): a concurrent "
                                   "writer's shard is unreferenced for a moment before its commit."),
    dry_run: bool = typer.Option(False, help="List what would be deleted, delete nothing."),
) -> None:
    """Delete files no version of a dataset references (uncommitted shards, temp files, leases of committed
    ranges), in one dataset or every dataset of a store."""
    from datastore.catalog import dataset_kind
    from datastore.retention import gc_dataset

    seconds = _duration(older_than)
    single = dataset_kind(uri) is not None
    datasets = [uri] if single else _store_datasets(uri, "collect")
    total = 0

    def collect(ds_uri: str) -> None:
        nonlocal total
        for rel in gc_dataset(ds_uri, seconds, dry_run=dry_run):
            typer.echo(f"{'would delete' if dry_run else 'deleted'} {ds_uri}/{rel}")
            total += 1

    failed = _each(datasets, collect, single)
    typer.echo(f"{plural(total, 'file')} {'to delete' if dry_run else 'deleted'} in {plural(len(datasets), 'dataset')}")
    _end(failed, datasets, uri)


@store_app.command("rm")
def rm(uri: str = typer.Argument(..., metavar="DATASET", help="dataset: STORE/logits/<logits_id> or STORE/targets/<id>")) -> None:
    """Delete one dataset (its log, shards, tokenizer and leases)."""
    from datastore.retention import rm_dataset

    typer.echo(rm_dataset(uri))


# ------------------------------------------------------------------ interchange (datastore/interchange.py)


def export_command(
    uri: str = typer.Argument(..., metavar="DATASET", help="logits dataset: STORE/logits/<logits_id>"),
    format: str = typer.Option(..., "--format", metavar="<axolotl|parquet|hf>", help="axolotl | parquet | hf"),
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty; see --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out once the export is complete."),
) -> None:
    """Export a logits dataset for other trainers: axolotl KD columns, plain parquet, or a datasets dataset."""
    from datastore.interchange import export_dataset
    from datastore.reader import LogitsReader

    n = export_dataset(uri, format, out, overwrite=overwrite)
    partial = "" if LogitsReader(uri).manifest.complete else (
        "; the dataset is incomplete (its extract has not finished): these are the samples committed so far")
    typer.echo(f"exported {plural(n, 'sample')} from {uri} to {out} ({format}){partial}")


def import_command(
    file: Path = typer.Argument(..., metavar="FILE", help="vLLM prompt_logprobs responses (.jsonl) or a parquet export file."),
    format: str = typer.Option(..., "--format", metavar="<vllm|parquet>", help="vllm | parquet"),
    store: str = typer.Option(..., "--store", help="Store URI: a local directory or s3://bucket/prefix."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="The teacher's tokenizer: a directory or a cached hub id (required for vllm; for "
        "parquet, default: the export's tokenizer/)."
    ),
    teacher_name: str | None = typer.Option(None, "--teacher-name", help="Teacher name (default: the responses' model)."),
    dataset_id: str | None = typer.Option(None, "--dataset-id", help="Dataset id (default: the file name and digest)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Import the valid lines, reporting the others."),
) -> None:
    """Import teacher distributions produced elsewhere into a logits dataset (then fuse and train as usual)."""
    from datastore.errors import UserError
    from datastore.interchange import import_dataset

    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        from datastore.hub import resolve_local_or_cached

        tok = AutoTokenizer.from_pretrained(resolve_local_or_cached(tokenizer, "model", "--tokenizer"))
    report = import_dataset(file, format, store, tokenizer=tok, teacher_name=teacher_name, dataset_id=dataset_id,
                            skip_invalid=skip_invalid, on_problem=lambda m: typer.echo(m, err=True))
    if report.uri is None:
        raise UserError(f"{file}: {plural(len(report.problems), 'invalid line')}, listed above; nothing imported "
                        "(--skip-invalid imports the others)")
    typer.echo(f"{report.uri}: {plural(report.written, 'sample')} imported, {report.already_stored} already stored, "
               f"{plural(len(report.problems), 'invalid line')} skipped")


store_app.command("export")(export_command)
store_app.command("import")(import_command)
