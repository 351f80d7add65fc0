"""A tiny training run for test_distributed.py, launched with ``torchrun``: OUT RECIPE_JSON TEACHER [OPTION=VALUE ...]
with options ``shard_size=N`` (trajectories per target-cache shard, for runs with teacher start points),
``shards=PATH`` (train on a ShardStream of them instead of SkippingMixture; test_streams.py), ``resume=NAME``
(go on from that checkpoint of OUT) and ``fsdp_on_cpu=1`` (test_fsdp.py: see :func:`fsdp_on_cpu`; each process
also saves the network ``train`` returns as ``OUT.result-<rank>.st``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from engine_toys import SkippingMixture, make_setup  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from proreflow.training import target_cache, train  # noqa: E402
from proreflow.training.streams import ShardStream  # noqa: E402


def fsdp_on_cpu(out: str) -> None:
    """Let accelerate's FSDP plugin (``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables) shard on CPU, and
    write what the student became to ``OUT.fsdp-<rank>.json``.

    accelerate turns FSDP on for GPU-like process groups only: on CPU (gloo, ``MULTI_CPU``) its
    ``AcceleratorState`` ignores the plugin without a word and trains with DDP. Here the state takes the
    plugin as it does on GPUs; from there on accelerate's own FSDP2 code (``fully_shard`` over a CPU device
    mesh) prepares the student, steps, clips and syncs as it would on GPUs.
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from proreflow.training import runner

    init = state.AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init_with_fsdp
    prepare = runner.Trainee.prepare.__func__

    def recording_prepare(cls, setup, recipe, accelerator, weights=()):
        trainee = prepare(cls, setup, recipe, accelerator, weights)
        params = dict(trainee.module.named_parameters())
        record = {"distributed_type": accelerator.distributed_type.value,
                  "fsdp_units": sum(isinstance(m, FSDPModule) for m in trainee.module.modules()),
                  "dtensors": sorted(name for name, p in params.items() if isinstance(p, DTensor)),
                  "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                     for p in params.values()),
                  "numel": sum(p.numel() for p in params.values())}
        Path(f"{out}.fsdp-{accelerator.process_index}.json").write_text(json.dumps(record))
        return trainee

    runner.Trainee.prepare = classmethod(recording_prepare)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, recipe, teacher = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    options = dict(arg.split("=", 1) for arg in sys.argv[4:])
    if "shard_size" in options:
        target_cache.SHARD_SIZE = int(options["shard_size"])
    if options.get("fsdp_on_cpu"):
        fsdp_on_cpu(out)
    setup = make_setup(pretrained=False)
    setup.teacher_model.load_state_dict(load_file(teacher))
    setup.dataset = ShardStream(options["shards"]) if "shards" in options else SkippingMixture()
    result = train(recipe, setup, out, progress=False, resume=options.get("resume", False))
    if options.get("fsdp_on_cpu"):  # the returned network, as each process has it
        from safetensors.torch import save_file

        rank = torch.distributed.get_rank()
        save_file({k: v.cpu().contiguous() for k, v in result.module.state_dict().items()}, f"{out}.result-{rank}.st")
