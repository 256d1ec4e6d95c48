"""`extract --teacher/--dataset` with hub ids resolved from the local HF cache (offline), and their errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from datastore import LogitsReader, UserError
from datastore.hub import resolve_dataset_file, resolve_local_or_cached
from tests.test_extract import dataset  # noqa: F401  (module fixture: a chat dataset)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_type: str, repo_id: str, files: dict[str, Path]) -> Path:
    """huggingface_hub's cache layout: <type>s--<org>--<name>/refs/main -> snapshots/<commit>/<files>
    (blobs are where the hub puts content; snapshot entries are symlinks to them)."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    for name, source in files.items():
        blob = root / "blobs" / f"{abs(hash((repo_id, name))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snapshot / name).parent), snapshot / name)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, teacher_dir, dataset):  # noqa: F811
    cache = tmp_path_factory.mktemp("hf") / "hub"
    cache_repo(cache, "model", "acme/tiny-teacher", {p.name: p for p in teacher_dir.iterdir() if p.is_file()})
    cache_repo(cache, "dataset", "acme/chats", {"data/train.jsonl": dataset, "README.md": dataset})
    return cache


def test_hub_ids_resolve_from_the_cache_and_other_names_say_why_not(hub_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    snapshot = resolve_local_or_cached("acme/tiny-teacher", "model", "--teacher")
    assert snapshot.name == COMMIT and (snapshot / "config.json").is_file()
    assert resolve_dataset_file("acme/chats").name == "train.jsonl"
    assert resolve_local_or_cached(str(tmp_path), "model", "--teacher") == tmp_path  # local paths win
    with pytest.raises(UserError, match=rf"^--teacher acme/other: not a local path, and no model acme/other in the "
                       rf"Hugging Face cache {hub_cache} \(offline: fetch it first with `huggingface-cli download acme/other`\)$"):
        resolve_local_or_cached("acme/other", "model", "--teacher")
    with pytest.raises(UserError, match=r"^--teacher ./missing/teacher: no such file or directory$"):
        resolve_local_or_cached("./missing/teacher", "model", "--teacher")
    with pytest.raises(UserError, match=r"--dataset acme/tiny-teacher: not a local path, and no dataset"):
        resolve_dataset_file("acme/tiny-teacher")


@pytest.mark.slow
def test_extract_with_hub_ids_offline(hub_cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.getcwd()}
    args = [sys.executable, "-m", "clients.cli", "extract", "--teacher", "acme/tiny-teacher", "--dataset", "acme/chats",
            "--store", str(tmp_path / "store"), "--k", "4"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    uri = done.stdout.split(":")[0]
    meta = LogitsReader(uri).manifest.meta
    assert meta.teacher_name == "tiny-teacher" and meta.k == 4 and len(LogitsReader(uri)) == 20
    missing = subprocess.run([*args[:5], "acme/absent", *args[6:]], capture_output=True, text=True, env=env, timeout=600)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"error: --teacher acme/absent: not a local path, and no model acme/absent in the "
                                      f"Hugging Face cache {hub_cache} (offline: fetch it first with "
                                      "`huggingface-cli download acme/absent`)")
