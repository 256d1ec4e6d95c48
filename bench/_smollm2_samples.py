"""Scored samples from the real chat model SmolLM2-135M-Instruct (`clients.smollm2.smollm2_dir()`), for
benchmarks whose figures depend on what real distributions look like (the codec).

The text is the project's own, so nothing is downloaded: English prose (the Markdown pages under `docs/`
and the README, cut into paragraphs), Python code (the project's `.py` files, cut at blank lines), and
chats whose prompts this file writes and whose answers SmolLM2 samples itself (seeded), scored on the
assistant turns. Prose and code are plain-text samples, scored at every position.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from _teacher_samples import score_with_entropy

from datastore.sample import ScoredSample

ROOT = Path(__file__).resolve().parents[1]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences what a hash table is.",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do I make a cup of green tea?",
    "What does HTTP status code 404 mean?",
    "Name three planets of the solar system and one fact about each.",
    "How can I improve my writing?",
    "Explain recursion to a ten-year-old.",
    "What are the benefits of regular exercise?",
    "Write a haiku about autumn.",
    "What is machine learning?",
    "How does a refrigerator keep food cold?",
    "Translate 'good morning' into Spanish and French.",
    "What is the boiling point of water at sea level?",
    "Suggest a name for a coffee shop near the sea.",
    "How do vaccines work?",
    "What is a prime number? Give two examples.",
    "Describe a sunset over the mountains.",
    "What is the Pythagorean theorem?",
    "How should I prepare for a job interview?",
]


def _chunks(text: str, sep: str, max_chars: int) -> list[str]:
    """Consecutive pieces of `text` split at `sep`, each up to ~max_chars."""
    out, cur = [], ""
    for part in text.split(sep):
        if cur and len(cur) + len(part) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}{sep}{part}" if cur else part
    if cur.strip():
        out.append(cur)
    return [c for c in out if c.strip()]


def project_texts() -> tuple[list[dict], list[dict]]:
    """(prose records, code records) from the repository's own docs and Python files, sorted by path."""
    prose, code = [], []
    for p in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        for i, c in enumerate(_chunks(p.read_text(encoding="utf-8"), "\n\n", 1600)):
            prose.append({"id": f"prose-{p.stem}-{i}", "text": c})
    for d in ("datastore", "teacher_server", "fusion", "trainer", "merge", "clients"):
        for p in sorted((ROOT / d).glob("*.py")):
            for i, c in enumerate(_chunks(p.read_text(encoding="utf-8"), "\n\n", 1600)):
                code.append({"id": f"code-{d}-{p.stem}-{i}", "text": c})
    return prose, code


def sampled_chats(
    model, tok, n: int, seed: int = 0, max_new_tokens: int = 48, part: int = 0, parts: int = 1
) -> list[dict]:
    """`n` chats: one project-written prompt each, answered by the model (seeded multinomial sampling,
    temperature 0.7, top-p 0.9, ChatML template); only every parts-th from the part-th."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        chat_seed = rng.randrange(2**31)
        if i % parts != part:
            continue
        prompt = CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
        messages = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
        torch.manual_seed(chat_seed)
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                                 pad_token_id=tok.eos_token_id)
        answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        out.append({"id": f"chat-{i:03d}", "messages": messages + [{"role": "assistant", "content": answer}]})
    return out


def load_samples(
    n_positions: int = 30_000, k: int = 10, n_chats: int = 16, part: int = 0, parts: int = 1
) -> tuple[list[ScoredSample], float]:
    """About `n_positions` scored positions (chats first, then prose and code interleaved) at top-`k`,
    fp32 straight from the HF backend, and the model's mean full-vocabulary entropy (nats) over the first
    3000. `part` of `parts`: every parts-th sample from the part-th (to score in several processes)."""
    from clients.smollm2 import smollm2_dir
    from datastore.chat import parse_record
    from teacher_server.backends.hf import HFBackend
    from teacher_server.render import resolve_template, tokenize_sample

    backend = HFBackend(smollm2_dir(), device="cpu")
    tok = backend.tokenizer
    template = resolve_template("model", tok)
    prose, code = project_texts()
    chats = sampled_chats(backend.model, tok, n_chats, part=part, parts=parts)
    records = []
    for i in range(max(len(prose), len(code))):  # interleave, so a prefix of the list mixes both
        records += [r[i] for r in (prose, code) if i < len(r)]
    records = chats + records[part::parts]
    tokenized, total = [], 0
    for r in records:
        ts = tokenize_sample(parse_record(r), tok, template, 1024)
        tokenized.append(ts)
        total += len(ts.positions)
        if total >= n_positions // parts:
            break
    return score_with_entropy(backend, tokenized, k, 4096, entropy_positions=3000 // parts)
