"""Token alignment throughput between the two real tokenizers, against a plain-Python DTW, and the size of
the mapping statistics.

    OMP_NUM_THREADS=1 python bench/bench_align.py                 # 48 samples of 2048 pivot tokens
    OMP_NUM_THREADS=1 python bench/bench_align.py --samples 12 --python-samples 1 --sweep-rounds 1   # quicker

Pivot: the 32k SentencePiece tokenizer (`spm32k`), source: the 131k byte-level BPE (`bpe131k`), both from
`clients.tiny_models.load_tokenizer`. Text: generated from `clients.corpus` in three kinds, a third of the
samples each, every sample cut at exactly 2048 pivot tokens:

- ``prose``: `corpus.text_samples` and the turns of `corpus.chat_samples`;
- ``code``: the corpus's world written out as Python (dataclass records, lookups, loops, a JSON dump);
- ``non_latin``: the prose with each word spelt in another script (Cyrillic, Greek, Arabic, Devanagari,
  Hangul, CJK) by a fixed letter/syllable map, plus emoji and symbols: text that neither tokenizer has
  whole words for, so byte-fallback pieces and multi-byte splits are common.

Timed per sample, one thread, CPU time of this process (`time.process_time`, so other load on the machine
does not count): ``offsets`` and ``dtw`` as `fusion.align_sample` runs them in the pipeline (re-encoding
both texts for the offsets included), then ``fuse`` (offsets alignment + MS mapping + MinCE on synthetic
top-10: what `logitfuse fuse` does per sample after decoding). The plain-Python reference is the approach
of the reference code: the full DTW matrix, one Python iteration and one Python Levenshtein per cell (the
same cost as ours: edit distance, x0.1 when one string contains the other); it runs on
``--python-samples`` full 2048-token samples (the text kinds in turn) and is reported per sample. Its token
strings are given to it for free (not timed).

Agreement with the authors' DTWs (``--reference-samples`` samples, the kinds in turn): each reference is
run over the full matrix with its own token strings, cost and tie order, as their code has them (read, not
copied): FuseChat-1.0 (``FuseChat/train/align_token_and_vocab.py`` as of 2024-04) compares each
tokenizer's token strings with its own whitespace marker (``▁`` / ``Ġ``) removed, edit distance x0.1 when
one contains the other, ties diagonal > source step > pivot step; FuseChat-2.0 (the same file since
2024-08) compares ``tokenizer.decode([id])`` of each token, edit distance with no discount, ties diagonal >
pivot step > source step. Agreement = share of a reference's groups that our ``dtw`` / ``dtw2`` (banded,
as the pipeline runs them) reproduce exactly; also each reference against the exact ``offsets`` groups.

Mapping statistics: built over the samples from their offsets alignments, and over a vocabulary sweep
(every token of both vocabularies, decoded, shuffled, ``--sweep-rounds`` times), because the generated
corpus uses only a few thousand distinct words and a real dataset reaches far more pairs. In-memory size is
`MappingStatistics.nbytes` (sorted uint32 keys + uint32 counts + uint32 start counts + the best-partner
table), on-disk size is
the compressed ``.npz`` that `logitfuse fuse` saves next to the targets.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients import corpus  # noqa: E402
from clients.tiny_models import load_tokenizer  # noqa: E402
from datastore.sample import ScoredSample  # noqa: E402
from datastore.words import plural  # noqa: E402
from fusion import (  # noqa: E402
    MappingStatistics,
    TokenTable,
    align_distributions,
    align_sample,
    build_vocab_map,
    fuse_sample,
)
from fusion.align import align_dtw, decoded_pieces, dtw_pieces  # noqa: E402

TOKENS = 2048
KINDS = ("prose", "code", "non_latin")

# ------------------------------------------------------------------------------------------ text


def prose_text(rng: random.Random) -> str:
    seed = rng.randrange(1 << 30)
    parts = [t["text"] for t in corpus.text_samples(40, seed=seed)]
    for chat in corpus.chat_samples(30, seed=seed + 1):
        parts += [m["content"] for m in chat["messages"]]
    rng.shuffle(parts)
    return "\n\n".join(parts)


def code_text(rng: random.Random) -> str:
    """The world as Python source: records, a lookup table, functions with loops and f-strings."""
    facts = corpus.world(seed=rng.randrange(1000))
    lines = [
        "from dataclasses import dataclass",
        "import json",
        "",
        "",
        "@dataclass(frozen=True)",
        "class Creature:",
        "    name: str",
        "    colour: str",
        "    place: str",
        "    food: str",
        "    young: int  # litter size each spring",
        "",
        "",
        "CREATURES = [",
    ]
    for c in facts:
        lines.append(
            f'    Creature(name="{c.name}", colour="{c.colour}", place="{c.place}", '
            f'food="{c.food}", young={c.count}),'
        )
    lines += ["]", "BY_NAME = {c.name: c for c in CREATURES}", ""]
    for i in range(rng.randint(6, 10)):
        a, b = rng.sample(facts, 2)
        fn = f"{rng.choice(['count', 'find', 'describe', 'group'])}_{a.name}_{b.name}_{i}"
        lines += [
            "",
            f"def {fn}(items: list[Creature], limit: int = {rng.randint(2, 9)}) -> dict[str, int]:",
            f'    """How many creatures near {a.place} eat {a.food}, at most `limit`."""',
            "    out: dict[str, int] = {}",
            "    for c in sorted(items, key=lambda c: (c.place, -c.young)):",
            f'        if c.food == "{a.food}" or c.colour in ("{a.colour}", "{b.colour}"):',
            "            out[c.name] = out.get(c.name, 0) + c.young",
            "        if len(out) >= limit:",
            "            break",
            '    assert all(v > 0 for v in out.values()), f"bad counts: {out!r}"',
            "    return out",
        ]
    lines += [
        "",
        'if __name__ == "__main__":',
        "    print(json.dumps({k: v.young for k, v in BY_NAME.items()}, indent=2, sort_keys=True))",
        "",
    ]
    return "\n".join(lines)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ALPHABETS = [
    "абвгдежзийклмнопрстуфхцчшщ",  # Cyrillic
    "αβγδεζηθικλμνξοπρστυφχψωάέ",  # Greek
    "ابتثجحخدذرزسشصضطظعغفقكلمنه",  # Arabic
    "अआइईउऊऋएऐओऔकखगघङचछजझञटठडढण",  # Devanagari
]
_SCRIPTS: list = [dict(zip(_LETTERS, a, strict=True)) for a in _ALPHABETS]
_SCRIPTS += [(0xAC00, 0xD7A3), (0x4E00, 0x9FFF)]  # Hangul syllables, CJK ideographs: a word -> 1..3 chars
_EXTRA = ["🙂", "🚀", "✓", "∑x²", "→", "∞", "€", "°C", "🦊", "🦉"]


def non_latin_text(rng: random.Random) -> str:
    out = []
    for word in prose_text(rng).split(" "):
        script = _SCRIPTS[rng.randrange(len(_SCRIPTS))] if rng.random() < 0.97 else None
        if script is None:
            out.append(rng.choice(_EXTRA))
        elif isinstance(script, dict):
            out.append("".join(script.get(ch.lower(), ch) for ch in word))
        else:
            lo, hi = script
            h = sum(ord(ch) * 31**i for i, ch in enumerate(word))
            out.append("".join(chr(lo + (h >> (7 * j)) % (hi - lo)) for j in range(1 + len(word) // 4)))
    return " ".join(out)


MAKERS = {"prose": prose_text, "code": code_text, "non_latin": non_latin_text}


def cut_to_tokens(tokenizer, make, rng: random.Random, n: int) -> str:
    """Text of exactly ``n`` tokens of ``tokenizer``, cut at a token boundary near token n whose prefix
    re-tokenises to exactly n tokens. (When token n falls inside a character split into byte-fallback
    pieces, no prefix has n tokens: then new text is generated.)"""
    for _ in range(50):
        text = make(rng)
        while (
            len(
                offsets := tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
                    "offset_mapping"
                ]
            )
            <= n + 8
        ):
            text += "\n\n" + make(rng)
        for i in sorted(range(n - 8, n + 8), key=lambda i: abs(i - (n - 1))):
            cut = text[: offsets[i][1]]
            if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == n:
                return cut
    raise RuntimeError(f"could not cut a text of exactly {n} tokens")


def scored(tokenizer, text: str, sample_id: str, k: int, rng: np.random.Generator) -> ScoredSample:
    """The sample as the datastore gives it back: ids, every position scored, synthetic top-k (the gold
    token first with p = 0.5, then other ids of the same text, as a trained model's top-k would be)."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    n = ids.size - 1
    gold = ids[1:]
    topk = np.concatenate([gold[:, None], ids[rng.integers(0, ids.size, size=(n, k - 1))]], axis=1)
    probs = np.concatenate([np.full((n, 1), 0.5), np.full((n, k - 1), 0.4 / max(k - 1, 1))], axis=1)
    for j in range(1, k):  # a real top-k has no repeated id: give repeats ~0 probability
        probs[(topk[:, :j] == topk[:, j : j + 1]).any(axis=1), j] = 1e-9
    return ScoredSample(
        sample_id=sample_id,
        input_ids=ids,
        loss_mask=np.ones(ids.size, dtype=bool),
        positions=np.arange(n, dtype=np.int32),
        topk_ids=topk.astype(np.int32),
        topk_logprobs=np.log(probs).astype(np.float32),
        gold_logprob=np.log(probs[:, 0]).astype(np.float32),
        text=text,
    )


def vocabulary_sweep(ptok, stok, rounds: int, rng: random.Random, chunk: int = 4000):
    """Texts made of every token of both vocabularies (decoded), shuffled, ``chunk`` pieces at a time, each
    piece with or without a leading space: every token of the 131k vocabulary next to varied neighbours."""
    pieces = [stok.decode([i]) for i in range(len(stok))] + [ptok.decode([i]) for i in range(len(ptok))]
    pieces = [p for p in pieces if p.strip() and "\ufffd" not in p and "<" not in p]
    for _ in range(rounds):
        rng.shuffle(pieces)
        for i in range(0, len(pieces), chunk):
            yield "".join(p if rng.random() < 0.5 else " " + p.strip() for p in pieces[i : i + chunk])


# ------------------------------------------------------------------------------------------ reference


def _lev(a: bytes, b: bytes) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def plain_python_dtw(pp: list[bytes], sp: list[bytes]) -> list[tuple[int, int]]:
    """The reference approach: the full matrix, one Python iteration and one Levenshtein per cell."""
    n, m = len(pp), len(sp)
    inf = float("inf")
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    for i in range(1, n + 1):
        a, row, prev = pp[i - 1], d[i], d[i - 1]
        for j in range(1, m + 1):
            b = sp[j - 1]
            cost = _lev(a, b) * (0.1 if (a in b or b in a) else 1.0)
            row[j] = cost + min(prev[j], row[j - 1], prev[j - 1])
    i, j, path = n, m, []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        opts = (d[i - 1][j - 1], d[i - 1][j], d[i][j - 1])
        mv = opts.index(min(opts))
        i, j = (i - 1, j - 1) if mv == 0 else (i - 1, j) if mv == 1 else (i, j - 1)
    return path[::-1]


# ------------------------------------------------------------------------------------------ main


def fusechat1_pieces(tokenizer, ids, marker: str) -> list[str]:
    """FuseChat-1.0's DTW strings: the token strings with the tokenizer's whitespace marker removed."""
    return [t.replace(marker, "") for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def reference_agreement(samples, aligned, ptok, stok) -> None:
    """Share of the FuseChat-1.0 / 2.0 reference DTW groups that ours reproduce (module docstring)."""
    if not samples:
        return
    rows: dict[str, dict[str, list]] = {k: {} for k in KINDS}
    c0 = time.process_time()
    for (kind, p, s), (off, dtw, dtw2) in zip(samples, aligned, strict=False):
        ref1 = align_dtw(
            fusechat1_pieces(ptok, p.input_ids, "▁"),
            fusechat1_pieces(stok, s.input_ids, "Ġ"),
            band=None,
            discount=0.1,
            ties="source",
        ).group_tuples()
        ref2 = align_dtw(
            decoded_pieces(ptok, p.input_ids), decoded_pieces(stok, s.input_ids), band=None, discount=1.0
        ).group_tuples()
        exact = off.group_tuples()
        for name, ours, ref in (
            ("dtw vs FuseChat-1.0", dtw.group_tuples(), ref1),
            ("dtw vs FuseChat-2.0", dtw.group_tuples(), ref2),
            ("dtw2 vs FuseChat-1.0", dtw2.group_tuples(), ref1),
            ("dtw2 vs FuseChat-2.0", dtw2.group_tuples(), ref2),
            ("FuseChat-1.0 vs offsets", ref1, exact),
            ("FuseChat-2.0 vs offsets", ref2, exact),
        ):
            rows[kind].setdefault(name, []).append(len(ours & ref) / len(ref))
    names = list(next(r for r in rows.values() if r))
    print(
        f"\nagreement with the reference DTWs (full matrix, their strings / cost / ties) on "
        f"{plural(len(samples), 'sample')}, {time.process_time() - c0:.0f} s CPU: share of the second's groups the first reproduces"
    )
    print("  " + " " * 24 + "".join(f"{k:>11s}" for k in KINDS) + "        all")
    for name in names:
        vals = [np.mean(rows[k][name]) if rows[k] else float("nan") for k in KINDS]
        every = np.mean([v for k in KINDS for v in rows[k].get(name, [])])
        print(f"  {name:24s}" + "".join(f"{v:11.1%}" for v in vals) + f"{every:11.1%}")


def timed(fn, *args, **kwargs):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.process_time() - c0, time.perf_counter() - w0


def report_statistics(what: str, stats: MappingStatistics) -> None:
    stats.compact()
    pairs_bytes = stats.keys.nbytes + stats.counts.nbytes + stats.start_counts.nbytes
    stats.best_pivot()
    in_mem = stats.nbytes
    disk = len(stats.to_bytes())
    print(f"\nmapping statistics 32k x 131k {what}: {stats.num_pairs:,} distinct pairs")
    print(
        f"  in memory {in_mem / 2**20:.2f} MiB ({pairs_bytes / 2**20:.2f} MiB pairs + "
        f"{(in_mem - pairs_bytes) / 2**20:.2f} MiB best-partner table), on disk {disk / 2**20:.2f} MiB "
        "(goal < 100 MB)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=48, help="2048-token samples (a third of each kind)")
    ap.add_argument(
        "--python-samples", type=int, default=2, help="full samples timed with the plain-Python DTW"
    )
    ap.add_argument(
        "--sweep-rounds", type=int, default=4, help="rounds of the vocabulary sweep (statistics size)"
    )
    ap.add_argument(
        "--reference-samples", type=int, default=12, help="samples aligned by the FuseChat-1.0/2.0 reference DTWs"
    )
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    ptok, stok = load_tokenizer("spm32k"), load_tokenizer("bpe131k")
    pt, st = TokenTable.from_tokenizer(ptok), TokenTable.from_tokenizer(stok)
    rng, nrng = random.Random(args.seed), np.random.default_rng(args.seed)
    samples = []
    for i in range(args.samples):
        kind = KINDS[i % len(KINDS)]
        text = cut_to_tokens(ptok, MAKERS[kind], rng, TOKENS)
        sid = f"{kind}-{i}"
        samples.append((kind, scored(ptok, text, sid, args.k, nrng), scored(stok, text, sid, args.k, nrng)))
    n = len(samples)
    src_tokens = np.mean([len(s.input_ids) for _, _, s in samples])
    print(
        f"{n} samples of {TOKENS} pivot tokens (spm32k), {src_tokens:.0f} source tokens (bpe131k) on average; "
        "one thread; CPU time of this process"
    )

    # warm-up (tokenizer caches, first numpy calls), not timed
    align_sample(samples[0][1], samples[0][2], ptok, stok, "offsets")
    align_sample(samples[0][1], samples[0][2], ptok, stok, "dtw")

    stats = MappingStatistics(pt.vocab_size, st.vocab_size)
    cpu = {"offsets": 0.0, "dtw": 0.0, "dtw2": 0.0}
    wall = {"offsets": 0.0, "dtw": 0.0, "dtw2": 0.0}
    aligned = []
    per_kind: dict[str, dict[str, list]] = {
        k: {"agree": [], "chars": [], "aligned": [], "groups": []} for k in KINDS
    }
    for kind, p, s in samples:
        off, c, w = timed(align_sample, p, s, ptok, stok, "offsets")
        cpu["offsets"] += c
        wall["offsets"] += w
        dtw, c, w = timed(align_sample, p, s, ptok, stok, "dtw")
        cpu["dtw"] += c
        wall["dtw"] += w
        dtw2, c, w = timed(align_sample, p, s, ptok, stok, "dtw2")
        cpu["dtw2"] += c
        wall["dtw2"] += w
        aligned.append((off, dtw, dtw2))
        stats.add(off, p.input_ids, s.input_ids)
        pk = per_kind[kind]
        pk["agree"].append(len(off.group_tuples() & dtw.group_tuples()) / off.num_groups)
        pk["chars"].append(off.coverage["chars"])
        pk["aligned"].append(off.coverage["chars_aligned"])
        pk["groups"].append(np.array(list(off.kind_counts().values())))

    ms = build_vocab_map("ms", pt, st, stats)
    fuse_cpu = 0.0
    for _, p, s in samples:

        def one(p=p, s=s):
            a = align_sample(p, s, ptok, stok, "offsets")
            return fuse_sample(p, [align_distributions(p, s, a, ms, k=args.k)], "mince")

        _, c, _ = timed(one)
        fuse_cpu += c

    per = {m: cpu[m] / n for m in cpu}
    print("\nper 2048-token sample:")
    for m in ("offsets", "dtw", "dtw2"):
        print(
            f"  {m:8s} {per[m] * 1e3:8.1f} ms CPU  ({n / cpu[m]:7.1f} samples/s per core; "
            f"wall {wall[m] / n * 1e3:.1f} ms)"
        )
    print(
        f"  {'fuse':8s} {fuse_cpu / n * 1e3:8.1f} ms CPU  ({n / fuse_cpu:7.1f} samples/s per core: offsets + MS "
        f"map + MinCE, k={args.k})"
    )

    print(
        "\nper text kind (offsets): characters aligned; groups 1-1/1-n/n-1/n-m; dtw reproduces offsets groups"
    )
    for kind in KINDS:
        pk = per_kind[kind]
        if not pk["chars"]:
            continue
        g = np.sum(pk["groups"], axis=0)
        shares = "/".join(f"{x:.1%}" for x in g / g.sum())
        print(
            f"  {kind:10s} {sum(pk['aligned']) / sum(pk['chars']):.4%} aligned; groups {shares}; "
            f"dtw agreement {np.mean(pk['agree']):.1%}"
        )
    print(f"  all        dtw agreement {np.mean([a for k in KINDS for a in per_kind[k]['agree']]):.1%}")

    reference_agreement(samples[: args.reference_samples], aligned, ptok, stok)

    print(
        f"\nplain-Python DTW (full matrix, Python Levenshtein per cell) on "
        f"{plural(args.python_samples, 'full sample')}:"
    )
    ref_cpu = []
    for i in range(args.python_samples):
        kind, p, s = samples[i % n]
        pp, sp = dtw_pieces(pt, p.input_ids), dtw_pieces(st, s.input_ids)
        _, c, _ = timed(plain_python_dtw, pp, sp)
        ref_cpu.append(c)
        print(f"  {kind:10s} {len(pp)} x {len(sp)} cells: {c:.1f} s CPU")
    if ref_cpu:
        ref = float(np.mean(ref_cpu))
        print(f"  mean {ref:.1f} s per sample")
        print("\nspeed-up per sample over the plain-Python DTW:")
        print(f"  offsets {ref / per['offsets']:9,.0f}x   (goal >= 1000x)")
        print(f"  dtw     {ref / per['dtw']:9,.0f}x   (goal >= 30x)")
        print(f"  dtw2    {ref / per['dtw2']:9,.0f}x")
        print(f"  fuse    {ref / (fuse_cpu / n):9,.0f}x   (the whole per-sample fusion, offsets alignment)")

    report_statistics(f"over the {n} samples ({n * TOKENS:,} pivot tokens)", stats)
    if args.sweep_rounds:
        sweep = MappingStatistics(pt.vocab_size, st.vocab_size)
        c0 = time.process_time()
        for text in vocabulary_sweep(ptok, stok, args.sweep_rounds, rng):
            p, s = scored(ptok, text, "sweep", 2, nrng), scored(stok, text, "sweep", 2, nrng)
            sweep.add(align_sample(p, s, ptok, stok, "offsets"), p.input_ids, s.input_ids)
        report_statistics(
            f"over a vocabulary sweep ({args.sweep_rounds} rounds of every token of both vocabularies, "
            f"shuffled; {time.process_time() - c0:.0f} s CPU)",
            sweep,
        )
    print(
        f"  12 bytes per distinct pair: 100 MB holds {100e6 / 12 / 1e6:.1f}M pairs, "
        f"{100e6 / 12 / st.vocab_size:.0f} pivot partners for every source token; a dense uint32 matrix "
        f"would be {pt.vocab_size * st.vocab_size * 4 / 2**30:.1f} GiB"
    )


if __name__ == "__main__":
    main()
