"""`logitfuse submit`: upload a dataset to a teacher service and submit an extraction job (optionally wait).

Registered by clients/cli.py. Server errors come back as one line (exit status 2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer


def submit_command(
    server: str = typer.Option(..., help="Base URL of the teacher service, e.g. http://teachers:8000."),
    dataset: Path = typer.Option(..., help="Chat or plain-text dataset, .jsonl or .parquet."),
    teacher: str = typer.Option(..., help="Teacher name as listed by GET /v1/teachers."),
    k: int = typer.Option(10, help="Top-k entries stored per position."),
    chat_template: str = typer.Option(
        "", help="'model' or a shared template name (default: the teacher's).", show_default=False
    ),
    max_length: int = typer.Option(0, help="Tokens per sample, 0 = the teacher's max_length."),
    all_positions: bool = typer.Option(False, help="Score every position, not only the trained ones."),
    skip_invalid: bool = typer.Option(False, help="Skip invalid samples instead of rejecting the file."),
    wait: bool = typer.Option(False, help="Wait for the job, with progress, and print its manifest summary."),
    token: str = typer.Option("", help="Bearer token (default: $LOGITFUSE_TOKEN).", show_default=False),
) -> None:
    """Upload DATASET, submit it to TEACHER and print the job (the same job if it was submitted before)."""
    from clients.client import TeacherClient
    from datastore.errors import UserError
    from datastore.words import plural

    if k < 1:
        raise UserError(f"--k {k}: must be at least 1")
    with TeacherClient(server, token or os.environ.get("LOGITFUSE_TOKEN") or None) as client:
        ds = client.upload(dataset, skip_invalid=skip_invalid)
        typer.echo(f"dataset {ds['id']}: {plural(ds['samples'], 'sample')} ({ds['skipped']} skipped)", err=True)
        job = client.submit(ds["id"], teacher, k, chat_template or None, max_length or None, all_positions)
        typer.echo(f"job {job['id']} {job['state']}{' (existing)' if job.get('existing') else ''}", err=True)
        if wait:
            job = client.wait(job["id"], progress=True)
            if job["state"] != "done":
                raise UserError(f"job {job['id']} {job['state']}: {'; '.join(job['errors']) or 'no error recorded'}")
            m = client.manifest(job["id"])
            rows = sum(s["rows"] for s in m.get("shards", []))
            typer.echo(f"{job['uri']}: {plural(rows, 'sample')} in {plural(len(m.get('shards', [])), 'shard')}, "
                       f"{plural(job['tokens'], 'token')} this run", err=True)
        typer.echo(json.dumps(job))
