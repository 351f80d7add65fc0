"""Data order and per-sample randomness do not depend on the process layout."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from proreflow.training.batches import BatchPlan, collate_items, micro_batches, sample_randomness, start_mask
from proreflow.training.report import SKIPPED_NAMES_KEPT, StageCounters
from proreflow.training.step import StepResult


def global_batch(plan_args: dict, step: int, processes: int, accum: int) -> list[int]:
    positions = []
    for rank in range(processes):
        plan = BatchPlan(**plan_args, grad_accum=accum, num_processes=processes, rank=rank)
        for micro in range(accum):
            positions += list(plan.positions(step, micro))
    return sorted(positions)


def test_global_batch_is_the_same_for_any_layout():
    args = {"num_items": 10, "seed": 3, "stage": 1, "batch_size": 8}
    for step in range(4):
        expected = list(range(step * 8, step * 8 + 8))
        for processes, accum in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)]:
            assert global_batch(args, step, processes, accum) == expected


def test_stream_is_a_permutation_per_epoch_and_batches_follow_it():
    plan = BatchPlan(10, seed=0, stage=0, batch_size=4, grad_accum=1)
    stream = plan.indices(range(30))
    for epoch in range(3):
        assert sorted(stream[10 * epoch:10 * epoch + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    items = [(torch.tensor([float(i)]), None) for i in range(10)]  # a map-style dataset whose items are their index
    batches = micro_batches(items, plan, start_step=2)
    for want in (stream[8:12], stream[12:16]):
        x0, cond, skipped = next(batches)
        assert x0[:, 0].long().tolist() == want and cond is None and skipped == []
    other_stage = BatchPlan(10, seed=0, stage=1, batch_size=4, grad_accum=1)
    assert other_stage.indices(range(10)) != stream[:10]


def test_batch_must_split_over_processes_and_accumulation():
    with pytest.raises(ValueError, match=r"stages.2.batch_size: a global batch of 6 .* use a multiple of 4"):
        BatchPlan(10, 0, 2, batch_size=6, grad_accum=2, num_processes=2)


def test_randomness_depends_on_position_only():
    t, keep, noise = sample_randomness(range(0, 6), 1, 0, (3,), torch.float64, cond_dropout=0.5)
    t2, keep2, noise2 = sample_randomness(range(3, 6), 1, 0, (3,), torch.float64, cond_dropout=0.5)
    assert torch.equal(t[3:], t2) and torch.equal(keep[3:], keep2) and torch.equal(noise[3:], noise2)
    assert bool((t > 0).all() and (t <= 1).all()) and noise.shape == (6, 3) and keep.dtype == torch.bool
    t3, _, _ = sample_randomness(range(0, 6), 1, 1, (3,), torch.float64)
    assert not torch.equal(t, t3)  # another stage draws other times
    many = sample_randomness(range(4000), 0, 0, (1,), torch.float32, cond_dropout=0.1)[1]
    assert abs(1 - many.double().mean().item() - 0.1) < 0.02


def test_collate_items():
    x, cond, skipped = collate_items([(torch.zeros(2), None), (torch.ones(2), None)])
    assert torch.equal(x, torch.tensor([[0.0, 0.0], [1.0, 1.0]])) and cond is None and skipped == []
    x, cond, _ = collate_items([(torch.zeros(2), {"a": torch.ones(3)}), (torch.ones(2), {"a": torch.zeros(3)})])
    assert torch.equal(cond["a"], torch.tensor([[1.0] * 3, [0.0] * 3]))
    _, labels, _ = collate_items([(torch.zeros(2), 1), (torch.ones(2), 2)])
    assert labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match="some dataset items have a condition"):
        collate_items([(torch.zeros(2), None), (torch.ones(2), 2)])


def test_collate_items_brings_the_skipped_names_in_item_order():
    """A third element (names skipped to reach the item) is stripped from the batch and listed."""
    x, cond, skipped = collate_items([(torch.zeros(2), None, ["a.png", "b.png"]), (torch.ones(2), None),
                                      (torch.full((2,), 2.0), None, ["a.png"])])
    assert torch.equal(x[:, 0], torch.tensor([0.0, 1.0, 2.0])) and cond is None
    assert skipped == ["a.png", "b.png", "a.png"]
    with pytest.raises(ValueError, match=r"\(x0, cond\) or \(x0, cond, skipped names\)"):
        collate_items([(torch.zeros(2),)])


def test_stage_counters_sum_steps_count_every_skipped_read_and_keep_the_first_distinct_names():
    counters = StageCounters()
    steps = [StepResult(0.5, {}, False, 10, 4, 0.25, ["a", "b", "a"]), StepResult(float("nan"), {}, True, 6, 4, 0.5),
             StepResult(0.1, {}, False, 1, 4, 1.0, [f"n{k}" for k in range(SKIPPED_NAMES_KEPT + 5)])]
    for step in steps:
        counters.add(step)
    assert (counters.teacher_evals, counters.samples, counters.seconds, counters.skipped) == (17, 12, 1.75, 1)
    assert counters.skipped_items == 3 + SKIPPED_NAMES_KEPT + 5
    assert counters.skipped_item_names == ["a", "b"] + [f"n{k}" for k in range(SKIPPED_NAMES_KEPT - 2)]
    # a checkpoint's JSON round trip keeps them (resume goes on counting from there)
    again = StageCounters(**json.loads(json.dumps(dataclasses.asdict(counters))))
    assert again == counters


def test_start_mask_takes_exactly_its_share_evenly_and_for_any_layout():
    for share in (0.0, 0.25, 0.5, 1 / 3, 1.0):
        full = start_mask(range(0, 600), share)
        assert int(full.sum()) == math.floor(600 * share)
        # every window of 12 consecutive positions holds floor or ceil of 12 * share
        counts = full.unfold(0, 12, 1).sum(dim=1)
        assert int(counts.min()) >= math.floor(12 * share) and int(counts.max()) <= math.ceil(12 * share)
        # positions split over processes / micro-batches give the same samples
        parts = torch.cat([start_mask(range(a, a + 50), share) for a in range(0, 600, 50)])
        assert torch.equal(parts, full)
