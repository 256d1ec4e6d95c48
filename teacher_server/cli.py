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
    """Run the teacher service: dataset uploads, extraction jobs, synchronous top-k, metrics.

    Refused with one line (exit 2) before any job or worker is touched: a store that is a file, a state
    directory that another `logitfuse serve` uses (its lock, `teacher_server.jobs.lock_state_dir`, is held
    until this process exits), an address that cannot be listened on (a port in use)."""
    import uvicorn

    from datastore.errors import UserError
    from datastore.fs import check_local_directory, resolve
    from datastore.words import plural
    from teacher_server.app import create_app
    from teacher_server.config import load_config
    from teacher_server.jobs import lock_state_dir

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535")
    cfg = load_config(config, store or None)
    resolve(cfg.store)  # a bad store URI fails here, not in the first job
    check_local_directory(cfg.store, "--store" if store else "store")  # a file there: every job would fail
    lock_state_dir(cfg.state_dir)  # before the supervisor requeues jobs or kills workers of a previous server
    sock = listen_socket(host, port)  # the port too is checked before any job is resumed
    try:
        app = create_app(cfg)
        typer.echo(f"logitfuse serve: {plural(len(cfg.teachers), 'teacher')} "
                   f"({', '.join(t.name for t in cfg.teachers)}), store {cfg.store}, state {cfg.state_dir}, "
                   f"http://{host}:{sock.getsockname()[1]} (docs at /docs)", err=True)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                               timeout_graceful_shutdown=10))
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # the app failed to start (uvicorn.run's status for that)
        raise SystemExit(3)


def listen_socket(host: str, port: int):
    """A TCP socket bound to (host, port) and listening, as uvicorn would bind it; `UserError` (one line)
    when that is impossible: the port is in use, the address is not this machine's or does not resolve."""
    import errno
    import socket

    from datastore.errors import UserError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            why = "the port is already in use (another server?); stop it or pick another --port"
        else:
            why = f"{e.strerror or e}; give an address of this machine (--host)"
        raise UserError(f"cannot listen on {host}:{port}: {why}") from None
    return sock
