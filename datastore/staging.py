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
from collections.abc import Iterator, Sequence
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


def check_target(out: Path, overwrite: bool, flag: str = "--out", inputs: Sequence[Path | str] = ()) -> None:
    """Raises UserError when `out` exists and is not an empty directory, unless `overwrite` (which never
    replaces a plain file: only a directory of an earlier run), and, with or without `overwrite`, when
    `out` is one of the `inputs` (local paths the run reads), holds one of them or lies inside one: an
    overwrite would delete what it reads (a store holding the exported dataset, the folder of the models
    merged), and a result written inside an input would change it."""
    target = Path(out).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if target == path or target in path.parents or path in target.parents:
            how = "is" if target == path else "holds" if target in path.parents else "lies inside"
            raise UserError(f"{flag} {out} {how} the input {given}; give a directory apart from the inputs")
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a directory; give a new or empty directory")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag} {out} exists and is not an empty directory (--overwrite replaces it)")


@contextlib.contextmanager
def staged_directory(out: Path | str, overwrite: bool = False, inputs: Sequence[Path | str] = ()) -> Iterator[Path]:
    """Yields a fresh hidden directory `.NAME.staging-PID` beside `out`; when the block completes it becomes
    `out` (an existing `out` is replaced only with `overwrite`, and only now, so the old one survives a
    failed run); when the block raises, it is removed. `out` is checked by `check_target` (with
    `inputs`) first."""
    out = Path(out).absolute()
    check_target(out, overwrite, inputs=inputs)
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
