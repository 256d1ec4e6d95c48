"""mergekit's parameter settings, resolved per tensor: scalars, gradients and tensor-name filters.

A setting (mergekit's `ParameterSetting`, `mergekit/config.py`) is one of
  - a scalar: `0.5`, `true`, `"fusechat"`;
  - a gradient: a list of scalars, read at t in [0, 1]: numbers are interpolated linearly between
    neighbouring entries, other values pick entry int(t * (len - 1));
  - a filter `{filter: NAME, value: SETTING}` or a list of them: the first whose `filter` is a substring of
    the tensor name (or is missing or `*`) gives the value; none matching means "not set here".
t is mergekit's: layer i of L (from `model.layers.i.` style names) has t = i / (L - 1) (t = 1 when L = 1);
tensors outside the layers (embeddings, final norm, head) have t = 0. A per-model setting takes precedence
over the global one, which takes precedence over the method's default.

`ParameterPlan` classifies every parameter name once against the method: a name the method takes is
resolved per tensor; a name mergekit knows (`MERGEKIT_PARAMETERS`) that the method does not use is a
warning naming it; any other name is a `MergeError` naming the closest accepted name.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from merge.config import closest
from merge.errors import MergeError
from merge.registry import MergeMethod

log = logging.getLogger("logitfuse.merge")

# Every parameter name some mergekit 0.1.5 merge method takes (tests/test_merge_mergekit.py checks this
# against mergekit's registry). A config written for mergekit may carry any of these.
MERGEKIT_PARAMETERS = frozenset({
    "alpha", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask", "lambda", "max_iter", "normalize",
    "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "r", "rescale", "scale", "select_topk", "t", "tol",
    "weight",
})
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_SCALARS = (bool, int, float, str)


def layer_t(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient position t of a tensor: i / (L - 1) in layer i of L, 0 outside the layers."""
    m = _LAYER.search(tensor_name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def check_setting(setting: Any, where: str) -> None:
    """Raises MergeError unless `setting` has one of mergekit's setting shapes (module docstring)."""
    if isinstance(setting, _SCALARS):
        return
    if isinstance(setting, dict):
        unknown = [k for k in setting if k not in ("filter", "value")]
        if unknown or "value" not in setting:
            raise MergeError(f"{where}: a filter is {{filter: NAME, value: VALUE}}, got keys {sorted(setting)}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise MergeError(f"{where}: filter must be a string (a substring of tensor names)")
        check_setting(setting["value"], f"{where}.value")
        return
    if isinstance(setting, list) and setting:
        if all(isinstance(e, _SCALARS) for e in setting) or all(isinstance(e, dict) for e in setting):
            for i, e in enumerate(setting):
                check_setting(e, f"{where}[{i}]")
            return
    raise MergeError(
        f"{where}: expected a value, a gradient (list of values), or filters ({{filter, value}} or a list of them); "
        f"got {setting!r}"
    )


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for one tensor, or None when its filters do not match (mergekit's
    `evaluate_setting`)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return setting
    if all(isinstance(e, _SCALARS) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return evaluate(cond["value"], tensor_name, t)
    return None


class ParameterPlan:
    """The method's keyword arguments for each tensor, from a config's global and per-model settings."""

    def __init__(self, method: MergeMethod, parameters: dict[str, Any], per_model: list[dict[str, Any]],
                 num_layers: int):
        self.method, self.num_layers = method, num_layers
        accepted = [*method.global_names, *method.per_model_names]
        self.global_settings: dict[str, Any] = {}
        self.per_model_settings: list[dict[str, Any]] = [{} for _ in per_model]
        scopes = [("parameters", parameters, self.global_settings)]
        scopes += [(f"models[{i}].parameters", p, self.per_model_settings[i]) for i, p in enumerate(per_model)]
        for where, given, kept in scopes:
            for name, setting in given.items():
                if name in accepted:
                    if where != "parameters" and name not in method.per_model_names:
                        log.warning("warning: %s.%s is a global parameter of %s, not a per-model one (mergekit "
                                    "ignores it there too); ignored", where, name, method.name)
                        continue
                    check_setting(setting, f"{where}.{name}")
                    kept[name] = setting
                elif name in MERGEKIT_PARAMETERS:
                    log.warning("warning: %s.%s is not used by merge_method %s; ignored", where, name, method.name)
                else:
                    raise MergeError(f"{where}: unknown parameter {name!r} for merge_method {method.name}"
                                     f"{closest(name, accepted)}")
        self._cache: dict[tuple, dict[str, Any]] = {}

    def kwargs(self, tensor_name: str) -> dict[str, Any]:
        """Validated keyword arguments of the method for `tensor_name`; raises MergeError naming the tensor."""
        t = layer_t(tensor_name, self.num_layers)

        def resolve(settings: dict[str, Any]) -> dict[str, Any]:
            values = {k: evaluate(v, tensor_name, t) for k, v in settings.items()}
            return {k: v for k, v in values.items() if v is not None}

        shared = resolve(self.global_settings)
        own = [resolve(s) for s in self.per_model_settings]
        key = (tuple(sorted(shared.items())), tuple(tuple(sorted(o.items())) for o in own))
        if key not in self._cache:
            try:
                self._cache[key] = self.method.bind(shared, own)
            except MergeError as e:
                raise MergeError(f"{e} [tensor {tensor_name}]") from None
        return self._cache[key]


def count_layers(config: dict[str, Any], tensor_names: list[str]) -> int:
    """Number of decoder layers: config.json's num_hidden_layers (or n_layer), else the highest layer index + 1."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    found = [int(m.group(1)) for n in tensor_names if (m := _LAYER.search(n))]
    return max(found) + 1 if found else 0
