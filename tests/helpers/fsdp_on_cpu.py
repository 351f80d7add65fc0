"""For the FSDP tests' torchrun workers: let accelerate's FSDP plugin shard on CPU, and record what it made.

accelerate turns FSDP on for GPU-like process groups only: on CPU (gloo, ``MULTI_CPU``) its
``AcceleratorState`` ignores the plugin (``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables) without a
word and trains with DDP. :func:`lift_cpu_gate` makes the state take the plugin as it does on GPUs; from
there on accelerate's own FSDP2 code (``fully_shard`` over a CPU device mesh) prepares the student, steps,
clips and syncs as it would on GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path


def lift_cpu_gate(out: str) -> None:
    """Let the FSDP plugin shard on CPU; write what the student became to ``OUT.fsdp-<rank>.json``: the
    distributed type, the number of FSDP units, the DTensor parameters, local and full element counts."""
    import accelerate.state as state
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from proreflow.training import stage_runner as runner

    init = state.AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init_with_fsdp
    prepare = runner.Trainee.prepare.__func__

    def recording_prepare(cls, setup, recipe, accelerator, weights=(), module=None):
        trainee = prepare(cls, setup, recipe, accelerator, weights, module)
        params = dict(trainee.module.named_parameters())
        record = {"distributed_type": accelerator.distributed_type.value,
                  "fsdp_units": sorted(type(m).__name__ for m in trainee.module.modules() if isinstance(m, FSDPModule)),
                  "dtensors": sorted(name for name, p in params.items() if isinstance(p, DTensor)),
                  "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                     for p in params.values()),
                  "numel": sum(p.numel() for p in params.values())}
        Path(f"{out}.fsdp-{accelerator.process_index}.json").write_text(json.dumps(record))
        return trainee

    runner.Trainee.prepare = classmethod(recording_prepare)
