"""Merging pivot-shaped target models in parameter space (FuseChat's last stage), streamed tensor by tensor.

`run_merge(config, out_dir)` runs a merge; `load_config` reads mergekit-shaped YAML; `METHODS` lists the
registered methods (sce, varm, linear, task_arithmetic, ties, dare); `MergeError` is every bad-input error.
"""

from merge.config import MergeConfig, load_config, parse_config
from merge.engine import run_merge
from merge.errors import MergeError
from merge.registry import METHODS, get_method, merge_method

__all__ = ["METHODS", "MergeConfig", "MergeError", "get_method", "load_config", "merge_method", "parse_config", "run_merge"]
