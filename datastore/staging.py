"""A directory written whole or not at all: build it in a hidden stage beside the target, rename at the end.

Used by `store export` (datastore.interchange) and by `logitfuse merge` (merge.engine). An interrupted
writer leaves no partial target and nothing that blocks the rerun: the stage is removed on any exception
(Ctrl-C included), and a stage left by a killed process (no cleanup runs on SIGKILL) is removed by the next
run once its process is gone. Directories are created with the process umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from datastore.errors import UserError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_target(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Raises UserError when `out` exists and is not an empty directory, unless `overwrite`."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag} {out} exists and is not an empty directory (--overwrite replaces it)")


@contextlib.contextmanager
def staged_directory(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh hidden directory `.NAME.staging-PID` beside `out`; when the block completes it becomes
    `out` (an existing `out` is replaced only with `overwrite`, and only now, so the old one survives a
    failed run); when the block raises, it is removed."""
    out = Path(out).absolute()
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.staging-"
    for stale in out.parent.glob(prefix + "*"):
        pid = stale.name.removeprefix(prefix)
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    stage = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise UserError(f"{out} was created by someone else meanwhile; the result is not written")
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, old)
            os.replace(stage, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
