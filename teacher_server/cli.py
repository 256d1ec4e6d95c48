"""`logitfuse serve`: load and validate `teachers.yaml`, then run the FastAPI app under uvicorn.

Registered by clients/cli.py. A bad config is a `UserError`: one line on stderr, exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer


def serve_command(
    config: Path = typer.Option(..., help="teachers.yaml: store, teachers, tokens (see docs/service.md)."),
    store: str = typer.Option(
        "", help="Store URI overriding the config's: local directory or s3://bucket/prefix.", show_default=False
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="TCP port."),
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = typer.Option(
        "warning", help="uvicorn log level (info logs every request)."
    ),
) -> None:
    """Run the teacher service: dataset uploads, extraction jobs, synchronous top-k, metrics."""
    import uvicorn

    from datastore.errors import UserError
    from datastore.fs import resolve
    from datastore.words import plural
    from teacher_server.app import create_app
    from teacher_server.config import load_config

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535")
    cfg = load_config(config, store or None)
    resolve(cfg.store)  # a bad store URI fails here, not in the first job
    app = create_app(cfg)
    typer.echo(f"logitfuse serve: {plural(len(cfg.teachers), 'teacher')} "
               f"({', '.join(t.name for t in cfg.teachers)}), store {cfg.store}, state {cfg.state_dir}, "
               f"http://{host}:{port} (docs at /docs)", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
