"""Dataset input: chat, ShareGPT and plain-text samples from JSONL and Parquet, with validation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datastore.chat import load_dataset
from datastore.errors import UserError


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reads_messages_sharegpt_and_text(tmp_path):
    rows = [
        {"id": "a", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "r"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"},
                                    {"from": "human", "value": "q2"}, {"from": "gpt", "value": "r2"}]},
        {"id": "t", "text": "plain prose"},
    ]
    ds = load_dataset(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert [s.id for s in ds.samples] == ["a", "7", "t"]
    assert [m.role for m in ds.samples[1].messages] == ["user", "assistant", "user", "assistant"]
    assert ds.samples[1].messages[3].content == "r2"
    assert ds.samples[2].text == "plain prose" and not ds.samples[2].is_chat
    assert len(ds.dataset_id) == 16


def test_parquet_matches_jsonl(tmp_path):
    rows = [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = load_dataset(tmp_path / "d.parquet")
    assert [(s.id, s.text) for s in ds.samples] == [("a", "one"), ("b", "two")]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"id": "x", "messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
        ('{"id": "x", "messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}', "'id'"),
        ('{"id": "x", "text": ""}', "'text' must be a non-empty string"),
        ('{"id": "x", "text": "a", "messages": []}', "exactly one of"),
        ("{not json", "invalid JSON"),
        ('{"id": "x", "conversations": [{"from": "robot", "value": "v"}]}', "from 'robot'"),
    ],
)
def test_invalid_sample_is_reported_with_line_and_reason(tmp_path, bad, reason):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": "ok", "text": "fine"}, bad])
    with pytest.raises(UserError) as e:
        load_dataset(path)
    msg = str(e.value)
    assert "line 2" in msg and reason in msg and "--skip-invalid" in msg
    assert "\n" not in msg


def test_skip_invalid_keeps_the_good_ones_and_counts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": "ok", "text": "fine"}, "{bad", {"id": "z", "text": ""}])
    ds = load_dataset(path, skip_invalid=True)
    assert [s.id for s in ds.samples] == ["ok"]
    assert [p.where for p in ds.skipped] == ["line 2", "line 3"]


def test_duplicate_ids_are_an_error_even_when_skipping(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(UserError, match="duplicate id 'a'"):
        load_dataset(path, skip_invalid=True)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "d.csv").write_text("id,text\n")
    with pytest.raises(UserError, match="unknown dataset format"):
        load_dataset(tmp_path / "d.csv")
    with pytest.raises(UserError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")
