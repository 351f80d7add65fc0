import pytest
import torch

from proreflow import TimeWindows


def scalar_index(k: int, t: float) -> int:
    """Reference: window i holds e_{i+1} < t <= e_i with e_i = 1 - i/k (t = 0 -> last window)."""
    edges = [1 - i / k for i in range(k + 1)]
    for i in range(k):
        if edges[i + 1] < t <= edges[i]:
            return i
    return k - 1


def test_edges_descend_from_noise_to_data():
    assert TimeWindows(4).edges().tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_points_on_edges_belong_to_the_window_starting_there(k):
    w = TimeWindows(k)
    edges = w.edges()
    idx = w.index(edges[:-1])
    assert idx.tolist() == list(range(k))
    t_start, t_end = w.bounds(edges[:-1])
    assert torch.equal(t_start, edges[:-1]) and torch.equal(t_end, edges[1:])


@pytest.mark.parametrize("k", [1, 3, 4, 8])
def test_vectorised_lookup_equals_scalar_reference(k):
    t = torch.cat([torch.rand(500, dtype=torch.float64), TimeWindows(k).edges(), torch.tensor([0.0, 1.0])])
    expected = [scalar_index(k, v) for v in t.tolist()]
    assert TimeWindows(k).index(t).tolist() == expected
    t_start, t_end = TimeWindows(k).bounds(t)
    assert bool(((t_end < t) | (t == 0)).all()) and bool((t <= t_start).all())


def test_float32_times_on_edges():
    w = TimeWindows(8)
    t = w.edges(torch.float32)[:-1]
    assert w.index(t).tolist() == list(range(8))


def test_merge_8_4_2_1_joins_neighbours():
    w = TimeWindows(8)
    for k in (4, 2, 1):
        merged = w.merge()
        assert merged.count == k
        # each merged edge is every other old edge
        assert torch.equal(merged.edges(), w.edges()[::2])
        w = merged
    with pytest.raises(ValueError, match="even"):
        w.merge()
    with pytest.raises(ValueError, match="even"):
        TimeWindows(3).merge()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_counts_are_clear_errors(bad):
    with pytest.raises(ValueError, match="positive integer"):
        TimeWindows(bad)


def test_out_of_range_times_are_rejected():
    with pytest.raises(ValueError, match=r"t in \[0, 1\]"):
        TimeWindows(2).index(torch.tensor([1.5]))


def test_steps_spread_evenly_and_grid_covers_each_window():
    w = TimeWindows(4)
    assert w.steps_per_window(4) == [1, 1, 1, 1]
    assert w.steps_per_window(6) == [2, 2, 1, 1]
    grid = w.time_grid(6)
    assert grid[0][0] == 1.0 and grid[-1][1] == 0.0
    assert all(a[1] == b[0] for a, b in zip(grid, grid[1:]))  # contiguous
    assert [g[2] for g in grid] == [0.75, 0.75, 0.5, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="steps >= 4"):
        w.steps_per_window(3)


def test_edge_indices_name_a_window_by_the_edges_of_the_finer_windows_it_merges():
    t = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.26, 0.25, 0.0], dtype=torch.float64)
    first, last = TimeWindows(2).edge_indices(t, TimeWindows(8))
    assert first.tolist() == [0, 0, 0, 4, 4, 4, 4] and last.tolist() == [4, 4, 4, 8, 8, 8, 8]
    fine = TimeWindows(8).edges()
    start, end = TimeWindows(2).bounds(t)
    assert torch.equal(fine[first], start) and torch.equal(fine[last], end)
    with pytest.raises(ValueError, match="do not nest"):
        TimeWindows(3).edge_indices(t, TimeWindows(8))
