"""The logical record of one scored sample: what a teacher backend produces and what the datastore
stores and gives back. The physical encoding (quantised, compressed Parquet) lives in
`datastore.schema` / `datastore.codec`; every reader returns this record unchanged in meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScoredSample:
    """Top-k next-token distributions of one teacher over one sample (teacher forcing).

    Position ``t`` holds the distribution of the token at ``t + 1`` given ``input_ids[: t + 1]``.

    Attributes:
        sample_id: the dataset's key for the sample.
        input_ids: int32 ``[T]`` teacher tokens of the rendered sample, after truncation.
        loss_mask: bool ``[T]``; True where the token is a training target (assistant turn tokens,
            every token of a plain-text sample).
        positions: int32 ``[N]``, ascending, the scored positions ``t`` (``0 <= t < T - 1``). By
            default ``t`` such that ``loss_mask[t + 1]``; every ``t`` with ``--all-positions``.
        topk_ids: int32 ``[N, k]`` token ids, by descending log-probability.
        topk_logprobs: float32 ``[N, k]`` raw log-probabilities (fp32 log-softmax, no temperature).
        gold_logprob: float32 ``[N]`` log-probability of the actual next token ``input_ids[t + 1]``.
        text: the rendered text the tokens come from (chat template applied), or None.
        assistant_spans: int32 ``[S, 2]`` character spans ``[start, end)`` of assistant content in
            ``text`` (the part whose text is identical whatever the template); empty for plain text.
        truncated: True when the rendered sample was longer than ``max_length`` and was cut.
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    gold_logprob: np.ndarray
    text: str | None = None
    assistant_spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int32))
    truncated: bool = False

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
