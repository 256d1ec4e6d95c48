"""Merging pivot-shaped target models in parameter space (FuseChat's last stage), streamed tensor by tensor.

`run_merge(config, out_dir)` runs a merge; `load_config` reads mergekit-shaped YAML; `METHODS` lists the
registered methods (sce, varm, linear, task_arithmetic, ties, dare_linear, dare_ties, dare); `MergeError`
is every bad-input error. Names are imported on first use, so `merge.cli` (and `logitfuse --help`) does not
import torch.
"""

from datastore._lazy import lazy_exports

# imported on first use (PEP 562): the CLI imports this package's light modules only
_EXPORTS = {
    "MergeConfig": "merge.config",
    "load_config": "merge.config",
    "parse_config": "merge.config",
    "run_merge": "merge.engine",
    "MergeError": "merge.errors",
    "METHODS": "merge.registry",
    "get_method": "merge.registry",
    "merge_method": "merge.registry",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
