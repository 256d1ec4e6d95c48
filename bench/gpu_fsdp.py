"""The FSDP check of the trainer on a lent GPU machine (issue 13): one command, no network, < 4 min.

`bash bench/gpu_fsdp.sh` runs the steps below; each is also a subcommand, so a failure can be rerun alone:

    prepare WORK          a tiny Llama pivot with its own BPE tokenizer (trained here on clients/corpus.py
                          text with `tokenizers`) and a small fused-targets dataset in its vocabulary
    train WORK RUN [...]  one training run (launched by `accelerate launch --config_file
                          trainer/configs/fsdp.yaml`, or plain for a one-process resume)
    compare WORK          the table: each resumed run against the uninterrupted one; exit 1 on a mismatch

Targets: a Delta table (`datastore.targets.TargetsWriter`) when `deltalake` is installed; without it (the
lent machine has no deltalake, whose wheel alone is 52 MB) the same shards in the dataset layout of
logitfuse 0.1 (`manifest.json` + shards), which `TargetsReader` still reads: the trainer's data path is
the same past the manifest. `DeltaDataset.exists` is then told there is no Delta table (it imports
deltalake to ask).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS, STOP = 8, 4
K = 8
# the runs and whether they train in bf16: "X-resumed" stops at STOP and resumes, "fp32-one-process" resumes
# a copy of fp32-resumed's FSDP checkpoint in one plain process (no FSDP)
RUNS = {"fp32": False, "fp32-resumed": False, "fp32-one-process": False, "bf16": True, "bf16-resumed": True}


def _have_deltalake() -> bool:
    try:
        import deltalake  # noqa: F401
    except ImportError:
        return False
    return True


def without_deltalake() -> None:
    """No deltalake: no dataset can be a Delta table, so the reader takes the 0.1 manifest path."""
    if not _have_deltalake():
        from datastore.table import DeltaDataset

        DeltaDataset.exists = lambda self: False


def _tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clients.corpus import training_texts

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(training_texts(400, seed=3), trainers.BpeTrainer(vocab_size=2048, special_tokens=specials,
                                                                              show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def _samples(tokenizer, n: int, seed: int = 0):
    """Targets samples over real token sequences of the corpus: second half is the response, every
    response position has a random top-K (distinct ids, probabilities summing to 0.97)."""
    from clients.corpus import training_texts
    from datastore.targets import TargetSample

    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    for i, text in enumerate(training_texts(n, seed=seed + 11)):
        ids = np.asarray([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]][:200],
                         dtype=np.int32)
        mask = np.zeros(len(ids), bool)
        mask[len(ids) // 2 :] = True
        pos = np.flatnonzero(mask[1:]).astype(np.int32)
        top = np.stack([rng.choice(vocab, K, replace=False) for _ in pos]).astype(np.int32).reshape(len(pos), K)
        probs = (np.sort(rng.dirichlet(np.full(K, 0.3), len(pos)), axis=1)[:, ::-1] * 0.97).astype(np.float32)
        yield TargetSample(f"g{i:05d}", ids, mask, pos, top, probs)


def _write_0_1(uri: Path, meta, samples, shard_rows: int) -> None:
    """The shards and manifest.json of a logitfuse 0.1 targets dataset (read by `TargetsReader`)."""
    from datastore.manifest import ShardInfo, id_bloom
    from datastore.targets import TargetsManifest, _topk_bytes, encode_shard, targets_id, validate

    uri.mkdir(parents=True)
    shards = []
    for n, start in enumerate(range(0, len(samples), shard_rows)):
        part = [validate(s, meta.k) for s in samples[start : start + shard_rows]]
        data = encode_shard(part)
        name = f"shard-{n:06d}.parquet"
        (uri / name).write_bytes(data)
        shards.append(ShardInfo(file=name, rows=len(part), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                positions=sum(len(s.positions) for s in part),
                                tokens=sum(len(s.input_ids) for s in part), topk_bytes=_topk_bytes(data),
                                id_bloom=id_bloom([s.sample_id for s in part])))
    manifest = TargetsManifest(targets_id=targets_id(meta), meta=meta, shards=shards, complete=True)
    (uri / "manifest.json").write_bytes(manifest.to_json())


def prepare(work: Path) -> None:
    from clients.tiny_models import build_model
    from datastore.targets import TargetsMeta, TargetsWriter
    from datastore.tokenizers import tokenizer_fingerprint

    pivot = work / "pivot"
    tokenizer = _tokenizer(pivot)
    model = build_model("llama", tokenizer, seed=0, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model.save_pretrained(pivot)
    meta = TargetsMeta(pivot="gpu-fsdp", sources=["synthetic"], align="offsets", vocab_map="ms", fusion="mince", k=K,
                       pivot_tokenizer=tokenizer_fingerprint(tokenizer), pivot_vocab_size=len(tokenizer))
    samples = list(_samples(tokenizer, 160))
    targets = work / "targets"
    if _have_deltalake():
        with TargetsWriter(str(targets), meta, shard_rows=32) as w:
            for s in samples:
                w.write(s)
        layout = "Delta table"
    else:
        _write_0_1(targets, meta, samples, shard_rows=32)
        layout = "0.1 manifest.json (no deltalake here)"
    params = sum(p.numel() for p in model.parameters())
    print(f"prepared: pivot llama {params / 1e6:.2f}M parameters, vocab {len(tokenizer)}; targets {len(samples)} "
          f"samples, {sum(len(s.positions) for s in samples)} positions, top-{K}, {layout}")


def train_run(work: Path, run: str, stop_after: int, cpu: bool) -> None:
    """One run of RUNS (under `accelerate launch`, or one plain process)."""
    from trainer.train import TrainConfig, train

    without_deltalake()
    import torch

    # deterministic kernels where torch has them (warn, not fail, where it has none): a resumed run then
    # repeats the straight run's sums, so the comparison's tolerance can stay tight
    torch.use_deterministic_algorithms(True, warn_only=True)
    bf16 = RUNS[run]
    cfg = TrainConfig.parse(targets=str(work / "targets"), model=str(work / "pivot"), out=str(work / "runs" / run),
                            max_steps=STEPS, stop_after=stop_after, save_every=STOP, keep_checkpoints=4,
                            batch_size=4, micro_batch_size=1, max_length=256, lr=1e-3, warmup_ratio=0.25,
                            shuffle_buffer=64, chunk_rows=256, bf16=bf16, cpu=cpu, report_to="none", plot=False,
                            tensorboard=False)
    result = train(cfg)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        from accelerate import PartialState

        state = PartialState()
        print(f"run {run}: {result.steps} steps, {state.distributed_type}, {state.num_processes} process(es), "
              f"device {state.device}")


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "logs" / "train.jsonl").read_text().splitlines())}


def _weights(out: Path, step: int):
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


def _optimizer_pieces(out: Path, step: int) -> int:
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(out / "checkpoints" / f"step-{step:06d}" / "optimizer")).read_metadata()
    keys = [k for k in meta.state_dict_metadata if k.endswith(".exp_avg")]
    return max(len(meta.state_dict_metadata[k].chunks) for k in keys)


def compare(work: Path) -> int:
    """Each resumed run against its uninterrupted twin. Tolerance: fp32 runs 1e-4 absolute on weights and
    1e-5 relative on losses (GPU kernels such as attention's backward may sum in another order between two
    runs: differences of ~1e-7 relative, magnified where AdamW divides by a tiny sqrt(v)); bf16 runs 5e-3 /
    5e-3 (one bf16 rounding is 4e-3 relative). Resuming without the optimizer state (fresh AdamW moments)
    moves weights by ~lr = 1e-3 at once: the fp32 checks would see it, the bf16 one only says bf16 runs and
    resumes. On CPU (--cpu, deterministic) a resumed run repeats the straight one exactly."""
    runs = work / "runs"
    pivot = {k: v for k, v in _weights_from_dir(work / "pivot").items()}
    checks = [("fp32-resumed", "fp32", 1e-4, 1e-5), ("fp32-one-process", "fp32", 1e-4, 1e-5),
              ("bf16-resumed", "bf16", 5e-3, 5e-3)]
    rows, ok_all = [], True
    for run, ref, w_tol, l_tol in checks:
        a, b = _losses(runs / run), _losses(runs / ref)
        loss_rel = max(abs(a[s] - b[s]) / abs(b[s]) for s in b)
        wa, wb = _weights(runs / run, STEPS), _weights(runs / ref, STEPS)
        same_keys = wa.keys() == wb.keys()
        w_diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wb) if same_keys else float("inf")
        moved = max((wb[k].float() - pivot[k].float()).abs().max().item() for k in wb if k in pivot)
        ok = same_keys and sorted(a) == sorted(b) == list(range(1, STEPS + 1)) and loss_rel <= l_tol and w_diff <= w_tol
        ok_all &= ok
        rows.append((run, ref, _optimizer_pieces(runs / ref, STOP), loss_rel, l_tol, w_diff, w_tol, moved, ok))
    print()
    print(f"{'run':<18} {'against':<6} {'opt shards':>10} {'max loss rel diff':>18} {'tol':>7} "
          f"{'max |w diff|':>13} {'tol':>7} {'weights moved':>14}  result")
    for run, ref, pieces, lr_, lt, wd, wt, moved, ok in rows:
        print(f"{run:<18} {ref:<6} {pieces:>10} {lr_:>18.2e} {lt:>7.0e} {wd:>13.2e} {wt:>7.0e} {moved:>14.2e}  "
              f"{'PASS' if ok else 'FAIL'}")
    losses = _losses(runs / "fp32")
    print("fp32 loss by step: " + " ".join(f"{losses[s]:.4f}" for s in sorted(losses)))
    print(f"GPU FSDP CHECK: {'PASS' if ok_all else 'FAIL'}")
    return 0 if ok_all else 1


def _weights_from_dir(path: Path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("work", type=Path)
    t = sub.add_parser("train")
    t.add_argument("work", type=Path)
    t.add_argument("run", choices=sorted(RUNS))
    t.add_argument("--stop-after", type=int, default=0)
    t.add_argument("--cpu", action="store_true")
    sub.add_parser("compare").add_argument("work", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.work)
    elif args.cmd == "train":
        train_run(args.work, args.run, args.stop_after, args.cpu)
    else:
        return compare(args.work)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
