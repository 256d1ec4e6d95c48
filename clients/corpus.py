"""Text the project generates itself: a small fictional world described in plain prose and in chat.

Tiny teachers are trained on it so that their distributions mean something (low entropy where the
world's facts decide the next word), and the demo, tests and benchmarks score it. Everything here
is produced by a seeded generator; no outside text is used.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CREATURES = [
    "fox", "owl", "otter", "heron", "badger", "lynx", "beaver", "raven", "hare", "marten",
    "stoat", "crane", "wolf", "seal", "moth", "newt", "wren", "bison", "ibis", "vole",
]
COLOURS = ["red", "grey", "brown", "white", "black", "golden", "silver", "green", "blue", "amber"]
PLACES = [
    "the northern forest", "the salt marsh", "the river delta", "the high meadow", "the old quarry",
    "the pine valley", "the frozen lake", "the sand dunes", "the birch grove", "the stony coast",
]
FOODS = [
    "berries", "small fish", "beetles", "acorns", "seeds", "roots", "clover", "snails", "mice", "moss",
]
HABITS = [
    "sleeps through the day", "hunts at dusk", "sings before dawn", "swims in cold water",
    "digs long tunnels", "travels in large groups", "stores food for winter", "builds a nest of reeds",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass(frozen=True)
class Creature:
    name: str
    colour: str
    place: str
    food: str
    habit: str
    count: int


def world(seed: int = 7) -> list[Creature]:
    """The fixed facts of the world: one colour, home, food, habit and litter size per creature."""
    rng = random.Random(seed)
    return [
        Creature(
            name=name,
            colour=rng.choice(COLOURS),
            place=rng.choice(PLACES),
            food=rng.choice(FOODS),
            habit=rng.choice(HABITS),
            count=rng.randint(1, 9),
        )
        for name in CREATURES
    ]


def _describe(c: Creature, rng: random.Random) -> str:
    sentences = [
        f"The {c.colour} {c.name} lives in {c.place}.",
        f"The {c.name} eats {c.food}.",
        f"Every {c.name} {c.habit}.",
        f"A {c.name} has {NUMBER_WORDS[c.count]} young each spring.",
        f"In {c.place} the {c.name} finds {c.food} near the water.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(2, 5)])


def _question(c: Creature, rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        return f"Where does the {c.name} live?", f"The {c.name} lives in {c.place}."
    if kind == 1:
        return f"What does the {c.name} eat?", f"The {c.name} eats {c.food}."
    if kind == 2:
        return f"What colour is the {c.name}?", f"The {c.name} is {c.colour}."
    if kind == 3:
        return (
            f"How many young does a {c.name} have?",
            f"A {c.name} has {NUMBER_WORDS[c.count]} young each spring.",
        )
    return f"Tell me about the {c.name}.", _describe(c, rng)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."


SYSTEM_PROMPTS = [
    "You are a helpful guide to the animals of the valley.",
    "Answer briefly and truthfully.",
]


def chat_samples(n: int, seed: int = 0, max_turns: int = 3) -> list[dict]:
    """`n` chat samples in the `messages` format: optional system, then 1..max_turns user/assistant turns."""
    facts = world()
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        messages: list[dict] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.randint(1, max_turns)):
            q, a = _arithmetic(rng) if rng.random() < 0.2 else _question(rng.choice(facts), rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        samples.append({"id": f"chat-{seed}-{i:05d}", "messages": messages})
    return samples


def text_samples(n: int, seed: int = 0, sentences: tuple[int, int] = (2, 8)) -> list[dict]:
    """`n` plain-text samples (`id`, `text`) describing creatures of the world."""
    facts = world()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = [_describe(rng.choice(facts), rng) for _ in range(rng.randint(*sentences))]
        out.append({"id": f"text-{seed}-{i:05d}", "text": " ".join(parts)})
    return out


def spread_samples(n: int, seed: int = 0, max_turns: int = 64) -> list[dict]:
    """Chat samples with a realistic spread of lengths, from one short turn to ~2k tokens (benchmarks).

    The number of turns is drawn log-uniformly, so short samples are common and long ones exist.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = max(1, int(2 ** rng.uniform(0, math.log2(max_turns))))
        s = chat_samples(1, seed=seed * 100_003 + i, max_turns=turns)[0]
        s["id"] = f"spread-{seed}-{i:05d}"
        out.append(s)
    return out


def training_texts(n: int, seed: int = 1) -> Iterator[str]:
    """Plain strings for pre-training a tiny teacher: prose and rendered-free chat answers mixed."""
    rng = random.Random(seed)
    prose = text_samples(n, seed=seed)
    chats = chat_samples(n, seed=seed + 1)
    for p, c in zip(prose, chats, strict=True):
        yield p["text"]
        yield " ".join(m["content"] for m in c["messages"] if m["role"] != "system")
        if rng.random() < 0.5:
            yield _arithmetic(rng)[1]


def write_jsonl(samples: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return path
