"""Input datasets: chat (`messages` or ShareGPT `conversations`) and plain-text samples, from JSONL
or Parquet, validated once at the edge so that every later stage can trust them.

Reading streams: a JSONL file one line at a time, a Parquet file one row group and then one small batch
at a time, with string columns kept dictionary-encoded until each row's decoded size is known. `Limits`
bound what reading may decode (bytes per sample, bytes in all), so a small file that decodes to gigabytes
(a Parquet dictionary/zstd bomb) is refused before it is materialised. Every malformed record, however
pathological (invalid UTF-8, lone surrogates, nesting deeper than the parser allows, integers too long to
convert, a duplicate id), becomes one `Problem` naming its line or row; `scan_dataset` validates a file
in memory that does not grow with the number of samples (the service's upload check), `load_dataset`
returns the samples themselves (extraction).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .words import plural

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Sample:
    """One validated input sample: a chat (`messages`) or a plain text (`text`), never both."""

    id: str
    messages: tuple[Message, ...] | None = None
    text: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Problem:
    where: str  # "line 4" (JSONL) or "row 3" (Parquet)
    reason: str
    index: int = field(default=-1, compare=False)  # ordinal of the record in the file (for ordering)

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Dataset:
    samples: list[Sample]
    dataset_id: str
    skipped: list[Problem] = field(default_factory=list)
    source: str = ""


@dataclass(frozen=True)
class Limits:
    """What reading a dataset may decode, in bytes (None: no limit, the CLI's default).

    `max_sample_bytes`: one JSONL line, or one Parquet row's decoded values; a larger sample is an
    invalid sample (skippable). `max_decoded_bytes`: all samples together, decoded; past it the whole
    file is refused with `DecodedTooLarge`.
    """

    max_sample_bytes: int | None = None
    max_decoded_bytes: int | None = None


class DecodedTooLarge(UserError):
    """The dataset decodes to more bytes than `Limits.max_decoded_bytes` (the service answers 413)."""


class InvalidDataset(UserError):
    """A file with invalid samples (or duplicate ids); `problems` lists them in file order (at most
    `MAX_PROBLEMS`), `count` is how many there are in all."""

    def __init__(self, message: str, problems: list[Problem] | None = None, count: int = 0):
        super().__init__(message)
        self.problems = list(problems or [])
        self.count = count

    def __reduce__(self):  # picklable across a process pool
        return (InvalidDataset, (str(self), self.problems, self.count))


#: problems kept in memory and reported by `scan_dataset` (all of them are counted)
MAX_PROBLEMS = 100


def unicode_problem(value: str, what: str) -> str | None:
    """Why `value` (named `what` in the message) is not valid Unicode, or None: a lone UTF-16 surrogate
    such as "\\ud800", which JSON can encode but UTF-8 cannot, so no tokenizer or Parquet writer takes it."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"{what} has a lone UTF-16 surrogate {value[e.start]!r} at character {e.start} (JSON can encode "
                f"it, UTF-8 cannot); text must be valid Unicode")
    return None


def _check_unicode(value: str, what: str) -> None:
    """Reject a string that is not valid Unicode (`unicode_problem`) with ValueError."""
    problem = unicode_problem(value, what)
    if problem is not None:
        raise ValueError(problem)


def parse_record(rec: Any) -> Sample:
    """Validate one decoded record; raise ValueError with the reason if it is not a valid sample."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object with 'id' and 'messages', 'conversations' or 'text', got {type(rec).__name__}")
    sid = rec.get("id")
    if isinstance(sid, bool) or not isinstance(sid, str | int) or (isinstance(sid, str) and not sid.strip()):
        raise ValueError("'id' must be a non-empty string or an integer")
    if isinstance(sid, str):
        _check_unicode(sid, "'id'")
    sid = str(sid)
    kinds = [k for k in ("messages", "conversations", "text") if rec.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError("a sample needs exactly one of 'messages', 'conversations' or 'text'")
    kind = kinds[0]
    if kind == "text":
        text = rec["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'text' must be a non-empty string")
        _check_unicode(text, "'text'")
        return Sample(id=sid, text=text)
    turns = rec[kind]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{kind}' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{kind}[{i}] must be an object")
        if kind == "messages":
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        else:
            raw_role, content = turn.get("from"), turn.get("value")
            role = SHAREGPT_ROLES.get(raw_role) if isinstance(raw_role, str) else None
            if role is None:
                raise ValueError(f"conversations[{i}].from {raw_role!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{kind}[{i}] content must be a string")
        _check_unicode(content, f"{kind}[{i}] content")
        if role != "system" and not content.strip():
            raise ValueError(f"{kind}[{i}] ({role}) has empty content")
        if role == "system" and i != 0:
            raise ValueError(f"{kind}[{i}]: a system message may only come first")
        messages.append(Message(role=role, content=content))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError(f"'{kind}' has no assistant turn, so nothing to learn from")
    return Sample(id=sid, messages=tuple(messages))


def _decode_json(raw: bytes) -> Any:
    """One JSONL line, or a ValueError naming why it is not JSON (never another exception)."""
    try:
        return json.loads(raw.decode("utf-8"))  # JSON Lines are UTF-8 (json.loads would guess UTF-16/32)
    except json.JSONDecodeError as e:
        return ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError as e:
        return ValueError(f"invalid JSON (not UTF-8: byte {raw[e.start]:#04x} at offset {e.start})")
    except RecursionError:
        return ValueError("invalid JSON (nested deeper than the parser's recursion limit)")
    except ValueError as e:  # e.g. an integer literal longer than Python converts (4300 digits)
        return ValueError(f"invalid JSON ({str(e).splitlines()[0]})")


def _jsonl_records(path: Path, limits: Limits) -> Iterator[tuple[str, int, Any]]:
    cap = limits.max_sample_bytes
    with path.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(cap + 1) if cap is not None else f.readline()
            if not raw:
                return
            lineno += 1
            if cap is not None and len(raw) > cap and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line without keeping it
                    raw = f.readline(1 << 20)
                    size += len(raw)
                yield f"line {lineno}", size, ValueError(
                    f"{size} bytes, above the limit of {cap} bytes per sample (max_sample_bytes)")
                continue
            if not raw.strip():
                continue
            yield f"line {lineno}", len(raw), _decode_json(raw)


def _value_sizes(arr) -> Any:
    """Decoded bytes of each element of an Arrow array (int64 numpy array), computed without
    materialising the values: a dictionary-encoded string counts its value's length per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(arr)
    t = arr.type
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if pa.types.is_dictionary(t):
        per_value = _value_sizes(arr.dictionary)
        idx = arr.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out = per_value[idx] if len(per_value) else np.zeros(n, dtype=np.int64)
    elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        out = pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_map(t):
        child = _value_sizes(arr.flatten())
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        out = np.bincount(parents, weights=child, minlength=n).astype(np.int64)
    elif pa.types.is_struct(t):
        out = np.zeros(n, dtype=np.int64)
        for f in arr.flatten():
            out += _value_sizes(f)
    else:
        try:
            width = max(1, t.bit_width // 8)
        except ValueError:
            width = max(1, arr.nbytes // n)
        out = np.full(n, width, dtype=np.int64)
    return out


def _parquet_records(path: Path, limits: Limits, batch_rows: int = 256,
                     materialise_bytes: int = 64 << 20) -> Iterator[tuple[str, int, Any]]:
    """Row by row, one row group and then one batch at a time. Before a row group is read, its
    uncompressed page size (from the footer) is checked against `max_decoded_bytes`; string columns that
    the file dictionary-encodes are read as Arrow dictionaries, so a batch's decoded size is known from
    the dictionary before any row is turned into Python objects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unreadable(e: Exception, where: str = "") -> UserError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return UserError(f"{path}: not a readable Parquet file{where} ({first})")

    try:
        meta = pq.ParquetFile(path).metadata
        dict_columns = sorted({
            meta.schema.column(j).path
            for r in range(meta.num_row_groups)
            for j in range(meta.num_columns)
            if meta.row_group(r).column(j).has_dictionary_page
            and meta.schema.column(j).physical_type in ("BYTE_ARRAY", "FIXED_LEN_BYTE_ARRAY")
        })
        pf = pq.ParquetFile(path, read_dictionary=dict_columns or None)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise unreadable(e) from e
    row = 0
    for rg in range(meta.num_row_groups):
        pages = meta.row_group(rg).total_byte_size
        if limits.max_decoded_bytes is not None and pages > limits.max_decoded_bytes:
            raise DecodedTooLarge(
                f"{path}: row group {rg} decompresses to {pages} bytes, above the limit of "
                f"{limits.max_decoded_bytes} decoded bytes (max_decoded_bytes)")
        try:
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=[rg])
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                sizes = _value_sizes(pa.StructArray.from_arrays(batch.columns, names=batch.schema.names))
                cap = limits.max_sample_bytes
                fits = sizes <= cap if cap is not None else sizes >= 0
                if fits.all() and int(sizes.sum()) <= materialise_bytes:
                    records = iter(batch.to_pylist())
                    rows = (next(records) for _ in range(batch.num_rows))
                else:  # large rows: one at a time, and none above the per-sample limit
                    rows = (batch.slice(i, 1).to_pylist()[0] if fits[i] else None for i in range(batch.num_rows))
                for i, rec in enumerate(rows):
                    size = int(sizes[i])
                    if rec is None:
                        rec = ValueError(f"{size} decoded bytes, above the limit of {cap} bytes per sample "
                                         f"(max_sample_bytes)")
                    yield f"row {row}", size, rec
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise unreadable(e, f" at row group {rg}") from e


def iter_records(path: str | Path, limits: Limits | None = None) -> Iterator[tuple[str, int, Any]]:
    """(location, decoded bytes, decoded record or ValueError) for each sample of a JSONL or Parquet file."""
    path = Path(path)
    limits = limits or Limits()
    if not path.is_file():
        raise UserError(f"{path}: dataset file not found")
    if path.suffix.lower() == ".parquet":
        return _parquet_records(path, limits)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return _jsonl_records(path, limits)
    raise UserError(f"{path}: unknown dataset format; use a .jsonl or .parquet file")


def iter_validated(path: str | Path, limits: Limits | None = None) -> Iterator[tuple[int, str, Sample | Problem]]:
    """(record index, location, `Sample` or the `Problem` that makes it invalid) for each record of a file,
    streaming. Duplicate ids are not detected here (see `scan_dataset`). Raises `DecodedTooLarge` once
    the samples decoded so far exceed `limits.max_decoded_bytes`, `UserError` for an unreadable file."""
    limits = limits or Limits()
    total = 0
    for index, (where, size, rec) in enumerate(iter_records(path, limits)):
        total += size
        if limits.max_decoded_bytes is not None and total > limits.max_decoded_bytes:
            raise DecodedTooLarge(f"{path}: samples up to {where} decode to {total} bytes, above the limit of "
                                  f"{limits.max_decoded_bytes} decoded bytes (max_decoded_bytes)")
        if isinstance(rec, ValueError):
            yield index, where, Problem(where, str(rec), index)
            continue
        try:
            yield index, where, parse_record(rec)
        except ValueError as e:
            yield index, where, Problem(where, str(e), index)


def _id_hash(sample_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _duplicate_problems(path: str | Path, limits: Limits, hashes: array) -> list[Problem]:
    """Every repeated id of a file, as a Problem at each repetition. The first pass kept only 8-byte
    hashes of the ids; when two collide this second pass compares the ids themselves."""
    import numpy as np

    h = np.sort(np.frombuffer(hashes, dtype=np.int64)) if len(hashes) else np.zeros(0, dtype=np.int64)
    colliding = set(h[1:][h[1:] == h[:-1]].tolist())
    if not colliding:
        return []
    first: dict[str, str] = {}
    problems = []
    for index, where, item in iter_validated(path, limits):
        if isinstance(item, Sample) and _id_hash(item.id) in colliding:
            if item.id in first:
                problems.append(Problem(where, f"duplicate id {item.id!r} (first at {first[item.id]}); "
                                               f"ids must be unique", index))
            else:
                first[item.id] = where
    return problems


@dataclass
class ScanResult:
    """What `scan_dataset` found: valid samples, invalid (skipped) ones, and the first `MAX_PROBLEMS`
    problems in file order."""

    samples: int
    invalid: int
    problems: list[Problem]


def _rejection(path: str | Path, problems: list[Problem], invalid: int, duplicates: int) -> InvalidDataset:
    shown = "; ".join(str(p) for p in problems[:5])
    n = invalid + duplicates
    more = f" and {n - 5} more" if n > 5 else ""
    if duplicates:
        what = f"{plural(n, 'invalid sample')} ({plural(duplicates, 'duplicate id')}, which cannot be skipped)"
        hint = "fix them; --skip-invalid skips invalid samples but never picks between duplicates"
    else:
        what, hint = plural(invalid, "invalid sample"), "fix them or pass --skip-invalid"
    return InvalidDataset(f"{path}: {what}: {shown}{more} ({hint})", problems, n)


def scan_dataset(path: str | Path, skip_invalid: bool = False, limits: Limits | None = None) -> ScanResult:
    """Validate a dataset file as `load_dataset` does, streaming, in memory that does not grow with the
    samples (8 bytes per id for the duplicate check). Raises `InvalidDataset` (invalid samples without
    `skip_invalid`, or any duplicate id, listed together in file order), `DecodedTooLarge`, `UserError`."""
    limits = limits or Limits()
    hashes = array("q")
    problems: list[Problem] = []
    samples = invalid = 0
    for _, _, item in iter_validated(path, limits):
        if isinstance(item, Problem):
            invalid += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(item)
            continue
        samples += 1
        hashes.append(_id_hash(item.id))
    dups = _duplicate_problems(path, limits, hashes)
    problems = sorted(problems + dups, key=lambda p: p.index)[:MAX_PROBLEMS]
    if dups or (invalid and not skip_invalid):
        raise _rejection(path, problems, invalid, len(dups))
    if not samples:
        raise UserError(f"{path}: no valid samples")
    return ScanResult(samples=samples, invalid=invalid, problems=problems)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_dataset(path: str | Path, skip_invalid: bool = False, limits: Limits | None = None) -> Dataset:
    """Read and validate a dataset file. Any invalid sample rejects the file unless `skip_invalid`; a
    duplicate id always does, reported with every other invalid sample (`InvalidDataset`)."""
    limits = limits or Limits()
    samples: list[Sample] = []
    problems: list[Problem] = []
    hashes = array("q")
    for _, _, item in iter_validated(path, limits):
        if isinstance(item, Problem):
            problems.append(item)
        else:
            samples.append(item)
            hashes.append(_id_hash(item.id))
    dups = _duplicate_problems(path, limits, hashes)
    if dups or (problems and not skip_invalid):
        raise _rejection(path, sorted(problems + dups, key=lambda p: p.index)[:MAX_PROBLEMS], len(problems),
                         len(dups))
    if not samples:
        raise UserError(f"{path}: no valid samples")
    return Dataset(samples=samples, dataset_id=file_digest(path), skipped=problems, source=str(path))
