"""Many writers on one dataset: range claims under expiring leases, takeover of dead holders' ranges,
exactly-once commits fenced by Delta application transactions, and real `logitfuse extract` processes
(4 at once, 2 of them kill -9'd; two runs with different --shard-rows) on a local store and on moto S3."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from clients.cli import app
from datastore import LogitsReader, LogitsWriter, logits_id, logits_uri
from datastore.leases import LeaseManager
from tests.test_datastore import meta, sample


def _ids(n: int) -> list[str]:
    return [f"sample-{i:03d}" for i in range(n)]


def test_claims_lease_takeover_and_fenced_commit(tmp_path):
    uri = logits_uri(str(tmp_path / "store"), logits_id(meta()))
    a = LogitsWriter(uri, meta(), shard_rows=4, lease_seconds=30)
    b = LogitsWriter(uri, meta(), shard_rows=3, lease_seconds=30)  # other shard size: same ranges
    assert a.range_rows == b.range_rows == 4
    ids = _ids(8)

    claims_a = a.claims(ids)
    first = next(claims_a)  # a holds range 0 (a live holder)
    assert first.sample_ids == ids[:4]
    claims_b = b.claims(ids, poll_seconds=0.01)
    second = next(claims_b)  # b skips the held range and takes range 1
    assert second.sample_ids == ids[4:]
    assert second.commit([sample(i) for i in range(4, 8)])

    # a stalls past its lease: b takes range 0 over and commits it; a's late commit is refused
    manager = LeaseManager(a._fs, a._root, a.holder, 30)
    path = manager._path(first.range_key, first.lease.generation)
    with open(path, "w") as f:  # a's lease as it reads once a missed its renewals: expired
        json.dump({"range": first.range_key, "generation": first.lease.generation, "holder": a.holder,
                   "expires": time.time() - 1}, f)
    third = next(claims_b)
    assert third.range_key == first.range_key and third.lease.generation == first.lease.generation + 1
    assert third.commit([sample(i) for i in range(4)])
    assert not first.commit([sample(i) for i in range(4)])  # fenced: the range is b's
    with pytest.raises(StopIteration):
        next(claims_b)
    with pytest.raises(StopIteration):
        next(claims_a)

    r = LogitsReader(uri)
    assert sorted(s.sample_id for s in r.iter_samples()) == ids  # every sample exactly once
    assert len(r.manifest.shards) == 2 and r.manifest.range_rows == 4
    history = manager.history(first.range_key)
    assert [h["holder"] for h in history] == [a.holder, b.holder]


def test_a_claim_commits_only_its_own_samples_and_may_leave_some_out(tmp_path):
    uri = logits_uri(str(tmp_path / "store"), logits_id(meta()))
    w = LogitsWriter(uri, meta(), shard_rows=4)
    given_up: set[str] = set()
    claims = w.claims(_ids(4), exclude=given_up)
    claim = next(claims)
    with pytest.raises(ValueError, match="does not hold"):
        claim.commit([sample(0), sample(9)])
    with pytest.raises(ValueError, match="does not hold"):
        claim.commit([sample(0), sample(0)])
    given_up.add("sample-002")  # e.g. scored non-finite: not stored, not claimed again by this writer
    assert claim.commit([sample(0), sample(1), sample(3)])
    with pytest.raises(StopIteration):
        next(claims)
    assert sorted(LogitsWriter(uri, meta()).done_ids) == ["sample-000", "sample-001", "sample-003"]
    rerun = next(LogitsWriter(uri, meta()).claims(_ids(4)))  # a later run claims what is missing
    assert rerun.sample_ids == ["sample-002"] and rerun.commit([sample(2)])
    assert len(LogitsReader(uri)) == 4


# ------------------------------------------------------------------------ real processes

K = 4
SCORED = re.compile(r"(\d+) samples? scored, (\d+) already stored")


def _extract_args(teacher, data, store, shard_rows: int) -> list[str]:
    return [sys.executable, "-m", "clients.cli", "extract", "--teacher", str(teacher), "--dataset", str(data),
            "--store", str(store), "--k", str(K), "--shard-rows", str(shard_rows), "--batch-tokens", "512",
            "--device", "cpu"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _dataset_uri(store: str) -> str | None:
    from datastore.catalog import catalog

    entries = catalog(store, kind="logits", missing_ok=True)
    return entries[0]["uri"] if entries else None


def _committed_ranges(store: str, table: list) -> tuple[str | None, int]:
    """(the dataset's uri or None, how many shards it has committed so far); `table` keeps the dataset's
    `DeltaDataset` between calls, so a poll reads only the log entries added since the last one."""
    from datastore.table import DeltaDataset

    if not table:
        uri = _dataset_uri(store)
        if uri is None:
            return None, 0
        table.append(DeltaDataset(uri))
    try:
        return table[0].uri, len(table[0].snapshot().shards)
    except Exception:  # noqa: BLE001 - the table is being created
        return table[0].uri, 0


def _readable(table: list) -> bool:
    """Whether the dataset held in `table` (see `_committed_ranges`) has its first commit."""
    try:
        table[0].snapshot()
    except Exception:  # noqa: BLE001 - not created yet
        return False
    return True


def _kill_mid_run(store: str, procs, victims, rng: random.Random, ranges: int, timeout: float = 900) -> str:
    """`kill -9` each victim at a random moment while the dataset is still being filled: once a random
    number of ranges (1 to half of them) is committed, after a further random fraction of a second (mid
    batch, mid commit, between ranges). No writer exits before every range is committed, so each victim is
    still running when it is killed (asserted). Returns the dataset's uri."""
    targets = sorted(rng.randint(1, ranges // 2) for _ in victims)
    deadline = time.monotonic() + timeout
    uri, table = None, []
    for victim, target in zip(victims, targets, strict=True):
        while True:
            uri, done = _committed_ranges(store, table)
            if done >= target:
                break
            if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
                pytest.fail(f"the writers did not commit {target} ranges in time")
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 0.3))
        assert victim.poll() is None, "a writer exited before the dataset was complete"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    return uri


def _spawn(args: list[str], env: dict, log) -> subprocess.Popen:
    """A writer process; stderr (progress bars) goes to a file so that no pipe fills up and blocks it."""
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=log, text=True)


