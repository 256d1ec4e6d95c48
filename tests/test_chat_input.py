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


# ------------------------------------------------------------------------------- pathological input

GOOD = {"id": "ok", "text": "fine"}
PATHOLOGICAL = [
    ("[" * 100_000 + "]" * 100_000, "nested deeper"),
    ('{"id": ' + "9" * 5000 + ', "text": "x"}', "digits"),
    ('{"id": "x", "text": "\\ud800 broken"}', "lone UTF-16 surrogate"),
    ('{"id": "\\udfff", "text": "x"}', "lone UTF-16 surrogate"),
    ('{"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\udc80"}]}',
     "lone UTF-16 surrogate"),
    ('{"id": "x", "text": NaN}', "'text' must be a non-empty string"),
    ('{"id": 1e999, "text": "x"}', "'id'"),
    ('"just a string"', "expected an object"),
    ('{"id": "x", "text": "x"} trailing', "invalid JSON"),
]


@pytest.mark.parametrize("bad, reason", PATHOLOGICAL)
def test_pathological_json_is_one_invalid_line(tmp_path, bad, reason):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, {"id": "ok2", "text": "also fine"}])
    with pytest.raises(UserError) as e:
        load_dataset(path)
    msg = str(e.value)
    assert "1 invalid sample: line 2: " in msg and reason in msg and "\n" not in msg, msg
    ds = load_dataset(path, skip_invalid=True)  # --skip-invalid skips it and keeps the rest
    assert [s.id for s in ds.samples] == ["ok", "ok2"] and [p.where for p in ds.skipped] == ["line 2"]


def test_invalid_utf8_and_overlong_lines(tmp_path):
    from datastore.chat import Limits

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "\xff\xfe"}\n{"id": "c", "text": "'
                     + b"y" * 5000 + b'"}\n{"id": "d", "text": "last"}')
    ds = load_dataset(path, skip_invalid=True, limits=Limits(max_sample_bytes=2048))
    assert [s.id for s in ds.samples] == ["a", "d"]
    assert [str(p) for p in ds.skipped] == [
        "line 2: invalid JSON (not UTF-8: byte 0xff at offset 21)",
        "line 3: 5024 bytes, above the limit of 2048 bytes per sample (max_sample_bytes)",
    ]


def test_duplicate_id_is_reported_with_every_other_invalid_line(tmp_path):
    from datastore.chat import InvalidDataset, scan_dataset

    rows = [{"id": "a", "text": "x"}, "{bad", {"id": "a", "text": "y"}, {"id": "z", "text": ""},
            {"id": "b", "text": "x"}, {"id": "b", "text": "again"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    for skip in (False, True):
        for check in (load_dataset, scan_dataset):
            with pytest.raises(InvalidDataset) as e:
                check(path, skip)
            assert [str(p).split(":")[0] for p in e.value.problems] == ["line 2", "line 3", "line 4", "line 6"]
            msg = str(e.value)
            assert "4 invalid samples (2 duplicate ids" in msg and "\n" not in msg
            assert "line 3: duplicate id 'a' (first at line 1)" in msg and "line 2: invalid JSON" in msg


def test_scan_counts_like_load(tmp_path):
    from datastore.chat import scan_dataset

    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": f"t{i}"} for i in range(50)] + ["{bad"])
    scan = scan_dataset(path, skip_invalid=True)
    assert (scan.samples, scan.invalid, [str(p) for p in scan.problems]) == (50, 1, ["line 51: invalid JSON "
                                                                                     "(Expecting property name "
                                                                                     "enclosed in double quotes at "
                                                                                     "column 2)"])


def test_parquet_with_wrong_types_is_one_invalid_row_each(tmp_path):
    table = pa.table({"id": pa.array([b"raw", b"ok"], pa.binary()), "text": ["a", "b"]})
    pq.write_table(table, tmp_path / "bytes.parquet")
    with pytest.raises(UserError, match="2 invalid sample.*row 0: 'id' must be"):
        load_dataset(tmp_path / "bytes.parquet")
    nested = pa.table({"id": ["a", "b"], "messages": pa.array([[{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "r"}],
                                                                [{"role": "user", "content": "\ud7ff ok"}]])})
    pq.write_table(nested, tmp_path / "nested.parquet")
    ds = load_dataset(tmp_path / "nested.parquet", skip_invalid=True)
    assert [s.id for s in ds.samples] == ["a"] and str(ds.skipped[0]) == ("row 1: 'messages' has no assistant turn, "
                                                                           "so nothing to learn from")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "nested.parquet").read_bytes()[:-30])
    with pytest.raises(UserError, match="not a readable Parquet file"):
        load_dataset(tmp_path / "cut.parquet")


def _bomb(path, rows: int = 1500, text_bytes: int = 1_000_000):
    """The issue's decompression bomb: `rows` rows repeating one `text_bytes` text, dictionary + zstd."""
    text = "all work and no play makes a dull teacher. " * (text_bytes // 43 + 1)
    repeated = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), [text[:text_bytes]])  # no 1.5 GB here
    table = pa.table({"id": [f"s{i}" for i in range(rows)], "text": repeated})
    pq.write_table(table, path, compression="zstd", use_dictionary=True, dictionary_pagesize_limit=4 << 20)
    return path


def test_parquet_bomb_is_refused_past_the_decoded_limit(tmp_path):
    from datastore.chat import DecodedTooLarge, Limits, scan_dataset

    bomb = _bomb(tmp_path / "bomb.parquet")
    assert bomb.stat().st_size < 64_000  # ~1.5 GB of text
    with pytest.raises(DecodedTooLarge) as e:
        scan_dataset(bomb, limits=Limits(max_decoded_bytes=50_000_000))
    assert "above the limit of 50000000 decoded bytes (max_decoded_bytes)" in str(e.value)
    assert "up to row 49 " in str(e.value)  # refused as soon as the running total passed the limit
    with pytest.raises(UserError, match="row 0: 1000002 decoded bytes, above the limit of 65536 bytes per sample"):
        scan_dataset(bomb, limits=Limits(max_sample_bytes=65536))


def test_parquet_bomb_scans_in_bounded_memory(tmp_path):
    """1.5 GB of decoded text, validated within a few batches' worth of memory (in a fresh process, so
    its peak RSS is the scan's own)."""
    import subprocess
    import sys

    bomb = _bomb(tmp_path / "bomb.parquet")
    code = ("import resource, sys\n"
            "from datastore.chat import Limits, scan_dataset\n"
            "import pyarrow.parquet\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "r = scan_dataset(sys.argv[1], limits=Limits(max_decoded_bytes=10**10))\n"
            "print(r.samples, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    samples, grown_mb = map(int, out.stdout.split())
    assert samples == 1500
    assert grown_mb < 200, f"scanning the bomb grew the process by {grown_mb} MB"
