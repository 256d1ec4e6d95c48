"""A small real chat dataset: prompts the project writes, assistant turns sampled from SmolLM2-135M-Instruct.

The prompts come from fixed lists below (facts, how-to questions, short code questions, rewriting,
arithmetic), combined by a seeded `random.Random`; about a third of the chats get a second user turn (a
follow-up), answered by the model in a second sampling round. The assistant turns are what a real chat
model says, so distillation figures measured on them (KL to SmolLM2, loss) mean something.

Sampling: `transformers` `generate` with `do_sample=True`, temperature 0.7, top-p 0.9, at most 80 new
tokens per turn, prompts rendered with SmolLM2's own ChatML template (its default system prompt
included), batches of 32 prompts of similar length (left padding), `torch.manual_seed(seed + batch
index)` before each batch, one torch thread per process. The same command on the same torch/transformers
versions and CPU gives the same file (a killed and resumed run reproduced its first three batches token
for token); other versions or hardware can change the sampled text (floating point).

The committed files (`clients/data/smollm2_chats_{train,heldout}.jsonl`) were made by

    python -m clients.smollm2_chats --out-dir clients/data --workers 9

(260 chats; `--workers` only spreads the batches over processes, the output is the same for any value;
`--cache-dir DIR` keeps finished batches so an interrupted run resumes). The train and held-out prompts
are disjoint.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

SPLITS = {"train": 200, "heldout": 60}
TEMPERATURE = 0.7
TOP_P = 0.9
MAX_NEW_TOKENS = 80
SEED = 2026
FOLLOWUP_SHARE = 0.3

_COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Brazil", "Brasilia"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Mexico", "Mexico City"), ("India", "New Delhi"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"),
    ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Peru", "Lima"),
]
_FACT_QUESTIONS = [
    "What is the capital of {country}?",
    "Which continent is {country} in?",
    "What language do people speak in {country}?",
    "Tell me one interesting fact about {country}.",
]
_SCIENCE = [
    "What is photosynthesis?", "Why is the sky blue?", "What is the boiling point of water at sea level?",
    "How many planets are in the solar system?", "What is gravity?", "What does DNA stand for?",
    "Why do we have seasons?", "What is the largest ocean on Earth?", "How does a rainbow form?",
    "What is the speed of light?", "What are the three states of matter?", "Why do leaves change colour in autumn?",
    "What is an atom made of?", "How do vaccines work?", "What causes thunder?", "What is the tallest mountain in the world?",
    "How long does it take the Earth to orbit the Sun?", "What is the chemical symbol for gold?",
    "What do bees make?", "Why is the ocean salty?", "What is a black hole?", "How do plants drink water?",
    "Who painted the Mona Lisa?", "Who wrote Romeo and Juliet?", "When did the first person walk on the Moon?",
    "What is the largest animal on Earth?", "What is the freezing point of water in Fahrenheit?",
    "What is a volcano?", "How many bones does an adult human have?", "What is the main gas in the air we breathe?",
]
_HOWTO_TASKS = [
    "make a cup of tea", "boil an egg", "plant tomatoes", "tie a tie", "save money each month",
    "learn a new language", "fall asleep faster", "clean a laptop keyboard", "write a good email",
    "prepare for a job interview", "start running", "keep a houseplant alive", "make pancakes",
    "study for an exam", "change a flat bicycle tyre", "reduce stress at work", "organise my desk",
    "write a short story", "make a paper airplane", "bake bread at home", "remember names better",
    "pack for a weekend trip", "stay focused while working from home", "cook rice",
]
_HOWTO_FORMS = [
    "How do I {task}?", "Give me three tips to {task}.", "What are the steps to {task}?",
    "Can you explain how to {task}?",
]
_CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the largest item in a list",
    "counts the vowels in a string", "computes the factorial of n", "removes duplicates from a list",
    "checks whether a word is a palindrome", "sums the even numbers in a list", "converts Celsius to Fahrenheit",
    "returns the n-th Fibonacci number", "sorts a list of names alphabetically", "counts words in a sentence",
    "merges two dictionaries", "finds the average of a list of numbers", "capitalises every word in a string",
    "checks whether a year is a leap year",
]
_CODE_FORMS = ["Write a Python function that {task}.", "Show me a short Python example that {task}."]
_CODE_QUESTIONS = [
    "What does the len() function do in Python?", "What is the difference between a list and a tuple in Python?",
    "What is a for loop?", "How do I read a file in Python?", "What does `print('hi' * 3)` output in Python?",
    "What is a variable in programming?", "What is recursion?", "What does HTML stand for?",
    "How do I install a package with pip?", "What is a dictionary in Python?", "What is an if statement?",
    "What does the `return` keyword do?",
]
_SENTENCES = [
    "i cant come to the meeting tomorrow because im sick",
    "The movie was very very good and I liked it a lot.",
    "We need to finish the report before Friday or the boss will be angry.",
    "hey, can u send me the file asap",
    "The weather today is nice so we go to the park.",
    "Our team has completed the project ahead of schedule.",
    "He don't know where the keys is.",
    "The cat sat on the mat and looked at the bird outside.",
    "Please remember to bring your laptop to the workshop.",
    "I think that maybe we should perhaps consider changing the plan.",
    "The restaurant was crowded, but the food was excellent.",
    "She has been learning to play the piano for three years.",
]
_REWRITE_FORMS = [
    "Rewrite this sentence more formally: {s}", "Fix the grammar in this sentence: {s}",
    "Make this sentence shorter: {s}", "Rewrite this sentence in a friendly tone: {s}",
    "Summarise this in five words or fewer: {s}",
]
_FOLLOWUPS = [
    "Can you explain that more simply?", "Can you give me an example?", "Thanks! Can you make it shorter?",
    "Why is that?", "Can you say that in one sentence?", "Is there anything else I should know?",
    "Great, thank you. What is a common mistake people make here?",
]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    form = rng.randrange(5)
    if form == 0:
        return f"What is {a} + {b}?"
    if form == 1:
        return f"What is {max(a, b)} - {min(a, b)}?"
    if form == 2:
        return f"What is {a % 13 + 2} times {b % 12 + 2}?"
    if form == 3:
        return f"If I have {a + b} apples and give away {b}, how many apples do I have left?"
    return f"A book costs {a % 20 + 3} dollars. How much do {b % 6 + 2} books cost?"


def _prompt_pool(seed: int) -> list[tuple[str, str]]:
    """Every distinct (kind, first user message) the lists make, plus up to 60 random arithmetic questions,
    in a seeded order (so that each split mixes the kinds)."""
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = {
        "fact": [q.format(country=c) for c, _ in _COUNTRIES for q in _FACT_QUESTIONS] + list(_SCIENCE),
        "howto": [f.format(task=t) for t in _HOWTO_TASKS for f in _HOWTO_FORMS],
        "code": [f.format(task=t) for t in _CODE_TASKS for f in _CODE_FORMS] + list(_CODE_QUESTIONS),
        "rewrite": [f.format(s=s) for s in _SENTENCES for f in _REWRITE_FORMS],
        "arithmetic": sorted({_arithmetic(rng) for _ in range(60)}),
    }
    pool = [(kind, p) for kind, prompts in by_kind.items() for p in prompts]
    rng.shuffle(pool)
    return pool


def chat_prompts(splits: dict[str, int] | None = None, seed: int = SEED,
                 followup_share: float = FOLLOWUP_SHARE) -> dict[str, list[dict]]:
    """The prompts of each split: `{"train": [...], "heldout": [...]}`, disjoint first user messages.

    Each item: `{"id", "kind", "messages": [{"role": "user", "content"}], "followup": str | None}`
    (`followup`: the second user turn for multi-turn chats, about `followup_share` of them; the first
    turns do not depend on it).
    Raises ValueError if the splits ask for more distinct prompts than the lists make.
    """
    splits = dict(splits or SPLITS)
    pool = _prompt_pool(seed)
    need = sum(splits.values())
    if need > len(pool):
        raise ValueError(f"{need} prompts asked for, the lists make {len(pool)}")
    rng = random.Random(seed + 1)
    out: dict[str, list[dict]] = {}
    start = 0
    for name, n in splits.items():
        items = []
        for j, (kind, text) in enumerate(pool[start : start + n]):
            follow = rng.choice(_FOLLOWUPS) if rng.random() < followup_share else None
            items.append({"id": f"{name}-{j:04d}", "kind": kind, "messages": [{"role": "user", "content": text}],
                          "followup": follow})
        out[name] = items
        start += n
    return out


_WORKER: dict = {}


def _worker_init(model_dir: str, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    _WORKER["tokenizer"] = AutoTokenizer.from_pretrained(model_dir)
    _WORKER["model"] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _sample_batch(texts: list[str], seed: int, temperature: float, top_p: float,
                  max_new_tokens: int) -> tuple[list[tuple[str, bool]], int, float]:
    """One batch in the worker: `(reply, finished)` per text, tokens made, seconds."""
    import torch

    model, tokenizer = _WORKER["model"], _WORKER["tokenizer"]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    results, made = [], 0
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        stop = next((j for j, t in enumerate(row) if t in end_ids), None)
        made += len(row) if stop is None else stop + 1
        text = tokenizer.decode(row if stop is None else row[:stop], skip_special_tokens=True).strip()
        results.append((text, stop is not None))
    return results, made, time.perf_counter() - t0


def sample_responses(model_dir: str | Path, conversations: list[list[dict]], seed: int, *,
                     temperature: float = TEMPERATURE, top_p: float = TOP_P, max_new_tokens: int = MAX_NEW_TOKENS,
                     batch_size: int = 32, workers: int = 1, threads: int = 1, cache_dir: Path | None = None,
                     log: Callable[[str], None] | None = None) -> list[tuple[str, bool]]:
    """Sample one assistant turn for each conversation (each ends with a user turn) from the model in
    `model_dir`.

    Conversations are rendered with the tokenizer's chat template (generation prompt added), sorted by
    length and cut into batches of `batch_size` (left padding); batch b is sampled after
    `torch.manual_seed(seed + b)`. `workers` processes (each loading the model, `threads` torch threads)
    share the batches; the result does not depend on `workers`. Returns, in the input order,
    `(text, finished)`: the decoded reply without special tokens, stripped, and whether the model ended
    the turn itself (False: cut at `max_new_tokens`). With `cache_dir`, each finished batch is kept there
    (keyed by its prompts, seed and sampling settings), so an interrupted run resumes where it stopped.
    """
    import hashlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rendered]
    order = sorted(range(len(rendered)), key=lambda i: (lengths[i], i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[tuple[str, bool]] = [("", False)] * len(rendered)
    def key(b: int, idx: list[int]) -> Path | None:
        if cache_dir is None:
            return None
        spec = json.dumps([[rendered[i] for i in idx], seed + b, temperature, top_p, max_new_tokens,
                           str(model_dir)])
        return Path(cache_dir) / f"{hashlib.sha256(spec.encode()).hexdigest()[:24]}.json"

    todo = []
    for b, idx in enumerate(batches):
        path = key(b, idx)
        if path is not None and path.is_file():
            for i, r in zip(idx, json.loads(path.read_text()), strict=True):
                results[i] = (r[0], bool(r[1]))
        else:
            todo.append(b)
    if log and len(todo) < len(batches):
        log(f"{len(batches) - len(todo)} of {len(batches)} batches taken from {cache_dir}")
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                                 initargs=(str(model_dir), threads)) as pool:
            futures = {b: pool.submit(_sample_batch, [rendered[i] for i in batches[b]], seed + b, temperature,
                                      top_p, max_new_tokens) for b in todo}
            for b, fut in futures.items():
                replies, made, dt = fut.result()
                for i, r in zip(batches[b], replies, strict=True):
                    results[i] = r
                path = key(b, batches[b])
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(replies))
                    tmp.replace(path)
                if log:
                    log(f"batch {b + 1}/{len(batches)}: {len(batches[b])} replies, {made} tokens, {made / dt:.1f} tok/s")
    return results


def generate_chats(model_dir: str | Path, splits: dict[str, int] | None = None, seed: int = SEED,
                   batch_size: int = 32, workers: int = 1, cache_dir: Path | None = None,
                   followup_share: float = FOLLOWUP_SHARE, log: Callable[[str], None] | None = None
                   ) -> dict[str, list[dict]]:
    """Prompts from `chat_prompts` answered by the model in `model_dir` (SmolLM2-135M-Instruct).

    Returns `{split: [record]}`; each record is a chat sample `extract` reads: `id`, `messages` (user,
    assistant[, user, assistant]), plus `kind` and `finished` (False where a reply hit the token cap).
    Replies that come out empty are not kept (the split is then shorter; reported through `log`).
    """
    prompts = chat_prompts(splits, seed, followup_share)
    items = [p for split in prompts.values() for p in split]
    first = sample_responses(model_dir, [p["messages"] for p in items], seed, batch_size=batch_size,
                             workers=workers, cache_dir=cache_dir, log=log)
    convs, finished = {}, {}
    for p, (text, done) in zip(items, first, strict=True):
        convs[p["id"]] = [*p["messages"], {"role": "assistant", "content": text}]
        finished[p["id"]] = done
    multi = [p for p in items if p["followup"] and convs[p["id"]][-1]["content"]]
    second_in = [[*convs[p["id"]], {"role": "user", "content": p["followup"]}] for p in multi]
    second = sample_responses(model_dir, second_in, seed + 10_000, batch_size=batch_size, workers=workers,
                              cache_dir=cache_dir, log=log) if second_in else []
    for p, conv, (text, done) in zip(multi, second_in, second, strict=True):
        if text:
            convs[p["id"]] = [*conv, {"role": "assistant", "content": text}]
            finished[p["id"]] = finished[p["id"]] and done
    out: dict[str, list[dict]] = {}
    for name, split in prompts.items():
        recs = [{"id": p["id"], "kind": p["kind"], "messages": convs[p["id"]], "finished": finished[p["id"]]}
                for p in split if all(m["content"] for m in convs[p["id"]])]
        if log and len(recs) < len(split):
            log(f"{name}: {len(split) - len(recs)} chats dropped (empty reply)")
        out[name] = recs
    return out


def data_path(split: str) -> Path:
    """Path of the committed JSONL file of `split` ("train" or "heldout") inside the installed package."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return Path(str(resources.files("clients") / "data" / f"smollm2_chats_{split}.jsonl"))


