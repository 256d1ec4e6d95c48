"""Teacher identity: a revision that changes whenever the weights do.

The revision recorded in a logits manifest (and hashed into the logits id) must tell two checkpoints
apart even when every file keeps its name and size (weights re-saved x3 have the same shapes and dtypes,
so the same safetensors header lengths and file sizes). It therefore hashes every byte of each weight
file — a safetensors file is its JSON header (tensor names, dtypes, shapes, offsets) followed by the
tensor data, so both are covered — plus `config.json` and the shard index.

Reading a 140 GB teacher takes minutes, so each file's digest is cached by (real path, size, mtime,
ctime, inode) in `digest_cache_path()`: a file is read again only after it changed (any rewrite, even one
that restores the old mtime, moves its ctime). The cache is a small JSON file, updated under an exclusive
lock and replaced atomically; a missing, unreadable or corrupt cache only costs a re-hash.

Digests are xxHash's XXH3-128 (the `xxhash` package): 128 bits make an accidental collision negligible,
and it runs at memory speed, so hashing is bound by the disk rather than the CPU (SHA-256 is 3-5x
slower). It identifies checkpoints; it is not a defence against someone forging weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

import xxhash

#: files whose bytes define the function a teacher computes (its tokenizer is fingerprinted separately)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_CHUNK = 8 << 20


def digest_cache_path() -> Path:
    """Where file digests are cached: `$LOGITFUSE_WEIGHTS_CACHE` (a file path) if set, else
    `weight-digests.json` in `$LOGITFUSE_CACHE`, `$XDG_CACHE_HOME/logitfuse` or `~/.cache/logitfuse`."""
    if os.environ.get("LOGITFUSE_WEIGHTS_CACHE"):
        return Path(os.environ["LOGITFUSE_WEIGHTS_CACHE"])
    root = os.environ.get("LOGITFUSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "logitfuse"
    )
    return Path(root) / "weight-digests.json"


def file_digest(path: str | Path) -> str:
    """XXH3-128 hex digest of a file's bytes, read in 8 MiB chunks (no cache)."""
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


@contextlib.contextmanager
def _locked(cache: Path):
    """An exclusive lock on `cache`'s sibling `.lock` file (no lock if the directory is not writable)."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache.with_name(cache.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _read_cache(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: Path, entries: dict) -> None:
    """Replace the cache file atomically (a temporary file created with the umask's permissions, then
    `os.replace`); a failure leaves the old file and is otherwise ignored."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def cached_digests(paths: list[Path], cache: Path | None = None) -> dict[Path, str]:
    """`file_digest` of each path, reusing the cached digest of a file whose real path, size, mtime,
    ctime and inode are unchanged, and recording new ones. Raises OSError if a file cannot be read."""
    cache = cache or digest_cache_path()
    with _locked(cache) as writable:
        entries = _read_cache(cache)
        out: dict[Path, str] = {}
        changed = False
        for path in paths:
            real = os.path.realpath(path)
            key = _stat_key(os.stat(real))
            hit = entries.get(real)
            if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("xxh3_128"), str):
                out[path] = hit["xxh3_128"]
                continue
            out[path] = file_digest(real)
            if _stat_key(os.stat(real)) == key:  # not rewritten while we read it
                entries[real] = {"stat": key, "xxh3_128": out[path]}
                changed = True
        if changed and writable:
            _write_cache(cache, entries)
    return out


def weights_stamp(model_dir: str | Path) -> str:
    """A cheap 16-hex-digit stamp of a local checkpoint directory's current files, read from metadata only:
    XXH3-128 over the name and stat key (size, mtime, ctime, inode) of every weight file and the bytes of
    its config files. It changes whenever a weight file is rewritten (retrained weights at the same path)
    without reading any weights, so a service can key its jobs on it per request; `weights_revision` is
    the content identity stored with the logits. A hub id (not a directory) is returned as given."""
    root = Path(model_dir)
    if not root.is_dir():
        return str(model_dir)
    return _checkpoint_digest(root, lambda files: [_stat_key(f.stat()) for f in files])


def weights_revision(model_dir: str | Path, cache: Path | None = None) -> str:
    """A 16-hex-digit identifier of a local checkpoint directory: XXH3-128 over the name, size and
    content digest of every weight file (`WEIGHT_SUFFIXES`) at its top level, where transformers loads
    them from, and the bytes of `config.json` and any shard index. Anything that is not a directory (a hub id) is returned as given.
    Raises OSError if a weight file cannot be read."""
    root = Path(model_dir)
    if not root.is_dir():
        return str(model_dir)

    def size_and_digest(files: list[Path]) -> list:
        digests = cached_digests(files, cache)
        return [[f.stat().st_size, digests[f]] for f in files]

    return _checkpoint_digest(root, size_and_digest)


def _checkpoint_digest(root: Path, describe: Callable[[list[Path]], list]) -> str:
    """XXH3-128 (16 hex digits) over `[name, *describe(files)[i]]` of each weight file at the top of `root`
    (sorted by name) and the bytes of its config files: the one layout `weights_revision` and
    `weights_stamp` share, so they differ only in how a weight file is described."""
    files = sorted(p for p in root.glob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    h = xxhash.xxh3_128()
    for f, d in zip(files, describe(files), strict=True):
        h.update(json.dumps([f.name, *d]).encode())
    for name in CONFIG_FILES:
        if (root / name).is_file():
            h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()[:16]
