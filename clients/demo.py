"""`logitfuse demo`: distil a real chat model, SmolLM2-135M-Instruct, into a tiny pivot, end to end.

1. data: the project's real chat dataset (`clients.smollm2_chats`: prompts the project wrote, replies
   sampled from SmolLM2), the first 120 of its 200 training chats and 40 of its 60 held-out chats;
2. teachers: SmolLM2-135M-Instruct (the real source, converted once into the user cache by
   `clients.smollm2.smollm2_dir`), a tiny Llama **pivot** on SmolLM2's own tokenizer (49k byte-level BPE,
   ChatML), randomly initialised (no pre-training), and a tiny Mixtral-style **source** on another
   tokenizer (32k SentencePiece, ChatML) trained for seconds on the training chats (cached in
   `WORKDIR/models`);
3. extraction through the teacher service (`logitfuse serve` on a free local port): top-10 of every
   teacher into `WORKDIR/store`;
4. fusion (offsets alignment, mapping statistics, MinCE, pairwise): one targets dataset per source;
5. training from the pivot's init, same data, steps and seed: an SFT-only baseline (λ = 1) and one target
   per source on λ·SFT + (1-λ)·CE(fused ‖ student);
6. an SCE merge of the targets, then on the held-out chats, for the pivot, the SFT-only baseline, each
   target and the merge: KL(SmolLM2 ‖ model) over the full vocabulary and the loss (NLL of SmolLM2's
   replies), nats per assistant token.

Why these teachers: with the pivot on SmolLM2's tokenizer, KL to SmolLM2 is exact (same vocabulary, no
mapping loss) and SmolLM2's fusion is the identity alignment, so what the demo measures is distillation,
not alignment error; the second source brings the cross-tokenizer path (32k SentencePiece -> 49k BPE)
and the merge its second model. `bench/bench_distill.py` repeats steps 5-6 over several seeds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import typer

from datastore.errors import UserError
from datastore.fs import check_local_directory
from teacher_server.render import TEMPLATE_DIR

K = 10
MAX_LENGTH = 512  # tokens per sample; the committed chats are all shorter
PIVOT = "pivot-smollm2tok"
SMOLLM2 = "smollm2-135m-instruct"
TINY_SOURCE = "source-mixtral-spm"
# The tiny source: trained on the training chats (rendered with ChatML), cached in WORKDIR/models. Trained
# on the project's prose instead, it explains SmolLM2's replies worse than a random model (CE 13.1 vs 10.8
# nats) and MinCE drops it.
SOURCE_STEPS = 40
# Chats the demo uses from the committed dataset (200 training, 60 held-out): as many as keep the demo
# within 5 min on 2 cores (extraction and evaluation cost per token of SmolLM2's forward, ~250 tok/s)
N_TRAIN, N_HELDOUT = 120, 40
# Training of the SFT-only baseline and of each target: steps set by the demo's time budget (three runs
# within 5 min), lr high enough to leave the random init's 10.8 nats in them; not tuned on held-out chats.
TRAIN = dict(max_steps=20, batch_size=4, max_length=MAX_LENGTH, lr=1e-2, warmup_ratio=0.1)
LAMBDA = 0.5  # λ of λ·SFT + (1-λ)·fusion for the fused targets


def _say(msg: str) -> None:
    typer.echo(msg, err=False)


def make_pivot(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny Llama (`clients.tiny_models.tiny_config`: 2 layers, hidden 128, tied embeddings) on the
    tokenizer and chat template saved in `tokenizer_dir` (SmolLM2's), randomly initialised with `seed`
    and saved with that tokenizer (`from_pretrained` loads it). No pre-training: the SFT-only baseline and
    the fused targets all start from this same init, so the comparison needs none (and the demo stays
    within its time budget). Reused when `out_dir` already holds one made with the same settings."""
    from transformers import AutoTokenizer

    from clients.tiny_models import build_model
    from datastore.fs import honour_umask

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = {"arch": "llama", "tokenizer_len": len(tok), "seed": seed, "version": 2,
                "vocab": hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    marker = out_dir / "logitfuse_teacher.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return out_dir
    model = build_model("llama", tok, seed=seed)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "logitfuse_teacher.json").write_text(json.dumps({"key": key, "settings": settings}))
    honour_umask(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def heldout_eval(teacher_dir: str | Path, students: dict[str, str | Path], records: list[dict],
                 max_length: int = MAX_LENGTH) -> dict[str, dict[str, float]]:
    """KL(teacher ‖ student) and loss of each student on held-out chats, at the assistant positions.

    Every model must share the teacher's tokenizer (same ids for the same rendered text; checked). Each
    chat is rendered with the teacher's chat template; at every position whose next token belongs to an
    assistant turn, in float64 over the full vocabulary:
        kl   = Σ_v p_T(v) (log p_T(v) - log p_S(v))        (nats)
        loss = -log p_S(next token)                          (nats; the reply is the teacher's sample)
    Returns `{name: {"kl": mean, "loss": mean, "positions": n}}`, means over all positions; the teacher
    itself is included as `"teacher"` (kl 0) for reference.
    Raises ValueError if a student's tokenizer gives other ids or its vocabulary size differs.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datastore.chat import parse_record
    from teacher_server.render import resolve_template, tokenize_sample

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    template = resolve_template("model", tok)
    samples = [tokenize_sample(parse_record(r), tok, template, max_length, False) for r in records]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    models = {}
    for name, d in students.items():
        stok = AutoTokenizer.from_pretrained(d)
        probe = samples[0]
        if stok(probe.text, add_special_tokens=False)["input_ids"] != probe.input_ids.tolist():
            raise ValueError(f"{name}: its tokenizer does not give the teacher's ids; KL needs the same vocabulary")
        models[name] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    sums = {name: [0.0, 0.0] for name in ["teacher", *models]}
    count = 0
    with torch.inference_mode():
        for s in samples:
            ids = torch.from_numpy(s.input_ids.astype(np.int64))[None]
            pos = torch.from_numpy(s.positions.astype(np.int64))
            gold = ids[0, pos + 1]
            lt = _logprobs_at(teacher, ids, pos)
            pt = lt.exp()
            sums["teacher"][1] -= float(lt.gather(1, gold[:, None]).sum())
            for name, m in models.items():
                ls = _logprobs_at(m, ids, pos)
                if ls.shape != lt.shape:
                    raise ValueError(f"{name}: vocabulary of {ls.shape[-1]} rows, the teacher has {lt.shape[-1]}")
                sums[name][0] += float((pt * (lt - ls)).sum())
                sums[name][1] -= float(ls.gather(1, gold[:, None]).sum())
            count += len(pos)
    return {name: {"kl": kl / max(1, count), "loss": nll / max(1, count), "positions": count}
            for name, (kl, nll) in sums.items()}


def _logprobs_at(model, ids, pos):
    """float64 log-softmax `[len(pos), vocab]` of a causal LM's next-token logits at positions `pos` of
    `ids` (`[1, T]`): the decoder runs on every token, the LM head only at `pos` (the assistant positions
    are about half of a chat; the head is most of a small model's cost)."""
    import torch

    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, pos]
    logits = model.get_output_embeddings()(hidden).double()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


def _rendered(records: list[dict], template: str, tokenizer) -> list[str]:
    """Each chat rendered with `template` (a Jinja chat template source) as extraction renders it: the
    text a tiny source trains on."""
    from datastore.chat import parse_record
    from teacher_server.render import render_chat

    return [render_chat(parse_record(r).messages, template, tokenizer)[0] for r in records]


@dataclass
class Prepared:
    """What stages 1-4 produce: the data, the teachers' directories and the targets datasets."""

    workdir: Path
    heldout: list[dict]
    teacher_dirs: dict[str, Path]
    logits: dict[str, str]
    targets: dict[str, str]  # source name -> targets dataset URI
    seconds: dict[str, float] = field(default_factory=dict)


def prepare(workdir: str | Path, log: Callable[[str], None] = _say, n_train: int | None = N_TRAIN,
            n_heldout: int | None = N_HELDOUT, source_steps: int = SOURCE_STEPS, smollm2: Path | None = None,
            tokenizer_cache: Path | None = None) -> Prepared:
    """Stages 1-4: data, teachers, extraction through the service, fusion (see the module docstring).

    `n_train` / `n_heldout` keep only the first chats of each split (None: all of it) and `source_steps` sets the tiny
    source's training steps (the quick demo and the tests run the pipeline small); `smollm2` is SmolLM2's
    converted directory (default: `smollm2_dir()`, made in the user cache on first use);
    `tokenizer_cache` is where the 32k tokenizer is converted (default `WORKDIR/models/.tokenizers`: the
    demo writes only under its workdir). Raises RuntimeError if an extraction job fails."""
    from clients.client import TeacherClient, run_local_service
    from clients.corpus import write_jsonl
    from clients.smollm2 import smollm2_dir
    from clients.smollm2_chats import load_chats
    from clients.tiny_models import load_tokenizer, make_teacher
    from datastore.chat import load_dataset
    from datastore.reader import LogitsReader
    from fusion.pipeline import fuse_logits

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = str(workdir / "store")
    seconds: dict[str, float] = {}
    train = load_chats("train")[:n_train]
    heldout = load_chats("heldout")[:n_heldout]
    data_path = write_jsonl([{"id": r["id"], "messages": r["messages"]} for r in train], workdir / "data" / "train.jsonl")
    dataset = load_dataset(data_path)
    log(f"[1/6] data: {len(train)} chats with SmolLM2's replies -> {data_path} (id {dataset.dataset_id}); "
        f"{len(heldout)} held-out chats")

    t0 = time.perf_counter()
    smol = Path(smollm2) if smollm2 is not None else smollm2_dir()
    log(f"[2/6] teacher {SMOLLM2}: {smol} ({time.perf_counter() - t0:.1f}s)")
    t1 = time.perf_counter()
    pivot = make_pivot(workdir / "models" / PIVOT, smol)
    log(f"[2/6] pivot {PIVOT} (tiny Llama, SmolLM2's 49k BPE tokenizer and ChatML template) ready in "
        f"{time.perf_counter() - t1:.1f}s")
    t1 = time.perf_counter()
    chatml = (TEMPLATE_DIR / "chatml.jinja").read_text(encoding="utf-8")
    tokenizer_cache = tokenizer_cache or workdir / "models" / ".tokenizers"
    texts = _rendered(train, chatml, load_tokenizer("spm32k", chatml, cache_dir=tokenizer_cache))
    tiny = make_teacher(workdir / "models" / TINY_SOURCE, "mixtral", "spm32k", chatml, steps=source_steps, seed=2,
                        log=lambda m: log(f"      {TINY_SOURCE}: {m}"), texts=texts, tokenizer_cache=tokenizer_cache)
    log(f"[2/6] source {TINY_SOURCE} (tiny Mixtral, 32k SentencePiece, ChatML, {source_steps} steps on the "
        f"training chats) ready in {time.perf_counter() - t1:.1f}s")
    teacher_dirs = {PIVOT: pivot, SMOLLM2: smol, TINY_SOURCE: tiny}
    seconds["teachers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # A fresh job state each run: the service answers a job with the same dataset, teacher name and
    # settings from its state even when the teacher's weights changed since (a retrained tiny source);
    # the store's logits ids include the weights' revision, so unchanged teachers still cost nothing.
    shutil.rmtree(workdir / "service", ignore_errors=True)
    config = {"store": store, "state_dir": str(workdir / "service"), "teachers": [
        {"name": name, "model": str(d), "backend": "hf", "max_k": K, "max_length": MAX_LENGTH,
         "chat_template": "model", "shard_rows": 256} for name, d in teacher_dirs.items()]}
    logits: dict[str, str] = {}
    # a generous start-up timeout: three workers load their models at once, slow on a busy machine
    with run_local_service(config, log_path=workdir / "serve.log", timeout=900) as url, TeacherClient(url) as client:
        log(f"[3/6] teacher service up at {url} in {time.perf_counter() - t0:.1f}s (log: {workdir / 'serve.log'})")
        upload = client.upload(data_path)
        jobs = {name: client.submit(upload["id"], name, K) for name in teacher_dirs}  # queued at once
        for name in teacher_dirs:
            job = client.wait(jobs[name]["id"], progress=False)
            if job["state"] != "done":
                raise RuntimeError(f"demo: job for {name} ended {job['state']}: {job['errors']}")
            logits[name] = job["uri"]
            m = LogitsReader(job["uri"]).manifest
            stored = job["samples_done"] - job["samples_scored"]
            log(f"[3/6] {name}: {m.num_samples} samples, {m.num_tokens} tokens, {m.num_positions} scored "
                f"positions, {m.num_bytes / 1024:.1f} KiB = {m.bytes_per_entry:.2f} B/entry at k={K}"
                + (f" ({stored} already in the store, not scored again)" if stored else ""))
    seconds["extract"] = time.perf_counter() - t0
    log(f"[3/6] extraction through the service: {seconds['extract']:.1f}s")

    t0 = time.perf_counter()
    sources = [SMOLLM2, TINY_SOURCE]
    # pairwise: one targets dataset per source, STORE/targets/<targets id>, where the catalog
    # (`store ls`, `store verify STORE`, the dashboard) finds them
    targets_root = f"{store}/targets"
    report = fuse_logits(logits[PIVOT], [logits[s] for s in sources], targets_root,
                         align="offsets", vocab_map="ms", fusion="mince", mode="pairwise", progress=False)
    for line in report.lines():
        log(f"[4/6] {line}")
    seconds["fuse"] = time.perf_counter() - t0
    targets = {s: tr.uri for s, tr in zip(sources, report.targets, strict=True)}
    return Prepared(workdir, heldout, teacher_dirs, logits, targets, seconds)


def train_models(prep: Prepared, seed: int = 0, lam: float = LAMBDA, out: Path | None = None,
                 log: Callable[[str], None] = _say, **train_overrides) -> dict[str, Path]:
    """Stage 5 and the merge, with one training seed: the SFT-only baseline (λ = 1) and one target per
    source (λ = `lam`), all from the pivot on the same data for the same steps, then an SCE merge of the
    targets. `train_overrides` replace `TRAIN` entries (max_steps, lr, ...). Returns the checkpoint
    directories keyed "SFT only", "target <- SOURCE", "merged (SCE)"."""
    from merge.config import parse_config
    from merge.engine import run_merge
    from trainer.train import TrainConfig, train

    out = Path(out or prep.workdir / "runs" / f"seed{seed}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: the demo shows training, not resuming
    pivot = prep.teacher_dirs[PIVOT]
    settings = {**TRAIN, **train_overrides}
    runs = {"SFT only": (prep.targets[SMOLLM2], 1.0)}
    runs.update({f"target <- {s}": (uri, lam) for s, uri in prep.targets.items()})
    t0 = time.perf_counter()
    dirs: dict[str, Path] = {}
    for name, (uri, run_lambda) in runs.items():
        result = train(TrainConfig.parse(targets=uri, model=str(pivot), out=str(out / run_dir_name(name)),
                                         seed=seed, tensorboard=False, plot=False, **{"lambda": run_lambda},
                                         **settings))
        dirs[name] = Path(result.final_dir)
        first, last = result.losses[0], result.losses[-1]
        parts = ", ".join(f"{key} {last[key]:.3f}" for key, weight in (("sft", run_lambda), ("fusion", 1 - run_lambda))
                          if weight and key in last)
        log(f"[5/6] {name} (λ={run_lambda:g}): {result.steps} steps, loss {first['loss']:.3f} -> "
            f"{last['loss']:.3f} ({parts})")
    log(f"[5/6] training: {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    merged = out / "merged-sce"
    targets = [d for name, d in dirs.items() if name.startswith("target")]
    cfg = parse_config({"merge_method": "sce", "base_model": str(pivot),
                        "models": [{"model": str(d)} for d in targets], "parameters": {"select_topk": 0.1}})
    run_merge(cfg, merged)
    dirs["merged (SCE)"] = merged
    log(f"[6/6] SCE merge (select_topk 0.1) of {len(targets)} targets in {time.perf_counter() - t0:.1f}s")
    return dirs


def run_dir_name(name: str) -> str:
    """The directory of one training run under ``runs/seed<N>/``: "target <- smollm2-135m-instruct" ->
    "target-from-smollm2-135m-instruct", "SFT only" -> "sft-only" (no character a shell must quote)."""
    return name.replace(" <- ", "-from-").replace(" ", "-").lower()


def verdict_lines(figures: dict[str, dict[str, float]]) -> list[str]:
    """One line per fused model: its held-out KL to SmolLM2 minus the SFT-only baseline's (nats per token;
    negative = the fusion targets distilled SmolLM2 better than SFT alone), from `heldout_eval`'s figures."""
    base = figures["SFT only"]["kl"]
    out = []
    for name, f in figures.items():
        if name.startswith("target") or name.startswith("merged"):
            delta = f["kl"] - base
            word = "closer to" if delta < 0 else "no closer to"
            out.append(f"{name}: KL {delta:+.4f} nats per token against SFT only ({word} SmolLM2 than SFT alone)")
    return out


def print_figures(figures: dict[str, dict[str, float]], log: Callable[[str], None] = _say) -> None:
    """The demo's table: KL to SmolLM2 and loss per model, lower is better."""
    n = next(iter(figures.values()))["positions"]
    log(f"held-out chats, {n} assistant positions (nats per token, lower is better; loss: negative "
        "log-likelihood of SmolLM2's held-out replies):")
    log(f"      {'model':34s} {'KL(SmolLM2‖model)':>18s} {'loss':>8s}")
    for name, f in figures.items():
        kl = "-" if name == "teacher" else f"{f['kl']:.4f}"
        label = f"{SMOLLM2} (teacher)" if name == "teacher" else name
        log(f"      {label:34s} {kl:>18s} {f['loss']:8.4f}")


#: `logitfuse demo --quick`: the same pipeline on a few chats and steps, to check it runs (tests use it);
#: its figures say nothing about distillation
QUICK = {"n_train": 8, "n_heldout": 4, "source_steps": 4, "max_steps": 6, "batch_size": 2}


def run_demo(workdir: str | Path, seed: int = 0, quick: bool = False, log: Callable[[str], None] = _say,
             smollm2: Path | None = None, tokenizer_cache: Path | None = None) -> dict:
    """Stages 1-6 (module docstring) with training seed `seed`; prints progress and the held-out table.

    `quick` runs `QUICK`'s reduced setting. Returns `{"figures": heldout_eval's figures keyed "teacher",
    "pivot", "SFT only", "target <- SOURCE", "merged (SCE)"; "dirs": their checkpoint directories (and
    "pivot"); "prep": the `Prepared` stages 1-4; "seconds": wall seconds in all; "stage_seconds": per
    stage}`."""
    t_start = time.perf_counter()
    check_local_directory(str(workdir), "--workdir")  # a file there (or above): one line, before any work
    if not 0 <= seed <= 2**32 - 1:  # the trainer's bound (numpy and torch seeds), checked before any work
        raise UserError(f"--seed {seed}: must be between 0 and {2**32 - 1}")
    small = QUICK if quick else {}
    prep = prepare(workdir, log, n_train=small.get("n_train", N_TRAIN), n_heldout=small.get("n_heldout", N_HELDOUT),
                   source_steps=small.get("source_steps", SOURCE_STEPS), smollm2=smollm2,
                   tokenizer_cache=tokenizer_cache)
    t0 = time.perf_counter()
    overrides = {key: small[key] for key in ("max_steps", "batch_size") if key in small}
    dirs = {"pivot": prep.teacher_dirs[PIVOT], **train_models(prep, seed=seed, log=log, **overrides)}
    prep.seconds["train+merge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures = heldout_eval(prep.teacher_dirs[SMOLLM2], dirs, prep.heldout)
    prep.seconds["evaluate"] = time.perf_counter() - t0
    log(f"[6/6] held-out evaluation: {prep.seconds['evaluate']:.1f}s")
    print_figures(figures, log)
    for line in verdict_lines(figures):
        log(f"      {line}")
    log("      (one seed; " + ("--quick: these figures only check that the pipeline runs)" if quick else
                               "the README reports three, and the seed-to-seed spread)"))
    seconds = time.perf_counter() - t_start
    log(f"demo done in {seconds:.1f}s ({', '.join(f'{k} {v:.0f}s' for k, v in prep.seconds.items())}); store at "
        f"{prep.workdir / 'store'} (try: logitfuse store ls {prep.workdir / 'store'})")
    return {"figures": figures, "dirs": dirs, "prep": prep, "seconds": seconds, "stage_seconds": prep.seconds}
