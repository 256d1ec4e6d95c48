"""Hub-style inputs: a local path, or a Hugging Face hub id whose files are already in the local HF cache.

Nothing is downloaded: the cache is read with `huggingface_hub.snapshot_download(local_files_only=True)`,
so this works offline (HF_HUB_OFFLINE=1) and the cache location follows HF_HOME / HF_HUB_CACHE.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from datastore.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".jsonl", ".parquet")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def looks_like_hub_id(name: str) -> bool:
    """`org/name` (one slash, no leading `.`, `/` or `~`): what the hub accepts as a repository id."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def resolve_local_or_cached(name: str | Path, repo_type: Literal["model", "dataset"], what: str) -> Path:
    """`name` if it exists locally, else the cached snapshot directory of hub repository `name`.

    Raises UserError (one line): a path that does not exist and is not a hub id says so; a hub id that is
    not in the cache names the cache directory and the command that fills it."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = str(name)
    if not looks_like_hub_id(text):
        raise UserError(f"{what} {text}: no such file or directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        raise UserError(
            f"{what} {text}: not a local path, and no {repo_type} {text} in the Hugging Face cache {hub_cache_dir()} "
            f"(offline: fetch it first with `huggingface-cli download {text}{flag}`)"
        ) from None


def resolve_dataset_file(name: str | Path) -> Path:
    """A dataset file: a local path, or a cached hub dataset holding exactly one .jsonl or .parquet file. A
    missing path that is not a hub id is returned as given: the dataset loader reports it."""
    if not Path(name).expanduser().exists() and not looks_like_hub_id(str(name)):
        return Path(name)
    path = resolve_local_or_cached(name, "dataset", "--dataset")
    if path.is_file():
        return path
    files = sorted(p for p in path.rglob("*") if p.suffix in _DATA_SUFFIXES and p.is_file())
    if len(files) != 1:
        listed = ", ".join(str(p.relative_to(path)) for p in files[:5]) or "none"
        raise UserError(f"--dataset {name}: expected one .jsonl or .parquet file in {path}, found {len(files)} "
                        f"({listed}); pass the file's path")
    return files[0]
