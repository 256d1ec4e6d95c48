"""The one interface every teacher backend implements: tokenised samples in, per-position top-k out.

A backend knows nothing about HTTP, datasets or storage (vLLM's engine/entrypoint split). The
extraction driver (`teacher_server.extract`) forms the batches and writes the results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from teacher_server.render import TokenizedSample


@dataclass
class TopK:
    """Scores of one sample at its `positions`: raw fp32 log-probabilities, no temperature."""

    topk_ids: np.ndarray  # int32 [N, k], by descending log-probability
    topk_logprobs: np.ndarray  # float32 [N, k]
    gold_logprob: np.ndarray  # float32 [N], log p(input_ids[t + 1]) at each scored position t


class Backend(ABC):
    """A loaded teacher model that scores batches of tokenised samples."""

    #: the tokenizer whose ids the backend consumes (a `transformers` fast tokenizer)
    tokenizer: object
    #: True when a batch costs its real tokens only (the engine packs sequences without padding, as
    #: vLLM does): extraction then fills batches up to `batch_tokens` real tokens (`plan_batches`)
    packs_sequences: bool = False
    #: called before each chunk of the LM head (`backends.head.head_topk`), or None: the service's cancel
    #: watch sets it to raise once a job is cancelled, so a long head stops within one chunk
    before_chunk: Callable[[], None] | None = None

    @abstractmethod
    def score(self, batch: list[TokenizedSample], k: int) -> list[TopK]:
        """Top-k next-token log-probabilities at each sample's scored positions, one `TopK` per sample."""

    @property
    def revision(self) -> str:
        """An identifier of the weights (commit hash or a hash of the files), recorded in manifests."""
        return "unknown"

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to release
        """Release the model's memory."""
