"""Store URIs and the few file operations the datastore needs, over a local directory or S3.

A store URI is a local path (or ``file://`` path) or ``s3://bucket/prefix``. Logits datasets live at
``STORE/logits/<logits_id>/`` and targets datasets at ``STORE/targets/<targets_id>/``, each a Delta Lake
table (`datastore.table`). S3 goes through `pyarrow.fs.S3FileSystem` (and delta-rs for the transaction
log): endpoint from ``AWS_ENDPOINT_URL`` (or ``LOGITFUSE_S3_ENDPOINT``), credentials and region from the
usual AWS environment variables, plain http when the endpoint says so.

Atomicity: a local file is written to a temporary name in the same directory, fsynced, then renamed over
the target (`os.replace`); an S3 object is written by one upload that only becomes visible whole.
`create_exclusive` creates a file only if it does not exist yet (local: `os.link`; S3: a conditional PUT
with ``If-None-Match: *``): the primitive the leases of `datastore.leases` are built on.

Permissions: every file the project writes honours the process umask (0644 under umask 022), including
files written through a temporary name (`tempfile.mkstemp` creates 0600): `file_mode`, `honour_umask`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from urllib.parse import urlparse

import pyarrow.fs as pafs

from datastore.errors import UserError

LOGITS_DIR = "logits"
MANIFEST = "manifest.json"  # the 0.1 layout's shard list; Delta datasets have `_delta_log/` instead
DELTA_LOG = "_delta_log"

_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it for other threads (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:  # elsewhere: set and restore, under a lock
        current = os.umask(0o022)
        os.umask(current)
    return current


def file_mode() -> int:
    """Mode of a new regular file under the umask: 0o666 & ~umask (0644 under 022)."""
    return 0o666 & ~umask()


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file, or a directory tree, the modes a plain ``open``/``mkdir`` would have under the umask
    (files 0o666 & ~umask, directories 0o777 & ~umask). For what libraries write through private temp
    files or `tempfile.mkdtemp` (0600 / 0700): safetensors, `save_pretrained`, renamed staging dirs."""
    mask = umask()
    path = os.fspath(path)
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~mask)
        for top, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(top, d), 0o777 & ~mask)
            for name in files:
                full = os.path.join(top, name)
                if not os.path.islink(full):
                    os.chmod(full, 0o666 & ~mask)
    elif os.path.exists(path):
        os.chmod(path, 0o666 & ~mask)


def local_temp_file(directory: str, prefix: str = ".tmp-") -> tuple[int, str]:
    """`tempfile.mkstemp` in `directory`, but with the umask's mode instead of 0600, so the file keeps a
    team-readable mode once it is renamed into place. Returns (fd, path)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.fchmod(fd, file_mode())
    return fd, tmp


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


def check_local_directory(uri: str, what: str) -> None:
    """Raise `UserError` when the local path of `uri` (a directory to write in), or its nearest existing
    ancestor, is not a directory (an existing file, say): named `what` (e.g. "--store") in the message.
    S3 URIs are not checked (a key prefix cannot collide with an object)."""
    filesystem, path = resolve(uri)
    if not is_local(filesystem):
        return
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        what_is = "a file is there" if probe == path else f"{probe} is a file"
        raise UserError(f"{what} {uri}: {what_is}, not a directory (give a directory, or a new path)")


def check_dataset_directory(uri: str, what: str) -> None:
    """Raise `UserError` when `uri`, a dataset to create or resume, is a directory that holds something
    but no Delta log (``_delta_log/``): a store's ``targets/`` folder, say, where a dataset written at the
    top would sit among the others and break their listing. Named `what` (e.g. "--out") in the message.
    A missing or empty directory, or an existing dataset, passes (the writer checks the dataset's kind
    and settings)."""
    filesystem, path = resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return
    names = sorted(list_dirs(filesystem, path) + list_files(filesystem, path))
    if not names or "_delta_log" in names or MANIFEST in names:  # MANIFEST: a 0.1 dataset, the writer says so
        return
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise UserError(f"{what} {uri}: a directory that holds other things ({shown}) and no dataset; "
                    "give a new or empty directory, e.g. a subdirectory of it")


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _synced_temp_copy(directory: str, data: bytes) -> str:
    """`data` written and fsynced to a new temporary file in `directory` (created if needed); its path.
    The caller renames or links it into place and removes it on failure."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = local_temp_file(directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that a reader sees either the old one or the new one, never a part."""
    if is_local(fs):
        directory = os.path.dirname(path)
        tmp = _synced_temp_copy(directory, data)
        try:
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


def create_exclusive(fs: pafs.FileSystem, path: str, data: bytes) -> bool:
    """Create the file `path` holding `data` only if no file is there yet; True when this call created
    it. Atomic against any number of concurrent callers, local or S3: locally the whole file is written
    under a temporary name and hard-linked to `path` (``link`` fails when `path` exists); on S3 one PUT
    with ``If-None-Match: *`` (the store refuses it with 412 when the key exists)."""
    if is_local(fs):
        tmp = _synced_temp_copy(os.path.dirname(path), data)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412) or e.response.get("Error", {}).get("Code") in (
            "PreconditionFailed", "ConditionalRequestConflict"
        ):
            return False
        raise
    return True


