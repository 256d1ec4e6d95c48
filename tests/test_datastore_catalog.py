"""The store catalog (`logitfuse store ls`, `datastore.catalog`, ``GET /v1/logits``), store-wide verify,
corrupt logs and manifests as one line, 0.1 datasets (read as they are, `store migrate`), rm and gc."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from clients.cli import app
from datastore import LogitsReader, LogitsWriter, codec, logits_id, logits_uri
from datastore.catalog import catalog, find
from datastore.fs import save_tokenizer
from datastore.manifest import Manifest, ShardInfo, id_bloom
from datastore.retention import gc_dataset
from datastore.targets import TargetsReader, TargetsWriter, targets_id, targets_uri
from tests.test_datastore import check, meta, sample
from tests.test_targets import meta as tmeta
from tests.test_targets import sample as tsample

runner = CliRunner()


def _one_line_exit_2(result, *words: str) -> None:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0], result.output


@pytest.fixture
def store(tmp_path, spm_tokenizer) -> str:
    """Two logits datasets (two teachers), one with its tokenizer, and one targets dataset."""
    root = str(tmp_path / "store")
    uri = logits_uri(root, logits_id(meta()))
    with LogitsWriter(uri, meta(), shard_rows=3, team="research") as w:
        for i in range(7):
            w.write(sample(i))
    save_tokenizer(uri, spm_tokenizer)
    other = meta(teacher_name="tiny-qwen", dataset_id="ds-2")
    with LogitsWriter(logits_uri(root, logits_id(other)), other, shard_rows=4) as w:
        for i in range(5):
            w.write(sample(i))
    with TargetsWriter(targets_uri(root, targets_id(tmeta())), tmeta(), shard_rows=4) as w:
        for i in range(6):
            w.write(tsample(i))
    return root


def test_catalog_lists_logits_and_targets_with_their_facts(store):
    entries = {e["id"]: e for e in catalog(store)}
    assert len(entries) == 3
    e = entries[logits_id(meta())]
    assert e["kind"] == "logits" and e["status"] == "ok" and e["teacher"] == "tiny-llama"
    assert (e["revision"], e["tokenizer"], e["k"], e["template"], e["dataset"]) == ("r1", "sp32k", 6, "model", "ds-1")
    assert e["samples"] == 7 and e["team"] == "research" and e["complete"] and e["version"] >= 3
    assert e["bytes_per_entry"] == pytest.approx(e["bytes"] / (e["positions"] * 6), rel=1e-3)
    t = entries[targets_id(tmeta())]
    assert t["kind"] == "targets" and t["samples"] == 6 and t["teacher"] == "tiny-llama"

    assert [e["teacher"] for e in catalog(store, teacher="qwen")] == ["tiny-qwen"]
    assert [e["dataset"] for e in catalog(store, dataset="ds-1")] == ["ds-1"]
    assert [e["kind"] for e in catalog(store, kind="targets")] == ["targets"]

    res = runner.invoke(app, ["store", "ls", store])
    assert res.exit_code == 0, res.output
    header, *rows = res.output.strip().splitlines()
    for column in ("teacher", "revision", "tokenizer", "k", "template", "dataset", "samples", "bytes", "B/entry",
                   "version", "team", "updated"):
        assert column in header.split()
    assert len(rows) == 3 and any(r.startswith("targets") for r in rows)
    res = runner.invoke(app, ["store", "ls", store, "--teacher", "qwen"])
    assert res.exit_code == 0 and len(res.output.strip().splitlines()) == 2 and "tiny-qwen" in res.output

    # targets whose pivot's logits are in the store are listed and found under the pivot's teacher name
    qwen = logits_id(meta(teacher_name="tiny-qwen", dataset_id="ds-2"))
    fused = tmeta(pivot=qwen, sources=[logits_id(meta())])
    with TargetsWriter(targets_uri(store, targets_id(fused)), fused, shard_rows=4) as w:
        w.write(tsample(0))
    found = catalog(store, teacher="qwen", kind="targets")
    assert [(e["id"], e["teacher"], e["pivot"]) for e in found] == [(targets_id(fused), "tiny-qwen", qwen)]
    assert [e["id"] for e in catalog(store, teacher=qwen[:6], kind="targets")] == [targets_id(fused)]
    one = find(store, targets_id(fused), "targets")  # one entry by id: the same names as the listing
    assert (one["teacher"], one["pivot"]) == ("tiny-qwen", qwen)
    # what made each targets dataset is in its row: fusion, alignment, vocabulary map, sources' teachers
    assert one["source_teachers"] == ["tiny-llama"] and one["dataset"] == tmeta().extra.get("dataset_id", "")
    res = runner.invoke(app, ["store", "ls", store, "--kind", "targets"])
    assert res.exit_code == 0, res.output
    row = [r for r in res.output.splitlines() if targets_id(fused) in r][0]
    assert row.endswith(f"{fused.fusion} {fused.align} {fused.vocab_map}: tiny-llama"), row


def test_broken_datasets_are_one_line_and_wrong_paths_exit_2(store, tmp_path):
    # a truncated 0.1 manifest and a Delta log with a garbage commit, next to healthy datasets
    legacy = os.path.join(store, "logits", "0123456789abcdef")
    os.makedirs(legacy)
    open(os.path.join(legacy, "manifest.json"), "w").write('{"format": "logitfuse.logits/1", "shar')
    damaged = os.path.join(store, "logits", logits_id(meta(teacher_name="tiny-qwen", dataset_id="ds-2")))
    log = os.path.join(damaged, "_delta_log")
    newest = sorted(n for n in os.listdir(log) if n.endswith(".json"))[-1]
    open(os.path.join(log, newest), "w").write("{not json")

    res = runner.invoke(app, ["store", "ls", store])
    assert res.exit_code == 0, res.output
    broken = [ln for ln in res.output.splitlines() if ln.startswith("BROKEN")]
    assert len(broken) == 2 and any("corrupt manifest.json" in ln for ln in broken), res.output
    assert logits_id(meta()) in res.output  # the healthy ones are still listed

    _one_line_exit_2(runner.invoke(app, ["store", "ls", str(tmp_path / "nope")]), "no store at")
    _one_line_exit_2(runner.invoke(app, ["store", "ls", logits_uri(store, logits_id(meta()))]), "not a store")
    _one_line_exit_2(runner.invoke(app, ["store", "verify", legacy]), "corrupt manifest.json")
    _one_line_exit_2(runner.invoke(app, ["store", "show", damaged]), "Delta log")
    afile = tmp_path / "afile"  # a file where a dataset or store is expected: one line, not an OSError
    afile.write_text("x")
    for command in ("gc", "verify", "rm", "show", "migrate"):
        _one_line_exit_2(runner.invoke(app, ["store", command, str(afile)]), f"{afile}: a file, not a dataset directory")
    (tmp_path / "model").mkdir()
    _one_line_exit_2(runner.invoke(app, ["train", "--targets", str(afile), "--model", str(tmp_path / "model"),
                                         "--out", str(tmp_path / "run")]), "a file, not a dataset directory")
    assert afile.read_text() == "x" and not (tmp_path / "run").exists()
    res = runner.invoke(app, ["store", "verify", store])  # the store: every dataset, broken ones FAIL
    assert res.exit_code == 1 and res.output.count("FAIL") == 2 and res.output.count("OK ") == 2, res.output


def test_store_verify_checks_every_dataset_and_tokenizer_files(store):
    res = runner.invoke(app, ["store", "verify", store])
    assert res.exit_code == 0 and "3 datasets verified" in res.output, res.output
    uri = logits_uri(store, logits_id(meta()))
    tok = os.path.join(uri, "tokenizer", "tokenizer.json")
    open(tok, "ab").write(b" ")
    res = runner.invoke(app, ["store", "verify", store])
    assert res.exit_code == 1 and "tokenizer/tokenizer.json: sha256 mismatch" in res.output
    with pytest.raises(Exception, match="sha256 mismatch"):
        LogitsReader(uri).tokenizer()


def test_interrupted_tokenizer_copy_is_written_again(tmp_path, spm_tokenizer, monkeypatch):
    uri = logits_uri(str(tmp_path / "store"), logits_id(meta()))
    with LogitsWriter(uri, meta()) as w:
        w.write(sample(0))
    import datastore.fs as dfs

    real, calls = dfs.write_atomic, []

    def disk_full(filesystem, path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(filesystem, path, data)

    monkeypatch.setattr(dfs, "write_atomic", disk_full)
    with pytest.raises(OSError):
        save_tokenizer(uri, spm_tokenizer)
    monkeypatch.undo()
    res = runner.invoke(app, ["store", "verify", uri])
    assert res.exit_code == 1 and "interrupted copy" in res.output
    save_tokenizer(uri, spm_tokenizer)  # the rerun writes it again
    assert LogitsReader(uri).tokenizer().encode("hello world") == spm_tokenizer.encode("hello world")
    assert runner.invoke(app, ["store", "verify", uri]).exit_code == 0


def _write_0_1_dataset(uri: str, samples) -> None:
    """A dataset exactly as logitfuse 0.1 wrote it: shard-NNNNNN.parquet + manifest.json."""
    os.makedirs(uri)
    shards = []
    for n, start in enumerate(range(0, len(samples), 3)):
        part = samples[start : start + 3]
        data = codec.encode_shard(part, meta().k)
        name = f"shard-{n:06d}.parquet"
        open(os.path.join(uri, name), "wb").write(data)
        shards.append(ShardInfo(file=name, rows=len(part), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                positions=sum(len(s.positions) for s in part),
                                tokens=sum(len(s.input_ids) for s in part), topk_bytes=codec.topk_bytes(data),
                                id_bloom=id_bloom([s.sample_id for s in part])))
    m = Manifest(logits_id=logits_id(meta()), meta=meta(), encoding=codec.CodecConfig().describe(), shards=shards,
                 complete=True)
    open(os.path.join(uri, "manifest.json"), "wb").write(m.to_json())


def test_0_1_datasets_stay_readable_and_migrate(tmp_path):
    from datastore import UserError

    store = str(tmp_path / "store")
    uri = logits_uri(store, logits_id(meta()))
    samples = [sample(i) for i in range(7)]
    _write_0_1_dataset(uri, samples)
    r = LogitsReader(uri)
    assert r.manifest.table == "manifest-0.1" and len(r) == 7
    check(samples[4], r.get(samples[4].sample_id))
    with pytest.raises(UserError, match="store migrate"):
        LogitsWriter(uri, meta())
    res = runner.invoke(app, ["store", "migrate", store])
    assert res.exit_code == 0 and "migrated 3 shards (7 samples)" in res.output, res.output
    r = LogitsReader(uri)
    assert r.manifest.table == "delta" and r.manifest.complete and len(r) == 7
    for a, b in zip(samples, r.iter_samples(), strict=True):
        check(a, b)
    assert runner.invoke(app, ["store", "verify", uri]).exit_code == 0
    with LogitsWriter(uri, meta()) as w:  # writable now
        w.write(sample(9))
    assert len(LogitsReader(uri)) == 8


def test_rm_and_gc(store, tmp_path):
    uri = logits_uri(store, logits_id(meta()))
    orphan = os.path.join(uri, "shard-" + "0" * 64 + ".parquet")
    shutil.copy(os.path.join(uri, LogitsReader(uri).manifest.shards[0].file), orphan)
    # --older-than must be a finite age >= 0: nan would pass every age test and skip the grace period
    for bad in ("nan", "inf", "-1", "2x"):
        _one_line_exit_2(runner.invoke(app, ["store", "gc", store, "--older-than", bad]), f"--older-than '{bad}'")
    assert os.path.exists(orphan)
    # a stray folder under logits/ is one FAIL line; gc and migrate still do the other datasets, then exit 1
    stray = os.path.join(store, "logits", "emptydir")
    os.makedirs(stray)
    res = runner.invoke(app, ["store", "gc", store, "--older-than", "0"])
    assert res.exit_code == 1 and os.path.basename(orphan) in res.output, res.output
    assert f"FAIL {stray}: " in res.output and "1 of 4 datasets in" in res.output
    res = runner.invoke(app, ["store", "migrate", store])
    assert res.exit_code == 1 and f"FAIL {stray}: " in res.output, res.output
    os.rmdir(stray)
    (tmp_path / "plain").mkdir()  # neither a dataset nor a store: nothing to collect, exit 2
    _one_line_exit_2(runner.invoke(app, ["store", "gc", str(tmp_path / "plain")]), "nothing to collect")
    assert not os.path.exists(orphan) and len(LogitsReader(uri)) == 7
    assert gc_dataset(uri, older_than_s=0) == []
    _one_line_exit_2(runner.invoke(app, ["store", "rm", store]), "not a dataset")
    res = runner.invoke(app, ["store", "rm", uri])
    assert res.exit_code == 0 and not os.path.exists(uri)
    assert len(catalog(store)) == 2


def test_a_broken_dataset_can_be_removed_and_verify_needs_a_dataset_or_store(store, tmp_path):
    uri = logits_uri(store, logits_id(meta()))
    log = os.path.join(uri, "_delta_log")
    newest = sorted(n for n in os.listdir(log) if n.endswith(".json"))[-1]
    open(os.path.join(log, newest), "w").write("{garbage")
    res = runner.invoke(app, ["store", "rm", uri])  # its log is unreadable: still removable from the store
    assert res.exit_code == 0 and "removed broken logits dataset" in res.output and not os.path.exists(uri)
    # outside a store's logits/ or targets/ a broken dataset is not removed
    elsewhere = tmp_path / "loose"
    shutil.copytree(logits_uri(store, logits_id(meta(teacher_name="tiny-qwen", dataset_id="ds-2"))), elsewhere)
    newest = sorted(n for n in os.listdir(elsewhere / "_delta_log") if n.endswith(".json"))[-1]
    (elsewhere / "_delta_log" / newest).write_text("{garbage")
    _one_line_exit_2(runner.invoke(app, ["store", "rm", str(elsewhere)]), "not removed")
    assert elsewhere.exists()
    # a dataset whose _delta_log/ is empty (its first commit lost) is broken, not "not a dataset"
    emptied = logits_uri(store, logits_id(meta(teacher_name="tiny-qwen", dataset_id="ds-2")))
    for name in os.listdir(os.path.join(emptied, "_delta_log")):
        os.remove(os.path.join(emptied, "_delta_log", name))
    _one_line_exit_2(runner.invoke(app, ["store", "verify", emptied]), "holds no readable first commit")
    res = runner.invoke(app, ["store", "rm", emptied])
    assert res.exit_code == 0 and "removed broken logits dataset" in res.output and not os.path.exists(emptied)
    # a directory that is neither a dataset nor a store is not "OK: 0 datasets verified"
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", elsewhere / "_delta_log"):
        _one_line_exit_2(runner.invoke(app, ["store", "verify", str(path)]), "neither a dataset", "nor a store")


def test_a_missing_or_corrupt_shard_is_one_line_naming_it(store, tmp_path):
    """Every reader of shards (decode, the id index fusion builds, the trainer's length scan, export) says
    which shard is missing or damaged and points to `store verify`, instead of a pyarrow traceback."""
    from datastore.shards import read_columns
    from datastore.table import CorruptShard
    from fusion.pipeline import _sample_index
    from trainer.data import estimate_rows_per_epoch

    logits = logits_uri(store, logits_id(meta()))
    shards = LogitsReader(logits).manifest.shards
    first, second = (os.path.join(logits, s.file) for s in shards[:2])
    data = open(second, "rb").read()
    open(second, "wb").write(data[:40])  # truncated
    with pytest.raises(CorruptShard, match="not readable Parquet.*store verify"):
        _sample_index(LogitsReader(logits))
    with pytest.raises(CorruptShard, match="sha256 does not match"):
        LogitsReader(logits).read_shard(shards[1])
    os.remove(first)
    with pytest.raises(CorruptShard, match="missing.*store verify"):
        read_columns(LogitsReader(logits)._fs, LogitsReader(logits)._root, shards[0], ["sample_id"])
    res = runner.invoke(app, ["store", "export", logits, "--format", "parquet", "--out", str(tmp_path / "x")])
    _one_line_exit_2(res, os.path.basename(first), "missing", "store verify")
    assert not (tmp_path / "x").exists()

    targets = targets_uri(store, targets_id(tmeta()))
    tshard = os.path.join(targets, TargetsReader(targets).manifest.shards[0].file)
    os.remove(tshard)
    with pytest.raises(CorruptShard, match="missing"):
        estimate_rows_per_epoch(targets, 64)
    res = runner.invoke(app, ["store", "verify", targets])  # verify lists it, without the hint to itself
    assert res.exit_code == 1 and "missing" in res.output and "store verify" not in res.output, res.output


def test_service_serves_the_catalog_and_samples(store, tmp_path):
    from fastapi.testclient import TestClient

    from teacher_server.app import create_app
    from teacher_server.config import ServiceConfig

    token = "read-token-123"
    cfg = ServiceConfig.model_validate({
        "store": store, "state_dir": str(tmp_path / "state"),
        "teachers": [{"name": "tiny", "model": str(tmp_path), "backend": "hf"}],
        "tokens": [{"team": "viewers", "sha256": hashlib.sha256(token.encode()).hexdigest(), "scope": "read"}],
    })
    with TestClient(create_app(cfg, start_workers=False)) as client:
        assert client.get("/v1/logits").status_code == 401
        h = {"Authorization": f"Bearer {token}"}
        listing = client.get("/v1/logits", headers=h).json()
        assert {e["id"] for e in listing} == {e["id"] for e in catalog(store)}
        assert [e["teacher"] for e in client.get("/v1/logits?teacher=qwen", headers=h).json()] == ["tiny-qwen"]
        lid = logits_id(meta())
        one = client.get(f"/v1/logits/{lid}", headers=h).json()
        assert one["samples"] == 7 and len(one["shards_list"]) == 3
        assert client.get("/v1/logits/ffffffffffffffff", headers=h).status_code == 404
        lines = client.get(f"/v1/logits/{lid}/samples", headers=h).text.strip().splitlines()
        got = [json.loads(line) for line in lines]
        assert [g["id"] for g in got] == [f"sample-{i:03d}" for i in range(7)]
        want = sample(3)
        s3 = client.get(f"/v1/logits/{lid}/samples/sample-003", headers=h).json()
        assert s3["topk_ids"] == want.topk_ids.tolist() and s3 == got[3]
        assert max(abs(a - b) for ra, rb in zip(s3["topk_logprobs"], want.topk_logprobs.tolist(), strict=True)
                   for a, b in zip(ra, rb, strict=True)) <= 5 / 256 + 1e-6
        assert client.get(f"/v1/logits/{lid}/samples/nope", headers=h).status_code == 404
        # a damaged shard is the store's fault, not the request's: 500 naming the shard, not 400
        uri = logits_uri(store, lid)
        shard = LogitsReader(uri).manifest.shards[1]  # holds sample-003 (3 rows per shard)
        path = os.path.join(uri, shard.file)
        data = bytearray(open(path, "rb").read())
        data[100] ^= 0xFF
        open(path, "wb").write(bytes(data))
        r = client.get(f"/v1/logits/{lid}/samples/sample-003", headers=h)
        assert r.status_code == 500 and shard.file in r.json()["error"] and "sha256" in r.json()["error"], r.text
