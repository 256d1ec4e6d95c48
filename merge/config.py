"""The merge config: mergekit's YAML shape, validated with pydantic at the edge.

    merge_method: sce
    base_model: ./pivot
    models:
      - model: ./target_a
        parameters: {weight: 1.0}
      - model: ./target_b
    parameters: {select_topk: 0.1}
    dtype: bfloat16

Method parameters are validated against the method's signature when the merge is bound (`merge.engine`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge.errors import MergeError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
}
DtypeName = Literal["bfloat16", "bf16", "float16", "fp16", "float32", "fp32", "float64"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Path
    parameters: dict[str, Any] = Field(default_factory=dict)


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: Path
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: DtypeName | None = None  # output dtype; default: the base model's
    out_dtype: DtypeName | None = None  # mergekit's name for the output dtype; wins over `dtype`

    @property
    def output_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None


def one_line(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    if not isinstance(data, dict):
        raise MergeError(f"{source}: expected a mapping with merge_method, base_model and models")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise MergeError(f"{source}: {one_line(e)}") from None


def load_config(path: Path | str) -> MergeConfig:
    """Reads a YAML merge config; relative model paths are resolved against the config file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise MergeError(f"{path}: cannot read merge config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    config = parse_config(data, str(path))
    root = path.parent

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else root / p

    return config.model_copy(
        update={
            "base_model": resolve(config.base_model),
            "models": [m.model_copy(update={"model": resolve(m.model)}) for m in config.models],
        }
    )
