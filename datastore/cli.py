"""`logitfuse store ls|show|verify|export|import`: the catalog, integrity and interchange commands of the datastore.

Registered by clients/cli.py as ``app.add_typer(store_app, name="store")``. Bad URIs raise `UserError`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from datastore.words import plural
from datastore.words import size as _size

store_app = typer.Typer(help="Inspect and check logits datasets in a store (local directory or s3://).")


def _verdict(uri: str, problems: list[str], complete: bool, summary: str) -> None:
    """`verify`'s last lines: every problem and exit status 1, or one OK line."""
    if problems:
        for p in problems:
            typer.echo(f"FAIL {p}")
        typer.echo(f"{plural(len(problems), 'problem')} in {uri}")
        raise typer.Exit(1)
    typer.echo(f"OK {uri}: {summary}, {'complete' if complete else 'incomplete (writer not closed)'}")


@store_app.command("ls")
def ls(uri: str = typer.Argument(..., metavar="STORE", help="store: local directory or s3://bucket/prefix")) -> None:
    """List the logits and targets datasets in STORE (a local directory or s3://bucket/prefix)."""
    from datastore import fs
    from datastore.targets import list_targets

    manifests = fs.list_logits(uri)
    for t in list_targets(uri):
        typer.echo(f"targets {t.targets_id:16}  pivot {t.meta.pivot[:20]:20} {t.meta.fusion:6} k {t.meta.k:>3} "
                   f"{t.num_samples:>8} {'sample ' if t.num_samples == 1 else 'samples'} {_size(t.num_bytes):>10}  {'complete' if t.complete else 'incomplete'}")
    if not manifests:
        typer.echo(f"no logits datasets in {uri}")
        return
    typer.echo(f"{'id':16}  {'teacher':24} {'k':>3} {'samples':>8} {'tokens':>10} {'bytes':>10}  complete")
    for m in manifests:
        typer.echo(
            f"{m.logits_id:16}  {m.meta.teacher_name[:24]:24} {m.meta.k:>3} {m.num_samples:>8} "
            f"{m.num_tokens:>10} {_size(m.num_bytes):>10}  {'yes' if m.complete else 'no'}"
        )


def _targets_reader(uri: str):
    """A TargetsReader when `uri` holds a targets dataset (datastore.targets), else None."""
    from datastore import fs
    from datastore.targets import TargetsReader, is_targets_manifest

    fsys, root = fs.resolve(uri)
    path = fs.join(root, fs.MANIFEST)
    if fs.exists(fsys, path) and is_targets_manifest(fs.read_bytes(fsys, path)):
        return TargetsReader(uri)
    return None


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
        f"written by    logitfuse {m.code_version}   created {m.created}   updated {m.updated}",
    ]))


def _verify_targets(uri: str, reader) -> None:
    m = reader.manifest
    problems: list[str] = []
    seen: set[str] = set()
    rows = 0
    for shard in m.shards:
        try:
            arrays = reader.read_shard(shard)
        except Exception as e:  # noqa: BLE001 - any failure to read or decode is a finding
            problems.append(f"{shard.file}: {type(e).__name__}: {e}")
            continue
        if len(arrays) != shard.rows:
            problems.append(f"{shard.file}: {plural(len(arrays), 'row')}, manifest says {shard.rows}")
        dup = seen.intersection(arrays.sample_ids)
        if dup:
            problems.append(f"{shard.file}: duplicate sample id(s) {sorted(dup)[:3]}")
        seen.update(arrays.sample_ids)
        rows += len(arrays)
    _verdict(uri, problems, m.complete, f"targets, {plural(len(m.shards), 'shard')}, {plural(rows, 'sample')}, "
             f"{plural(m.num_positions, 'position')}")


@store_app.command("show")
def show(uri: str = typer.Argument(..., metavar="DATASET", help="STORE/logits/<logits_id> or STORE/targets/<id>")) -> None:
    """Print the manifest summary of DATASET: STORE/logits/<logits_id> or STORE/targets/<id>."""
    from datastore.reader import LogitsReader

    targets = _targets_reader(uri)
    if targets is not None:
        _show_targets(targets)
        return
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
        f"written by    logitfuse {m.code_version}   created {m.created}   updated {m.updated}",
    ]
    typer.echo("\n".join(lines))


@store_app.command("verify")
def verify(uri: str = typer.Argument(..., metavar="DATASET", help="STORE/logits/<logits_id> or STORE/targets/<id>")) -> None:
    """Re-read every shard of DATASET (STORE/logits/<logits_id> or STORE/targets/<id>): checksum, row count,
    and a full decode. Exit status 1 on any problem."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datastore import codec, fs
    from datastore.reader import LogitsReader

    targets = _targets_reader(uri)
    if targets is not None:
        _verify_targets(uri, targets)
        return
    reader = LogitsReader(uri)
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
            problems.append(f"{shard.file}: {plural(len(data), 'byte')}, manifest says {shard.bytes}")
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            problems.append(f"{shard.file}: sha256 mismatch")
        try:
            n_rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            if n_rows != shard.rows:
                problems.append(f"{shard.file}: {plural(n_rows, 'row')}, manifest says {shard.rows}")
            table, ctx = codec.read_shard_bytes(data)
            samples = codec.decode_rows(table, ctx)
        except Exception as e:  # noqa: BLE001 - any failure to decode is a finding, not a crash
            problems.append(f"{shard.file}: does not decode ({type(e).__name__}: {e})")
            continue
        n_pos = sum(len(s.positions) for s in samples)
        n_tok = sum(len(s.input_ids) for s in samples)
        if (n_pos, n_tok) != (shard.positions, shard.tokens):
            problems.append(
                f"{shard.file}: {plural(n_pos, 'position')}/{plural(n_tok, 'token')}, manifest says "
                f"{shard.positions}/{shard.tokens}"
            )
        for s in samples:
            if s.sample_id in seen:
                problems.append(f"{shard.file}: duplicate sample id {s.sample_id!r}")
            seen.add(s.sample_id)
            if len(s.positions) and not np.all(np.isfinite(s.topk_logprobs)):
                problems.append(f"{shard.file}: {s.sample_id!r} has non-finite logprobs")
        rows, positions, tokens = rows + len(samples), positions + n_pos, tokens + n_tok
    _verdict(uri, problems, m.complete,
             f"{plural(len(m.shards), 'shard')}, {plural(rows, 'sample')}, {plural(positions, 'position')}, "
             f"{plural(tokens, 'token')}")


# ------------------------------------------------------------------ interchange (datastore/interchange.py)


def export_command(
    uri: str = typer.Argument(..., help="logits dataset: STORE/logits/<logits_id>"),
    format: str = typer.Option(..., "--format", help="axolotl | parquet | hf"),
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty; see --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out once the export is complete."),
) -> None:
    """Export a logits dataset for other trainers: axolotl KD columns, plain parquet, or a datasets dataset."""
    from datastore.interchange import export_dataset

    n = export_dataset(uri, format, out, overwrite=overwrite)
    typer.echo(f"exported {plural(n, 'sample')} from {uri} to {out} ({format})")


def import_command(
    file: Path = typer.Argument(..., help="vLLM prompt_logprobs responses (.jsonl) or a parquet export file."),
    format: str = typer.Option(..., "--format", help="vllm | parquet"),
    store: str = typer.Option(..., "--store", help="Store URI: a local directory or s3://bucket/prefix."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="The teacher's tokenizer: a directory or a cached hub id (required for vllm)."
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
