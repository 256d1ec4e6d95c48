"""Real tokenizers for tests and benches, from the files inside the mistral_common wheel (no downloads),
and text written for this repo to run them on.

- ``sentencepiece()``: the 32k SentencePiece model ``tokenizer.model.v1``. transformers 5 converts a
  ``tokenizer.model`` through protobuf, which is not installed (``AutoTokenizer`` then fails, and
  ``LlamaTokenizer(vocab_file=...)`` silently builds a 3-token vocabulary). Instead the pieces and scores
  are read with the ``sentencepiece`` library, the BPE merges are derived from them ordered by score
  (``generate_merges(vocab, scores)``), a fast ``LlamaTokenizer(vocab=..., merges=...)`` is built and saved
  as ``tokenizer.json``; ``AutoTokenizer`` loads that. It reproduces ``sentencepiece`` ids on ordinary
  text (runs of several spaces before a word may differ, as with Hugging Face's own Llama conversion).
- ``tekken()``: the 131k byte-level BPE ``tekken_240911.json`` copied to ``DIR/tekken.json``;
  ``AutoTokenizer.from_pretrained(DIR)`` loads it as a fast tokenizer with offsets.

Converted directories are cached under `clients.tiny_models.tokenizer_cache_dir()` (in tests: the session
cache under pytest's tmp path), the loaded tokenizers per process.
`scored` / `synthetic` build `ScoredSample`s with synthetic top-k for the fusion tests and bench.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from datastore.sample import ScoredSample


def _wheel_data() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


def _atomic_dir(name: str, build) -> Path:
    from clients.tiny_models import tokenizer_cache_dir

    cache = tokenizer_cache_dir() / "test-tokenizers-v1"
    final = cache / name
    if (final / ".done").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
    build(tmp)
    (tmp / ".done").touch()
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_sentencepiece(out: Path) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(_wheel_data() / "tokenizer.model.v1"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores)).save_pretrained(out)


def _build_tekken(out: Path) -> None:
    shutil.copy(_wheel_data() / "tekken_240911.json", out / "tekken.json")


@functools.cache
def sentencepiece():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_atomic_dir("sentencepiece-32k", _build_sentencepiece))


@functools.cache
def tekken():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_atomic_dir("tekken-131k", _build_tekken))
    tok.bos_token, tok.eos_token, tok.unk_token = "<s>", "</s>", "<unk>"  # tekken.json names no roles
    return tok


# ---------------------------------------------------------------------------------------------------
# text written for these tests

PROSE = (
    "The harbour was quiet before dawn, and the fishing boats rocked gently against their ropes. "
    "Mara counted the crates twice, because the ledger had been wrong on Tuesday and the buyer "
    "from the mainland was not a patient man. Gulls circled overhead; somewhere a radio played "
    'an old waltz. "We leave at six," she said, "whether the fog lifts or not." Her brother '
    "shrugged, tightened the last knot and didn't answer. By 5:45 the sky had turned the colour "
    "of weak tea, and the first engines coughed into life across the water.\n\n"
    "Knowledge fusion trains one small model on the blended predictions of several larger ones. "
    "Each teacher scores the same conversations; their top-k next-token distributions are aligned "
    "to the student's vocabulary, and the student learns from whichever teacher explained the "
    "reference answer best. It's cheaper than running every teacher at inference time (often 10x "
    "or more), and it keeps a single set of weights to deploy, test and maintain.\n"
)

CODE = '''def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping [start, end) intervals; the input need not be sorted."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class RingBuffer:
    def __init__(self, capacity=8):
        self._data = [None] * capacity
        self._head = 0  # index of the oldest element
        self._size = 0

    def push(self, item):
        i = (self._head + self._size) % len(self._data)
        if self._size == len(self._data):
            self._head = (self._head + 1) % len(self._data)
        else:
            self._size += 1
        self._data[i] = item

if __name__ == "__main__":
    print(merge_intervals([(5, 9), (1, 3), (2, 4)]))  # -> [(1, 4), (5, 9)]
    x = {"a": 1, 'b': [1.5e-3, -2], "c": None}; print(x)
'''

NON_LATIN = (
    "Сегодня утром мы проверили все расчёты ещё раз, и ошибок не нашли. "
    "Η θάλασσα ήταν ήρεμη και ο ουρανός καθαρός. "
    "我们明天早上八点在图书馆门口见面，请不要迟到。"
    "東京の空は今日も青く、駅前の桜が満開です。"
    "오늘 회의는 세 시에 시작합니다. "
    "مرحبا بكم في المكتبة العامة، الكتب على الرف الثالث. "
    "नमस्ते, आज मौसम बहुत अच्छा है। "
    "Emoji and symbols: 🙂🚀 ✓ ∑x² → ∞, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, café naïve façade, 1 000 € ≈ £850.\n"
)


def sample_text(min_chars: int, seed: int = 0) -> str:
    """Prose, code and non-Latin paragraphs shuffled and repeated with small variations up to ``min_chars``."""
    rng = random.Random(seed)
    parts = [PROSE, CODE, NON_LATIN]
    words = PROSE.split()
    out: list[str] = []
    size = 0
    while size < min_chars:
        part = rng.choice(parts)
        if rng.random() < 0.5:  # vary the text so that samples are not identical
            part = " ".join(rng.sample(words, 24)) + ".\n" + part
        out.append(part)
        size += len(part)
    return "".join(out)


def text_of_tokens(tokenizer, num_tokens: int, seed: int = 0) -> str:
    """A `sample_text` cut to about ``num_tokens`` tokens of ``tokenizer``."""
    text = sample_text(num_tokens * 5, seed)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return text[: offsets[min(num_tokens, len(offsets)) - 1][1]]


# ---------------------------------------------------------------------------------------------------
# scored samples with synthetic top-k (fusion tests and bench)


def scored(tokenizer, text, *, k=4, seed=0, spans=None, add_special=False, sample_id="s0") -> ScoredSample:
    """A `ScoredSample` of ``text``: at each position the gold next token with probability 0.5..0.7 and
    k - 1 other distinct ids with decreasing probabilities (sum < 1, as a real top-k)."""
    ids = np.asarray(tokenizer(text, add_special_tokens=add_special)["input_ids"], dtype=np.int32)
    return synthetic(ids, len(tokenizer), k=k, seed=seed, text=text, spans=spans, sample_id=sample_id)


def synthetic(
    ids, vocab, *, k=4, seed=0, text=None, spans=None, sample_id="s0", loss_mask=None
) -> ScoredSample:
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int32)
    n = ids.size - 1
    positions = np.arange(n, dtype=np.int32)
    gold = ids[1:].astype(np.int64)
    base = rng.integers(0, vocab, size=n)
    others = (base[:, None] + 1 + np.arange(k - 1)[None, :] * 7) % vocab
    others = np.where(others == gold[:, None], (others + 3) % vocab, others)
    topk_ids = np.concatenate([gold[:, None], others], axis=1).astype(np.int32)
    p0 = rng.uniform(0.5, 0.7, size=(n, 1))
    rest = (1 - p0) * 0.9 * (0.5 ** np.arange(1, k))[None, :]
    probs = np.concatenate([p0, rest], axis=1)
    # some positions where the gold token is not the favourite
    swap = rng.random(n) < 0.2
    probs[swap] = probs[swap][:, np.r_[1, 0, 2:k]] if k > 2 else probs[swap][:, ::-1]
    order = np.argsort(-probs, axis=1, kind="stable")
    topk_ids = np.take_along_axis(topk_ids, order, axis=1)
    logprobs = np.log(np.take_along_axis(probs, order, axis=1)).astype(np.float32)
    gold_lp = np.log(np.where(topk_ids == gold[:, None], np.exp(logprobs), 0).sum(axis=1)).astype(np.float32)
    return ScoredSample(
        sample_id=sample_id,
        input_ids=ids,
        loss_mask=np.ones(ids.size, dtype=bool) if loss_mask is None else np.asarray(loss_mask, dtype=bool),
        positions=positions,
        topk_ids=topk_ids,
        topk_logprobs=logprobs,
        gold_logprob=gold_lp,
        text=text,
        assistant_spans=np.asarray(spans if spans is not None else np.zeros((0, 2)), dtype=np.int32).reshape(
            -1, 2
        ),
    )


def levenshtein(a: bytes, b: bytes) -> int:
    """Edit distance, the textbook dynamic programme in plain Python: the tests' independent reference."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
