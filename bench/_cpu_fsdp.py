"""Run a module under `accelerate launch --cpu` with accelerate's FSDP turned on for CPU processes (gloo).

accelerate 1.15 enables FSDP only for accelerator device types (`AcceleratorState`: MULTI_GPU, MULTI_NPU,
...); on CPU processes (MULTI_CPU) an FSDP config silently becomes DDP. torch's FSDP2 (`fully_shard`) itself
runs on CPU with gloo, so this shim lets the trainer's FSDP path (sharded parameters and AdamW state,
torch.distributed.checkpoint of DTensors, the full-state-dict gather for model.safetensors) run on a
machine without a GPU, for tests and for rehearsing bench/gpu_fsdp.sh. Not for training: a CPU FSDP run
has no reason to exist.

    accelerate launch --config_file trainer/configs/fsdp.yaml --cpu --num_processes 2 \\
        -m bench._cpu_fsdp clients.cli train ...
"""

from __future__ import annotations

import os
import runpy
import sys


def enable_cpu_fsdp() -> None:
    """Make `AcceleratorState` take the FSDP plugin on MULTI_CPU, as it does on MULTI_GPU."""
    from accelerate import state as acc_state
    from accelerate.utils import DistributedType

    original = acc_state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # later AcceleratorState() instances copy the type from PartialState's shared state
            acc_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    acc_state.AcceleratorState.__init__ = __init__


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        sys.exit("bench._cpu_fsdp: not launched with an FSDP config (accelerate launch --config_file fsdp.yaml)")
    enable_cpu_fsdp()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
