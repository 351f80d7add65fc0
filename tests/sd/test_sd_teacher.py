"""load_teacher: one code path for SD1.5 / SD2 (v) / SDXL folders, conditions, latents, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from proreflow.sd.pipeline import load_teacher, read_model_index, sdxl_time_ids


def test_sd15_conditions_and_latents(sd15_dir):
    teacher = load_teacher(sd15_dir, local_files_only=True)
    assert not teacher.is_sdxl and teacher.prediction_type == "epsilon" and teacher.resolution == 16
    cond = teacher.encode_prompts(["a cat", "a dog"])
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (2, 16, 32)
    null = teacher.null_cond()["encoder_hidden_states"]
    assert null.shape == (1, 16, 32)
    torch.testing.assert_close(null, teacher.encode_prompts([""])["encoder_hidden_states"])  # PeRFlow: ""
    assert not torch.allclose(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = teacher.encode_images(pixels, [torch.Generator().manual_seed(i) for i in range(2)])
    assert latents.shape == (2, *teacher.latent_shape(16))
    # the latents are the VAE posterior sample times the scaling factor
    dist = teacher.vae.encode(pixels).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean[:1].shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents[1], (z[1] * teacher.vae.config.scaling_factor), rtol=1e-5, atol=1e-5)
    assert teacher.decode_latents(latents).shape == pixels.shape


def test_sd2_v_prediction_is_read_from_the_scheduler(sd2v_dir):
    assert load_teacher(sd2v_dir).prediction_type == "v_prediction"


def test_sdxl_conditions(sdxl_dir):
    teacher = load_teacher(sdxl_dir, local_files_only=True)
    assert teacher.is_sdxl
    ids = torch.stack([sdxl_time_ids((40, 56), (0, 12), (16, 16)), sdxl_time_ids((16, 16), (0, 0), (16, 16))])
    cond = teacher.encode_prompts(["a cat", "a dog"], ids)
    assert cond["encoder_hidden_states"].shape == (2, 16, 64)  # both encoders' states, concatenated
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert cond["added_cond_kwargs"]["time_ids"].tolist()[0] == [40, 56, 0, 12, 16, 16]
    # force_zeros_for_empty_prompt (the SDXL pipeline's default): the null condition is zeros
    null = teacher.null_cond()
    assert not null["encoder_hidden_states"].any() and not null["added_cond_kwargs"]["text_embeds"].any()
    assert null["added_cond_kwargs"]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    out = teacher.unet(torch.randn(2, 4, 8, 8), 500.0, **cond).sample
    assert out.shape == (2, 4, 8, 8)


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. --teacher takes a diffusers pipeline folder"):
        load_teacher(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_teacher(tmp_path)


def test_hub_id_offline_says_how_to_fix():
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        read_model_index("no-such-org/no-such-model", local_files_only=True)


def test_unsupported_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline is not supported"):
        load_teacher(tmp_path)


def test_missing_weights_name_the_folder(sd15_dir, tmp_path):
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(sd15_dir, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(OSError, match="loading the teacher pipeline .*pipe failed"):
        load_teacher(broken)
