"""The committed real chat dataset (`clients/data/smollm2_chats_*.jsonl`): prompts the project wrote, replies
SmolLM2-135M-Instruct sampled (`python -m clients.smollm2_chats`)."""

from __future__ import annotations

import numpy as np


def test_committed_chats_are_real_smollm2_replies():
    """The committed dataset: disjoint splits, every chat ends with a non-empty assistant reply, a share
    of multi-turn chats, the five prompt kinds in both splits."""
    from clients.smollm2_chats import SPLITS, load_chats
    from datastore.chat import parse_record

    splits = {name: load_chats(name) for name in SPLITS}
    assert len(splits["train"]) >= 190 and len(splits["heldout"]) >= 55
    firsts = {name: {r["messages"][0]["content"] for r in recs} for name, recs in splits.items()}
    assert not firsts["train"] & firsts["heldout"]
    for recs in splits.values():
        for r in recs:
            parse_record(r)
            roles = [m["role"] for m in r["messages"]]
            assert roles[::2] == ["user"] * (len(roles) // 2) and roles[1::2] == ["assistant"] * (len(roles) // 2)
            assert all(m["content"].strip() for m in r["messages"])
        assert {r["kind"] for r in recs} == {"fact", "howto", "code", "rewrite", "arithmetic"}
        assert 0.15 < np.mean([len(r["messages"]) == 4 for r in recs]) < 0.45
    # replies were sampled (temperature 0.7): they are what the model says, not checked answers; a
    # share of them reached the 80-token cap and say so
    cut = np.mean([not r["finished"] for recs in splits.values() for r in recs])
    assert 0 < cut < 0.9

