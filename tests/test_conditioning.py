"""Conditions: dropout of dict conditions, with leaves kept per sample (SDXL time_ids)."""

from __future__ import annotations

import pytest
import torch

from proreflow.conditioning import null_like, select_cond

TIME_IDS = "added_cond_kwargs.time_ids"


def sdxl_cond(n: int = 3) -> dict:
    """Row i: text states filled with i + 1, pooled text i + 10, time_ids (i, i, 0, 0, 16, 16)."""
    rows = torch.arange(n, dtype=torch.float32)
    time_ids = torch.stack([rows, rows] + [torch.full((n,), v) for v in (0.0, 0.0, 16.0, 16.0)], 1)
    return {"encoder_hidden_states": (rows + 1)[:, None, None].expand(n, 2, 4).clone(),
            "added_cond_kwargs": {"text_embeds": (rows + 10)[:, None].expand(n, 5).clone(), "time_ids": time_ids}}


def sdxl_null() -> dict:
    return {"encoder_hidden_states": torch.zeros(1, 2, 4),
            "added_cond_kwargs": {"text_embeds": torch.zeros(1, 5), "time_ids": torch.tensor([[-1.0] * 6])}}


def test_dropout_replaces_the_text_and_keeps_each_samples_time_ids():
    cond, null = sdxl_cond(), sdxl_null()
    keep = torch.tensor([True, False, False])
    out = select_cond(keep, cond, null, keep_paths=(TIME_IDS,))
    assert torch.equal(out["encoder_hidden_states"][0], cond["encoder_hidden_states"][0])
    assert not out["encoder_hidden_states"][1:].any() and not out["added_cond_kwargs"]["text_embeds"][1:].any()
    assert torch.equal(out["added_cond_kwargs"]["text_embeds"][0], cond["added_cond_kwargs"]["text_embeds"][0])
    assert torch.equal(out["added_cond_kwargs"]["time_ids"], cond["added_cond_kwargs"]["time_ids"])  # all rows own
    # without keep_paths every leaf of a dropped sample is the null condition's
    plain = select_cond(keep, cond, null)
    assert torch.equal(plain["added_cond_kwargs"]["time_ids"][1:], torch.full((2, 6), -1.0))
    assert torch.equal(plain["added_cond_kwargs"]["time_ids"][0], cond["added_cond_kwargs"]["time_ids"][0])


def test_null_like_is_the_null_condition_with_the_kept_leaves():
    cond, null = sdxl_cond(), sdxl_null()
    out = null_like(cond, null, (TIME_IDS,))
    assert out["encoder_hidden_states"] is null["encoder_hidden_states"]  # batch 1, shared
    assert out["added_cond_kwargs"]["text_embeds"] is null["added_cond_kwargs"]["text_embeds"]
    assert out["added_cond_kwargs"]["time_ids"] is cond["added_cond_kwargs"]["time_ids"]
    assert torch.equal(null["added_cond_kwargs"]["time_ids"], torch.tensor([[-1.0] * 6]))  # not modified
    assert null_like(cond, null) is null and null_like(None, null, (TIME_IDS,)) is null
    assert null_like(cond, None, (TIME_IDS,)) is None


@pytest.mark.parametrize("path", ["added_cond_kwargs.crop", "time_ids", "added_cond_kwargs"])
def test_keep_paths_must_name_a_leaf(path):
    with pytest.raises(KeyError, match=f"keep_paths: '{path}'"):
        null_like(sdxl_cond(), sdxl_null(), (path,))
    with pytest.raises(KeyError, match="condition leaves: one tensor"):
        null_like(torch.zeros(3, 4), torch.zeros(1, 4), (path,))
