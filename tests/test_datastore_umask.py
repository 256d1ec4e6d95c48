"""Every file the project writes honours the umask (0644 under 022, 0664 under 002): shards, the Delta
log, tokenizer files, lease files, atomic writes (fusion reports), uploads, trainer checkpoints (which
safetensors writes through a private 0600 temp file)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from datastore import LogitsWriter, logits_id, logits_uri
from datastore.fs import honour_umask, local_temp_file, resolve, save_tokenizer, write_atomic
from tests.test_datastore import meta, sample


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(top) / name
            out[str(full.relative_to(root))] = stat.S_IMODE(full.stat().st_mode)
    return out


def assert_umask_modes(root: Path, umask: int) -> None:
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    for rel, mode in modes(root).items():
        want = want_dir if (root / rel).is_dir() else want_file
        assert mode == want, f"{rel}: {oct(mode)}, expected {oct(want)} under umask {oct(umask)}"


def test_dataset_files_honour_the_umask(tmp_path, umask, spm_tokenizer):
    store = tmp_path / "store"
    uri = logits_uri(str(store), logits_id(meta()))
    w = LogitsWriter(uri, meta(), shard_rows=2)
    save_tokenizer(uri, spm_tokenizer)
    for claim in w.claims([f"sample-{i:03d}" for i in range(4)]):  # lease files too
        claim.commit([sample(int(sid.split("-")[1])) for sid in claim.sample_ids])
    w.write(sample(7))
    w.close()
    files = modes(store)
    assert any(name.endswith(".parquet") for name in files)
    assert any("_delta_log" in name and name.endswith(".json") for name in files)
    assert any(name.startswith("logits/") and "/tokenizer/" in name for name in files)
    assert any("/_leases/" in name for name in files)
    assert_umask_modes(store, umask)


def test_atomic_and_temp_files_honour_the_umask(tmp_path, umask):
    fsys, root = resolve(str(tmp_path))
    write_atomic(fsys, f"{root}/report/report.json", b"{}")  # how fusion writes its report
    fd, tmp = local_temp_file(str(tmp_path))  # how the service stages an upload
    os.close(fd)
    assert_umask_modes(tmp_path, umask)


def test_honour_umask_fixes_private_library_files(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "ckpt").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "ckpt" / "model.safetensors")
    assert stat.S_IMODE((tmp_path / "ckpt" / "model.safetensors").stat().st_mode) == 0o600  # the fault
    honour_umask(tmp_path / "ckpt")
    assert_umask_modes(tmp_path, umask)


@pytest.mark.slow
def test_trainer_checkpoints_honour_the_umask(tmp_path, spm_tokenizer):
    from clients.tiny_models import build_model
    from tests.test_trainer_data import write_targets
    from trainer.train import TrainConfig, train

    old = os.umask(0o022)
    try:
        pivot = tmp_path / "pivot"
        model = build_model("llama", spm_tokenizer, seed=0, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=1)
        model.save_pretrained(pivot)
        spm_tokenizer.save_pretrained(pivot)
        uri, _ = write_targets(tmp_path / "targets", 8, shard_rows=4, vocab=len(spm_tokenizer))
        cfg = TrainConfig.parse(targets=uri, model=str(pivot), out=str(tmp_path / "run"), max_steps=2,
                                batch_size=2, micro_batch_size=1, max_length=48, lr=1e-3, shuffle_buffer=4,
                                chunk_rows=8, plot=False)
        result = train(cfg)
    finally:
        os.umask(old)
    ckpt = Path(result.final_dir)
    assert (ckpt / "model.safetensors").is_file()
    assert_umask_modes(tmp_path / "run", 0o022)
