"""The merge config: mergekit's YAML shape, validated with pydantic at the edge.

    merge_method: sce
    base_model: ./pivot
    models:
      - model: ./pivot               # the base may be listed among the models, as mergekit configs do
      - model: ./target_a
        parameters: {weight: 1.0}
      - model: ./target_b
    parameters: {select_topk: 0.1}
    dtype: bfloat16

A parameter value is a scalar, a gradient (a list of numbers interpolated over the layers), a filter
(`{filter: self_attn, value: 0.5}`) or a list of filters, the first whose `filter` is a substring of the
tensor name winning (mergekit's `ParameterSetting`; resolved per tensor in `merge.parameters`). Method
parameters are validated against the method's signature when the merge is planned (`merge.engine`).
mergekit-only keys (`slices`, `modules`, `tokenizer_source`, `tokenizer`, `chat_template`) are accepted
and make the merge run through mergekit itself (`merge.mergekit_bridge`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

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
# Top-level keys of mergekit's MergeConfiguration that only mergekit implements.
MERGEKIT_ONLY_KEYS = ("slices", "modules", "tokenizer_source", "tokenizer", "chat_template")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Path
    parameters: dict[str, Any] | None = Field(default_factory=dict)


class MergeConfig(BaseModel):
    """A validated merge config. `models` is None only for a `slices`/`modules` config (mergekit's)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: Path | None = None  # required by every method but linear
    models: list[ModelEntry] | None = None
    parameters: dict[str, Any] | None = Field(default_factory=dict)
    dtype: DtypeName | None = None  # output dtype; default: the base model's
    out_dtype: DtypeName | None = None  # mergekit's name for the output dtype; wins over `dtype`
    # mergekit-only features: kept as given and handed to mergekit.
    slices: list[Any] | None = None
    modules: dict[str, Any] | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    _source: str = PrivateAttr(default="config")  # where it came from: the YAML file, "flags", "config"

    @property
    def source(self) -> str:
        """Where the config came from (`parse_config`'s `source`: the YAML file's path, or "flags"), so
        that errors found later (a method's parameters, checked per tensor) name it too."""
        return self._source

    @model_validator(mode="after")
    def _inputs(self) -> MergeConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of models, slices or modules (got {', '.join(given) or 'none'})")
        if self.models is not None and not self.models:
            raise ValueError("models: List should have at least 1 item")
        return self

    @property
    def output_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    @property
    def mergekit_features(self) -> list[str]:
        """The mergekit-only keys this config sets (each one makes the merge run through mergekit)."""
        return [k for k in MERGEKIT_ONLY_KEYS if getattr(self, k) is not None]

    def to_mergekit(self) -> dict[str, Any]:
        """The config as a plain dict for `mergekit.config.MergeConfiguration` (paths as strings)."""
        return self.model_dump(mode="json", exclude_none=True)


def closest(name: str, accepted: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for the accepted name closest to `name`, or the list of accepted names."""
    match = difflib.get_close_matches(name, list(accepted), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (accepted: {', '.join(accepted) or 'none'})"


def one_line(e: ValidationError) -> str:
    def line(err) -> str:
        msg = err["msg"].removeprefix("Value error, ")
        return f"{'.'.join(str(p) for p in err['loc'])}: {msg}" if err["loc"] else msg

    return "; ".join(line(err) for err in e.errors())


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validates a mergekit-shaped config mapping; raises MergeError (one line) naming the bad key."""
    if not isinstance(data, dict):
        raise MergeError(f"{source}: expected a mapping with merge_method, base_model and models")
    accepted = list(MergeConfig.model_fields)
    for key in data:
        if key not in accepted:
            raise MergeError(f"{source}: unknown key {key!r}{closest(str(key), accepted)}")
    models = data.get("models")
    if models is not None and not isinstance(models, list):
        raise MergeError(f"{source}: models: expected a list of entries like {{model: DIR}}, got {models!r:.60}")
    for i, entry in enumerate(models or []):
        if isinstance(entry, dict):
            for key in entry:
                if key not in ModelEntry.model_fields:
                    raise MergeError(f"{source}: models[{i}]: unknown key {key!r}"
                                     f"{closest(str(key), list(ModelEntry.model_fields))}")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise MergeError(f"{source}: {one_line(e)}") from None
    config._source = source
    return config


def _resolve_paths(data: dict, root: Path) -> dict:
    """`data` with relative model paths made relative to `root` (the config's folder) where they exist there."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute() and (root / value).exists():
            return str(root / value)
        return value

    def fix_sources(items: Any) -> Any:
        if not isinstance(items, list):
            return items
        return [{**m, "model": fix(m.get("model"))} if isinstance(m, dict) and "model" in m else m for m in items]

    def fix_slices(slices: Any) -> Any:
        if not isinstance(slices, list):
            return slices
        out = []
        for s in slices:
            if isinstance(s, dict):
                s = {**s, "sources": fix_sources(s.get("sources"))} if "sources" in s else dict(s)
                if "base_model" in s:
                    s["base_model"] = fix(s["base_model"])
            out.append(s)
        return out

    data = dict(data)
    if "base_model" in data:
        data["base_model"] = fix(data["base_model"])
    if "models" in data:
        data["models"] = fix_sources(data["models"])
    if "slices" in data:
        data["slices"] = fix_slices(data["slices"])
    if isinstance(data.get("modules"), dict):
        data["modules"] = {
            k: {**v, "models": fix_sources(v.get("models")), "slices": fix_slices(v.get("slices"))}
            if isinstance(v, dict) else v
            for k, v in data["modules"].items()
        }
    if data.get("tokenizer_source") not in (None, "base", "union"):
        data["tokenizer_source"] = fix(data["tokenizer_source"])
    return data


def load_config(path: Path | str) -> MergeConfig:
    """Reads a YAML merge config; relative model paths that exist next to the config file are resolved
    against its folder (others are left as given: mergekit reads them as paths from the working directory
    or hub ids)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except RecursionError:
        raise MergeError(f"{path}: nested too deeply to be a merge config") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot read merge config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected a YAML merge config") \
            from None
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    _check_size(data, str(path))
    if isinstance(data, dict):
        data = _resolve_paths(data, path.parent)
    return parse_config(data, str(path))


#: a merge config's values after YAML aliases are expanded, and its nesting: far above any real config
#: (mergekit's largest examples hold a few hundred values), far below what makes checking it slow
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32


def _check_size(data: Any, source: str) -> None:
    """Raise `MergeError` when the config, its aliases (``&a`` / ``*a``) expanded, holds more than
    `MAX_CONFIG_VALUES` values or nests deeper than `MAX_CONFIG_DEPTH`: a 1 KB file of aliases that
    reference aliases expands to billions of values (checking it would never finish)."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise MergeError(f"{source}: more than {MAX_CONFIG_VALUES:,} values once YAML aliases are expanded; "
                             "a merge config holds a few hundred")
        if depth > MAX_CONFIG_DEPTH:
            raise MergeError(f"{source}: nested deeper than {MAX_CONFIG_DEPTH} levels; not a merge config")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
