"""Hugging Face transformers backend: runs anywhere torch runs (CPU, one GPU).

The decoder runs once per batch; the LM head, fp32 log-softmax and top-k run only at the scored
positions, `chunk_positions` rows at a time, so the `[batch, length, vocab]` fp32 logits tensor is
never built (for a 128k vocabulary it would be 0.5 MB per token).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datastore.errors import UserError
from teacher_server.backends.base import Backend, TopK
from teacher_server.backends.head import head_topk, split_per_sample
from teacher_server.render import TokenizedSample
from teacher_server.weights import weights_revision

__all__ = ["DTYPES", "HFBackend", "describe_model", "weights_revision"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class HFBackend(Backend):
    def __init__(
        self,
        model: str | Path,
        dtype: str = "float32",
        device: str | None = None,
        chunk_positions: int = 1024,
        model_obj=None,
        tokenizer=None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_path = str(model)
        try:
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            self.model = model_obj or AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype])
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"teacher {model}: cannot load a model and tokenizer from it ({first})") from e
        self.model.to(self.device).eval()
        self.chunk_positions = chunk_positions
        self._revision = weights_revision(model)
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states `[B, T, H]` of the decoder, without the LM head."""
        out = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    @torch.inference_mode()
    def score(self, batch: list[TokenizedSample], k: int) -> list[TopK]:
        if k < 1 or k > self.vocab_size:
            raise UserError(f"k={k}: must be between 1 and the vocabulary size {self.vocab_size}")
        lengths = [s.num_tokens for s in batch]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            # Right padding: a causal model's outputs at real positions do not see the pad tokens.
            ids[i, : lengths[i]] = torch.from_numpy(s.input_ids.astype(np.int64))
            mask[i, : lengths[i]] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.hidden_states(ids, mask)

        rows = torch.cat([torch.full((len(s.positions),), i, dtype=torch.long) for i, s in enumerate(batch)])
        cols = torch.cat([torch.from_numpy(s.positions.astype(np.int64)) for s in batch])
        rows, cols = rows.to(self.device), cols.to(self.device)
        gold = ids[rows, cols + 1]
        lm_head = self.model.get_output_embeddings()
        plain = isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None  # then its weight is the head
        out = head_topk(hidden[rows, cols], gold, lm_head.weight if plain else lm_head, k,
                        self.chunk_positions, self._softcap, self.before_chunk)
        return split_per_sample(batch, *out)

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def describe_model(model_dir: str | Path) -> dict:
    """Architecture facts recorded in manifests and shown by `GET /v1/teachers`."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return {}
    cfg = json.loads(cfg_path.read_text())
    return {k: cfg.get(k) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers") if k in cfg}
