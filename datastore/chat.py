"""Input datasets: chat (`messages` or ShareGPT `conversations`) and plain-text samples, from JSONL
or Parquet, validated once at the edge so that every later stage can trust them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

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

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Dataset:
    samples: list[Sample]
    dataset_id: str
    skipped: list[Problem] = field(default_factory=list)
    source: str = ""


def parse_record(rec: Any) -> Sample:
    """Validate one decoded record; raise ValueError with the reason if it is not a valid sample."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object with 'id' and 'messages', 'conversations' or 'text', got {type(rec).__name__}")
    sid = rec.get("id")
    if isinstance(sid, bool) or not isinstance(sid, str | int) or (isinstance(sid, str) and not sid.strip()):
        raise ValueError("'id' must be a non-empty string or an integer")
    sid = str(sid)
    kinds = [k for k in ("messages", "conversations", "text") if rec.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError("a sample needs exactly one of 'messages', 'conversations' or 'text'")
    kind = kinds[0]
    if kind == "text":
        text = rec["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'text' must be a non-empty string")
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
        if role != "system" and not content.strip():
            raise ValueError(f"{kind}[{i}] ({role}) has empty content")
        if role == "system" and i != 0:
            raise ValueError(f"{kind}[{i}]: a system message may only come first")
        messages.append(Message(role=role, content=content))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError(f"'{kind}' has no assistant turn, so nothing to learn from")
    return Sample(id=sid, messages=tuple(messages))


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield f"line {lineno}", ValueError(f"invalid JSON ({e.msg if hasattr(e, 'msg') else e})")


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from e
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"row {row}", rec
            row += 1


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, decoded record or ValueError) for each sample of a JSONL or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: dataset file not found")
    if path.suffix.lower() == ".parquet":
        return _parquet_records(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return _jsonl_records(path)
    raise UserError(f"{path}: unknown dataset format; use a .jsonl or .parquet file")


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def validate(records: Iterable[tuple[str, Any]]) -> tuple[list[Sample], list[Problem]]:
    samples: list[Sample] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for where, rec in records:
        try:
            if isinstance(rec, ValueError):
                raise rec
            sample = parse_record(rec)
        except ValueError as e:
            problems.append(Problem(where, str(e)))
            continue
        if sample.id in seen:
            # A duplicate id is never skippable: which of the two is meant cannot be guessed.
            raise UserError(f"{where}: duplicate id {sample.id!r} (first at {seen[sample.id]}); ids must be unique")
        seen[sample.id] = where
        samples.append(sample)
    return samples, problems


def load_dataset(path: str | Path, skip_invalid: bool = False) -> Dataset:
    """Read and validate a dataset file. Any invalid sample rejects the file unless `skip_invalid`."""
    samples, problems = validate(iter_records(path))
    if problems and not skip_invalid:
        shown = "; ".join(str(p) for p in problems[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UserError(
            f"{path}: {len(problems)} invalid sample(s): {shown}{more} (fix them or pass --skip-invalid)"
        )
    if not samples:
        raise UserError(f"{path}: no valid samples")
    return Dataset(samples=samples, dataset_id=file_digest(path), skipped=problems, source=str(path))
