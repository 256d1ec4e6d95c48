"""The registry of merge methods: a name, a paper link and a typed keyword signature per method.

A method is one function `fn(param: ParameterStream, *, ...) -> Callable[[Chunk], Tensor]`: it computes any
whole-matrix statistics it needs and returns the function that merges one chunk. Its keyword parameters are
its config schema: global ones are plain typed keywords; those given per model (`weight`, `density`) are
annotated `PerModel[...]`, with the default applying to every model, and arrive as one value per target.
Adding a method is one new module under `merge/methods/` decorated with `@merge_method`.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from merge.errors import MergeError
from merge.stream import Chunk, ParameterStream

Combine = Callable[[Chunk], torch.Tensor]  # a chunk -> the merged parameter values for its elements, (n,)
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Weight = Annotated[float, Field(allow_inf_nan=False)]


class _PerModelMarker:
    pass


class PerModel:
    """`PerModel[X]` annotates a parameter given per model; the method receives `list[X]`, one per target."""

    def __class_getitem__(cls, item):
        return Annotated[list[item], _PerModelMarker]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Combine]
    paper: str
    uses_pivot: bool  # False: the base only supplies the tensor layout, config and tokenizer (linear)
    global_params: type[BaseModel]
    per_model_params: type[BaseModel]

    @property
    def per_model_names(self) -> tuple[str, ...]:
        return tuple(self.per_model_params.model_fields)

    @property
    def global_names(self) -> tuple[str, ...]:
        return tuple(self.global_params.model_fields)

    def bind(self, parameters: dict[str, Any], per_model: list[dict[str, Any]]) -> dict[str, Any]:
        """Validated keyword arguments for `fn` from a config's global and per-model parameters."""
        shared = {k: v for k, v in parameters.items() if k in self.per_model_names}
        rest = {k: v for k, v in parameters.items() if k not in self.per_model_names}
        kwargs = dict(_validate(self.global_params, rest, f"parameters of merge_method {self.name}"))
        columns: dict[str, list] = {name: [] for name in self.per_model_names}
        for i, own in enumerate(per_model):
            row = _validate(self.per_model_params, {**shared, **own}, f"parameters of models[{i}] ({self.name})")
            for name in self.per_model_names:
                columns[name].append(row[name])
        kwargs.update(columns)
        return {_PYTHON_NAMES.get(k, k): v for k, v in kwargs.items()}


def _validate(schema: type[BaseModel], values: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return schema.model_validate(values).model_dump()
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in e.errors()
        )
        accepted = ", ".join(schema.model_fields) or "none"
        raise MergeError(f"bad {where}: {problems} (accepted: {accepted})") from None


METHODS: dict[str, MergeMethod] = {}
# Config names that are Python keywords: the method's keyword is spelled with a trailing underscore.
_CONFIG_NAMES = {"lambda_": "lambda"}
_PYTHON_NAMES = {v: k for k, v in _CONFIG_NAMES.items()}


def merge_method(name: str, *, paper: str, uses_pivot: bool = True):
    """Registers a merge method under `name`; `paper` is the link printed by `--help` and the docs."""

    def register(fn: Callable[..., Combine]) -> Callable[..., Combine]:
        hints = typing.get_type_hints(fn, include_extras=True)
        global_fields: dict[str, Any] = {}
        per_model_fields: dict[str, Any] = {}
        params = list(inspect.signature(fn).parameters.values())
        for p in params[1:]:
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: method parameter {p.name} must be keyword-only with a default")
            hint = hints[p.name]
            key = _CONFIG_NAMES.get(p.name, p.name)
            if _PerModelMarker in getattr(hint, "__metadata__", ()):
                (element,) = typing.get_args(typing.get_args(hint)[0])
                per_model_fields[key] = (element, p.default)
            else:
                global_fields[key] = (hint, p.default)
        forbid = ConfigDict(extra="forbid")
        METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            paper=paper,
            uses_pivot=uses_pivot,
            global_params=create_model(f"{name}_parameters", __config__=forbid, **global_fields),
            per_model_params=create_model(f"{name}_model_parameters", __config__=forbid, **per_model_fields),
        )
        return fn

    return register


# mergekit 0.1.5's methods that logitfuse does not implement: `logitfuse merge` runs them through mergekit.
MERGEKIT_METHODS = frozenset({
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "karcher", "model_stock",
    "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl", "slerp",
})


def builtin_methods() -> dict[str, MergeMethod]:
    """The registered methods (importing `merge.methods` registers the built-in ones)."""
    import merge.methods  # noqa: F401

    return METHODS


def get_method(name: str) -> MergeMethod:
    """The method registered under `name`; MergeError with the closest known name otherwise."""
    methods = builtin_methods()
    if name not in methods:
        known = sorted({*methods, *MERGEKIT_METHODS})
        match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"did you mean {match[0]!r}? " if match else ""
        raise MergeError(f"unknown merge_method {name!r}: {hint}expected one of {', '.join(sorted(methods))} "
                         f"(ours) or {', '.join(sorted(MERGEKIT_METHODS))} (through mergekit)")
    return methods[name]


__all__ = ["MERGEKIT_METHODS", "METHODS", "Combine", "Fraction", "MergeMethod", "ParameterStream", "PerModel", "Weight", "merge_method"]
