"""What identifies a tokenizer in a logits dataset's meta (`LogitsMeta.tokenizer_fingerprint`)."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash (16 hex) of the vocabulary and special tokens of a transformers tokenizer: two
    tokenizers with equal fingerprints tokenise identically for our purposes. Written by `extract` and by
    `store import`; checked by fusion and the trainer."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(
        {"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": sorted(tokenizer.all_special_tokens)},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
