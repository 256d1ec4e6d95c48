"""Input-path bench: cutting over-long samples before tokenising, and hashing a teacher's weights.

    python bench/bench_inputs.py [--text-mb 1] [--max-length 2048] [--weights-mb 512] [--shards 8]

1. **Cut before tokenising.** One over-long chat (a user turn, then an assistant turn of `--text-mb` MB of
   generated prose) is rendered and tokenised to `--max-length` tokens two ways, side by side: as
   `tokenize_sample` does now (the text is cut before tokenising) and as it did before (the whole text
   tokenised, then truncated). Process CPU seconds, best of `--repeats` interleaved runs, one thread, on
   the real 32k SentencePiece and 131k byte-level BPE tokenizers (and SmolLM2's 49k BPE when
   `$LOGITFUSE_CACHE` holds it). Both give the same ids (checked).
2. **Teacher identity.** `--shards` safetensors-sized files of random bytes (`--weights-mb` in all) in a
   temporary directory: the first `weights_revision` reads and hashes every byte (XXH3-128; SHA-256 of the
   same bytes shown for comparison), the second finds every digest in the cache and only stats the files.
   The files were just written, so they are in the page cache: the MB/s is the hashing cost, not the disk's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.corpus import text_samples  # noqa: E402
from clients.tiny_models import load_tokenizer  # noqa: E402
from datastore.chat import parse_record  # noqa: E402
from teacher_server.render import resolve_template, tokenize_sample  # noqa: E402
from teacher_server.weights import cached_digests, file_digest, weights_revision  # noqa: E402


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def bench_cut(text_mb: float, max_length: int, repeats: int) -> None:
    prose = " ".join(s["text"] for s in text_samples(400, seed=7))
    body = (prose * (int(text_mb * 1e6) // len(prose) + 1))[: int(text_mb * 1e6)]
    sample = parse_record({"id": "long", "messages": [{"role": "user", "content": "Tell me everything."},
                                                       {"role": "assistant", "content": body}]})
    toks = {"spm32k": load_tokenizer("spm32k"), "bpe131k": load_tokenizer("bpe131k")}
    if os.environ.get("LOGITFUSE_CACHE"):
        from transformers import AutoTokenizer

        from clients.smollm2 import smollm2_dir

        toks["smollm2-49k"] = AutoTokenizer.from_pretrained(smollm2_dir())
    print(f"cut before tokenising: one chat of {len(body) / 1e6:.2f} MB of text, max_length={max_length}, "
          f"process CPU s, best of {repeats}")
    print(f"{'tokenizer':<12} {'whole text, then truncate':>27} {'cut first':>12} {'saving':>9}")
    for name, tok in toks.items():
        template = resolve_template("inst", tok)
        cut_s, whole_s = [], []
        for _ in range(repeats):
            cut_s.append(_cpu(lambda: tokenize_sample(sample, tok, template, max_length)))  # noqa: B023
            whole_s.append(_cpu(lambda: tokenize_sample(sample, tok, template, 10**12)))  # noqa: B023
        a = tokenize_sample(sample, tok, template, max_length)
        b = tokenize_sample(sample, tok, template, 10**12)
        assert (a.input_ids == b.input_ids[:max_length]).all()
        mb = len(body) / 1e6
        print(f"{name:<12} {min(whole_s) / mb:>20.2f} s/MB {min(cut_s) / mb:>7.3f} s/MB "
              f"{min(whole_s) / min(cut_s):>8.0f}x")


def bench_hash(weights_mb: int, shards: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        root = Path(tmp) / "teacher"
        root.mkdir()
        (root / "config.json").write_text('{"model_type": "llama"}')
        per = weights_mb * (1 << 20) // shards
        block = os.urandom(1 << 20)
        for i in range(shards):
            with open(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
                for _ in range(per >> 20):
                    f.write(block)
        files = sorted(root.glob("*.safetensors"))
        cache = Path(tmp) / "digests.json"
        total = sum(f.stat().st_size for f in files) / 1e6
        t = time.perf_counter()
        sha = [hashlib.file_digest(open(f, "rb"), "sha256") for f in files]  # noqa: SIM115
        sha_s = time.perf_counter() - t
        t = time.perf_counter()
        xxh = [file_digest(f) for f in files]
        xxh_s = time.perf_counter() - t
        os.environ["LOGITFUSE_WEIGHTS_CACHE"] = str(cache)
        t = time.perf_counter()
        rev = weights_revision(root)
        first = time.perf_counter() - t
        t = time.perf_counter()
        again = weights_revision(root)
        cached = time.perf_counter() - t
        assert rev == again and len(sha) == len(xxh) == len(cached_digests(files, cache))
        print(f"teacher identity: {shards} files, {total:,.0f} MB (page-cached), wall seconds")
        print(f"  XXH3-128 of every byte         {total / xxh_s:>8,.0f} MB/s")
        print(f"  SHA-256 of the same bytes      {total / sha_s:>8,.0f} MB/s  (XXH3 is {sha_s / xxh_s:.1f}x faster)")
        print(f"  weights_revision, first call   {first:>8.3f} s   ({total / first:,.0f} MB/s)")
        print(f"  weights_revision, cached       {cached * 1e3:>8.2f} ms  (stat only)")
        print(f"  -> a 140 GB teacher: ~{140e3 / (total / first) / 60:.1f} min once at this rate, then "
              f"~{cached * 1e3:.0f} ms per check")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-mb", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--weights-mb", type=int, default=512)
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    bench_cut(args.text_mb, args.max_length, args.repeats)
    bench_hash(args.weights_mb, args.shards)


if __name__ == "__main__":
    main()