def load_chats(split: str) -> list[dict]:
    """The committed records of `split` (see `generate_chats` for their fields)."""
    with open(data_path(split), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m clients.smollm2_chats", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path("clients/data"))
    ap.add_argument("--train", type=int, default=SPLITS["train"])
    ap.add_argument("--heldout", type=int, default=SPLITS["heldout"])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1,
                    help="processes sampling batches in parallel (one torch thread each); same output for any value")
    ap.add_argument("--followup-share", type=float, default=FOLLOWUP_SHARE,
                    help="share of chats that get a second user turn (the first turns do not depend on it)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="keep finished batches here, so that an interrupted run resumes (default: none)")
    args = ap.parse_args(argv)
    from clients.smollm2 import smollm2_dir

    t0 = time.perf_counter()
    chats = generate_chats(smollm2_dir(), {"train": args.train, "heldout": args.heldout}, args.seed,
                           args.batch_size, args.workers, args.cache_dir, args.followup_share,
                           log=lambda m: print(m, flush=True))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, recs in chats.items():
        path = args.out_dir / f"smollm2_chats_{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(path)
        turns = sum(len(r["messages"]) // 2 for r in recs)
        print(f"{name}: {len(recs)} chats, {turns} assistant turns, "
              f"{sum(not r['finished'] for r in recs)} cut at {MAX_NEW_TOKENS} tokens -> {path}")
    print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
