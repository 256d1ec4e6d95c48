"""The registry of merge methods: a name, a paper link and a typed keyword signature per method.

A method is one function `fn(param: ParameterStream, *, ...) -> Callable[[Chunk], Tensor]`: it computes any
whole-matrix statistics it needs and returns the function that merges one chunk. Its keyword parameters are
its config schema: global ones are plain typed keywords; those given per model (`weight`, `density`) are
annotated `PerModel[...]`, with the default applying to every model, and arrive as one value per target.
Adding a method is one new module under `merge/methods/` decorated with `@merge_method`.
"""

from __future__ import annotations

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
        return kwargs


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
            if _PerModelMarker in getattr(hint, "__metadata__", ()):
                (element,) = typing.get_args(typing.get_args(hint)[0])
                per_model_fields[p.name] = (element, p.default)
            else:
                global_fields[p.name] = (hint, p.default)
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


def get_method(name: str) -> MergeMethod:
    import merge.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise MergeError(f"unknown merge_method {name!r}: expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "Combine", "Fraction", "MergeMethod", "ParameterStream", "PerModel", "Weight", "merge_method"]
