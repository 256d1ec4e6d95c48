"""Store URIs and the few file operations the datastore needs, over a local directory or S3.

A store URI is a local path (or ``file://`` path) or ``s3://bucket/prefix``. Logits datasets live at
``STORE/logits/<logits_id>/`` (`manifest.json` + `shard-NNNNNN.parquet`). S3 goes through
`pyarrow.fs.S3FileSystem`: endpoint from ``AWS_ENDPOINT_URL`` (or ``LOGITFUSE_S3_ENDPOINT``), credentials
and region from the usual AWS environment variables, plain http when the endpoint says so.

Atomicity: a local file is written to a temporary name in the same directory, fsynced, then renamed over
the target (`os.replace`); an S3 object is written by one upload that only becomes visible whole.
"""

from __future__ import annotations

import os
import tempfile
from urllib.parse import urlparse

import pyarrow.fs as pafs

from datastore.errors import UserError

LOGITS_DIR = "logits"
MANIFEST = "manifest.json"


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("LOGITFUSE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"S3 endpoint {endpoint!r} must look like http(s)://host[:port]")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A store or dataset URI -> (filesystem, path inside it). Raises UserError for unsupported URIs."""
    if not isinstance(uri, str) or not uri.strip():
        raise UserError("empty store URI: give a local directory or s3://bucket/prefix")
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        if not path or path.startswith("/"):
            raise UserError(f"S3 URI {uri!r} has no bucket: expected s3://bucket/prefix")
        return _s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise UserError(f"unsupported store URI {uri!r}: expected a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri_or_path: str, *parts: str) -> str:
    return "/".join([uri_or_path.rstrip("/"), *parts])


def logits_uri(store_uri: str, logits_id: str) -> str:
    """Where the logits dataset with this id lives in a store."""
    return join(store_uri, LOGITS_DIR, logits_id)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that a reader sees either the old one or the new one, never a part."""
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    else:
        with fs.open_output_stream(path) as f:  # one upload; the object appears when it completes
            f.write(data)


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Base names of the files directly in a directory (empty when it does not exist)."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def list_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_logits(store_uri: str):
    """The catalog: manifests of every logits dataset in a store, by logits id."""
    from datastore.manifest import Manifest

    fs, root = resolve(store_uri)
    out = []
    base = join(root, LOGITS_DIR)
    for name in list_dirs(fs, base):
        path = join(base, name, MANIFEST)
        if exists(fs, path):
            out.append(Manifest.model_validate_json(read_bytes(fs, path)))
    return out


TOKENIZER_DIR = "tokenizer"


def save_tokenizer(dataset_uri: str, tokenizer) -> None:
    """Store the teacher's tokenizer files under ``<dataset>/tokenizer/`` (once), so a logits dataset is
    self-contained: fusion re-tokenises and aligns from the store alone."""
    fs, root = resolve(dataset_uri)
    target = join(root, TOKENIZER_DIR)
    if list_files(fs, target):
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                write_atomic(fs, join(target, name), f.read())


def load_tokenizer(dataset_uri: str):
    """The tokenizer stored with a logits dataset (`save_tokenizer`); a remote one is copied to a temporary
    directory, loaded and the copy removed (no fixed cache path)."""
    from transformers import AutoTokenizer

    fs, root = resolve(dataset_uri)
    source = join(root, TOKENIZER_DIR)
    names = list_files(fs, source)
    if not names:
        raise UserError(f"{dataset_uri} has no stored tokenizer ({TOKENIZER_DIR}/): re-run extract to add it")
    if is_local(fs):
        return AutoTokenizer.from_pretrained(source)
    with tempfile.TemporaryDirectory(prefix="logitfuse-tokenizer-") as copy:
        for name in names:
            write_atomic(pafs.LocalFileSystem(), os.path.join(copy, name), read_bytes(fs, join(source, name)))
        return AutoTokenizer.from_pretrained(copy)
