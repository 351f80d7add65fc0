"""FSDP2 on the SD3 transformer: accelerate's FSDP plugin with the wrap policy of
configs/accelerate/fsdp-sd3.yaml (each JointTransformerBlock an FSDP unit), 2 CPU processes, trains the
weights the same 2 processes train under DDP, within float32 rounding (tests/helpers/fsdp_on_cpu.py lifts
accelerate's CPU gate)."""

from __future__ import annotations

import json

import pytest
from diffusers import SD3Transformer2DModel
from sd.test_sd_distributed import _assert_same_training, _two_processes


@pytest.mark.slow
def test_fsdp2_shards_the_transformer_by_its_blocks_and_trains_what_ddp_trains(sd3_dir, image_dir, tmp_path):
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "JointTransformerBlock"}
    _two_processes(tmp_path, "fsdp", sd3_dir, image_dir, fsdp, "fsdp_on_cpu", "sd3")
    _two_processes(tmp_path, "ddp", sd3_dir, image_dir, None, "sd3")
    transformer = SD3Transformer2DModel.from_pretrained(sd3_dir, subfolder="transformer")
    blocks = sum(type(m).__name__ == "JointTransformerBlock" for m in transformer.modules())
    numel = sum(p.numel() for p in transformer.parameters())
    records = [json.loads((tmp_path / f"fsdp.fsdp-{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["fsdp_units"].count("FSDPJointTransformerBlock") == blocks > 0
        assert "FSDPSD3Transformer2DModel" in record["fsdp_units"]
        assert len(record["dtensors"]) == len(list(transformer.parameters()))
        assert record["numel"] == numel and 0 < record["local_numel"] < numel
    assert sum(r["local_numel"] for r in records) == numel
    _assert_same_training(transformer.state_dict(), tmp_path / "ddp", tmp_path / "fsdp")