_s3_clients: dict = {}


def s3_client():
    """A boto3 S3 client configured from the same environment as `resolve` (endpoint, credentials)."""
    import boto3

    endpoint = os.environ.get("LOGITFUSE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    key = (endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"))
    if key not in _s3_clients:
        _s3_clients[key] = boto3.client("s3", endpoint_url=endpoint or None, region_name=region)
    return _s3_clients[key]


def table_location(uri: str) -> tuple[str, dict[str, str]]:
    """A dataset URI -> (table URI, storage options) for delta-rs. On S3, commits use conditional puts
    (``conditional_put: etag``: the log entry of version N is created only if absent), so concurrent
    writers need no lock service; credentials and endpoint come from the same variables as `resolve`."""
    filesystem, path = resolve(uri)
    if is_local(filesystem):
        return path, {}
    options = {"conditional_put": "etag"}
    endpoint = os.environ.get("LOGITFUSE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    options["AWS_REGION"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(var):
            options[var] = os.environ[var]
    return "s3://" + path, options


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
    """Manifests of every readable logits dataset in a store; `datastore.catalog.catalog` is the listing
    that also reports broken datasets and filters."""
    from datastore.catalog import catalog

    return [e["manifest"] for e in catalog(store_uri, kind="logits", with_manifest=True, missing_ok=True)
            if "manifest" in e]


TOKENIZER_DIR = "tokenizer"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_problems(filesystem: pafs.FileSystem, root: str, recorded: dict[str, dict]) -> list[str]:
    """What is wrong with a dataset's stored tokenizer files against the sha256 the log recorded
    (empty list: all there and intact)."""
    problems = []
    if not recorded:
        return [f"no stored tokenizer ({TOKENIZER_DIR}/ not recorded in the log)"]
    for name, want in sorted(recorded.items()):
        path = join(root, TOKENIZER_DIR, name)
        try:
            data = read_bytes(filesystem, path)
        except (FileNotFoundError, OSError):
            problems.append(f"{TOKENIZER_DIR}/{name}: missing")
            continue
        if sha256_hex(data) != want.get("sha256"):
            problems.append(f"{TOKENIZER_DIR}/{name}: sha256 mismatch")
    return problems


def save_tokenizer(dataset_uri: str, tokenizer) -> None:
    """Store the teacher's tokenizer files under ``<dataset>/tokenizer/`` so a logits dataset is
    self-contained (fusion re-tokenises and aligns from the store alone). Each file is written whole,
    then one ``tokenizer`` commit records their sha256; an interrupted copy (disk full, kill) is not
    recorded and the next run writes it again. A no-op when the recorded files are there and intact."""
    from datastore.table import TOKENIZER_KEY, DeltaDataset

    table = DeltaDataset(dataset_uri)
    snap = table.snapshot() if table.exists() else None  # no table: files only, nothing to record them in
    if snap is not None and snap.tokenizer and not tokenizer_problems(table.fs, table.root, snap.tokenizer):
        return
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            write_atomic(table.fs, join(table.root, TOKENIZER_DIR, name), data)
            record[name] = {"sha256": sha256_hex(data), "bytes": len(data)}
    if snap is not None:
        table.commit([], "tokenizer", {TOKENIZER_KEY: json.dumps(record, sort_keys=True)})


def load_tokenizer(dataset_uri: str):
    """The tokenizer stored with a logits dataset (`save_tokenizer`), each file checked against the sha256
    in the dataset's log; a remote one is copied to a temporary directory. Raises UserError when it is missing or
    damaged."""
    from transformers import AutoTokenizer

    from datastore.table import DeltaDataset

    table = DeltaDataset(dataset_uri)
    filesystem, root = table.fs, table.root
    source = join(root, TOKENIZER_DIR)
    if table.exists():
        recorded = table.snapshot().tokenizer
        problems = tokenizer_problems(filesystem, root, recorded)
        if problems:
            raise UserError(f"{dataset_uri}: {problems[0]}: re-run the extract (or the `store import ... "
                            "--tokenizer T`) that wrote it to store it again")
        names = sorted(recorded)
    else:  # a 0.1 dataset: files as they are
        names = list_files(filesystem, source)
        if not names:
            raise UserError(f"{dataset_uri} has no stored tokenizer ({TOKENIZER_DIR}/): re-run extract to add it")
    if is_local(filesystem):
        return AutoTokenizer.from_pretrained(source)
    with tempfile.TemporaryDirectory(prefix="logitfuse-tokenizer-") as copy:  # no fixed cache path
        for name in names:
            write_atomic(pafs.LocalFileSystem(), os.path.join(copy, name), read_bytes(filesystem, join(source, name)))
        return AutoTokenizer.from_pretrained(copy)
