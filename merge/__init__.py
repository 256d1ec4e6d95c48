"""Merging pivot-shaped target models in parameter space (FuseChat's last stage), streamed tensor by tensor.

`run_merge(config, out_dir)` runs a merge; `load_config` reads mergekit-shaped YAML; `METHODS` lists the
registered methods (sce, varm, linear, task_arithmetic, ties, dare_linear, dare_ties, dare); `MergeError`
is every bad-input error. Names are imported on first use, so `merge.cli` (and `logitfuse --help`) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MergeConfig": "merge.config", "load_config": "merge.config", "parse_config": "merge.config",
    "run_merge": "merge.engine", "MergeError": "merge.errors",
    "METHODS": "merge.registry", "get_method": "merge.registry", "merge_method": "merge.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'merge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
