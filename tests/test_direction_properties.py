"""Property tests (hypothesis) of keyed directions: random shapes, seeds and parameter orders."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zotune.directions import BLOCK_SIZE, GAUSSIAN, RADEMACHER, DirectionEngine

shapes = st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**64 - 1)
distributions = st.sampled_from([GAUSSIAN, RADEMACHER])


@settings(max_examples=40, deadline=None)
@given(st.lists(shapes, min_size=1, max_size=4), seeds, distributions, st.randoms(use_true_random=False))
def test_keyed_directions_are_deterministic_and_independent_of_order(param_shapes, seed, distribution, rng):
    params = [torch.zeros(shape) for shape in param_shapes]
    engine = DirectionEngine(params, distribution, num_threads=1)
    first = [engine.direction(i, seed) for i in range(len(params))]
    order = list(range(len(params)))
    rng.shuffle(order)
    again = DirectionEngine(params, distribution, num_threads=2)
    for i in order:  # another engine, another thread count, another order: the same z for each tensor
        assert torch.equal(again.direction(i, seed), first[i])
    moved = [torch.zeros(shape) for shape in param_shapes]
    DirectionEngine(moved, distribution, num_threads=2).apply([(seed, 1.0)], indices=order)
    assert all(torch.equal(m, z) for m, z in zip(moved, first))


@settings(max_examples=15, deadline=None)
@given(st.integers(20_000, 2 * BLOCK_SIZE + 5_000), seeds)
def test_gaussian_directions_have_zero_mean_and_unit_variance(numel, seed):
    z = DirectionEngine([torch.zeros(numel)], GAUSSIAN, num_threads=1).direction(0, seed).double()
    # Six standard errors: a correct generator fails this about once in 10^8 draws.
    assert abs(z.mean().item()) < 6 / math.sqrt(numel)
    assert abs(z.var().item() - 1) < 6 * math.sqrt(2 / numel)


@settings(max_examples=25, deadline=None)
@given(shapes, seeds)
def test_rademacher_directions_are_plus_or_minus_one_and_balanced(shape, seed):
    z = DirectionEngine([torch.zeros(shape)], RADEMACHER, num_threads=1).direction(0, seed)
    assert set(z.unique().tolist()) <= {-1.0, 1.0}
    assert abs(z.sum().item()) <= 6 * math.sqrt(z.numel()) + 1