def _finish(proc, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (proc.args, out)
    return out


def _check_exactly_once(uri: str, records: list[dict], outputs: list[str]) -> None:
    reader = LogitsReader(uri)
    ids = [s.sample_id for s in reader.iter_samples()]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every sample, exactly once
    assert reader.manifest.complete
    for out in outputs:  # a live writer never scored what another one committed
        assert "committed first by another writer" not in out, out
    verify = CliRunner().invoke(app, ["store", "verify", uri])  # in this process: no interpreter start-up
    assert verify.exit_code == 0, verify.output


def _four_writers_two_killed(tmp_path, teacher, store: str, seed: int) -> None:
    from clients.corpus import chat_samples, write_jsonl

    records = chat_samples(32, seed=seed, max_turns=2)  # 8 ranges of 4 for 4 writers
    data = write_jsonl(records, tmp_path / "chats.jsonl")
    rng = random.Random()
    env = _env(LOGITFUSE_LEASE_SECONDS="20")
    log = open(tmp_path / "writers.log", "w")
    procs = [_spawn(_extract_args(teacher, data, store, 4), env, log) for _ in range(4)]
    try:
        victims = rng.sample(procs, 2)
        uri = _kill_mid_run(store, procs, victims, rng, ranges=len(records) // 4)
        outputs = [_finish(p) for p in procs if p not in victims]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    again = subprocess.run(_extract_args(teacher, data, store, 4), capture_output=True, text=True, env=env,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    m = SCORED.search(again.stdout)
    assert m and int(m.group(1)) == 0 and int(m.group(2)) == len(records), again.stdout
    _check_exactly_once(uri, records, outputs + [again.stdout])


@pytest.mark.slow
def test_four_extracts_two_killed_local(tmp_path, teacher_dir):
    _four_writers_two_killed(tmp_path, teacher_dir, str(tmp_path / "store"), seed=11)


@pytest.mark.slow
def test_four_extracts_two_killed_s3(tmp_path, teacher_dir, s3_store):
    _four_writers_two_killed(tmp_path, teacher_dir, s3_store + "/four-writers", seed=12)


@pytest.mark.slow
def test_two_writers_with_different_shard_rows_agree(tmp_path, teacher_dir):
    """The issue's failure: `--shard-rows 8` and, once it has created the dataset, `--shard-rows 5` on one
    dataset used to corrupt it (29 of 59 shards failing their checksum, 145 of 300 samples missing). The
    second writer starts only once the dataset exists: under load a fixed two-second head start was not
    enough, the second writer created it first and the table's `range_rows` was 5."""
    from clients.corpus import chat_samples, write_jsonl

    records = chat_samples(60, seed=5, max_turns=2)
    data = write_jsonl(records, tmp_path / "chats.jsonl")
    store = str(tmp_path / "store")
    log = open(tmp_path / "writers.log", "w")
    first = _spawn(_extract_args(teacher_dir, data, store, 8), _env(), log)
    deadline, table = time.monotonic() + 300, []
    while _committed_ranges(store, table)[0] is None or not _readable(table):  # the first writer created it
        assert first.poll() is None and time.monotonic() < deadline, "the first writer never created the dataset"
        time.sleep(0.1)
    second = _spawn(_extract_args(teacher_dir, data, store, 5), _env(), log)
    outputs = [_finish(first), _finish(second)]
    uri = _dataset_uri(store)
    _check_exactly_once(uri, records, outputs)
    m = LogitsReader(uri).manifest
    assert m.range_rows == 8 and all(s.rows <= 8 for s in m.shards)
    scored = [int(SCORED.search(o).group(1)) for o in outputs]
    assert sum(scored) == len(records)  # no sample scored twice
