import pytest
import torch

from zotune.directions import BLOCK_SIZE, DirectionEngine, block_key, derive_seed


def make_params():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (BLOCK_SIZE + 17,), (7,), (2, BLOCK_SIZE // 3 + 1)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_direction_is_deterministic_and_seed_dependent(distribution):
    engine = DirectionEngine(make_params(), distribution)
    assert torch.equal(engine.direction(1, 123), engine.direction(1, 123))
    assert not torch.equal(engine.direction(1, 123), engine.direction(1, 124))
    assert not torch.equal(engine.direction(0, 123)[:2, :5].flatten()[:7], engine.direction(2, 123))


def test_direction_does_not_depend_on_visit_order():
    params = make_params()
    engine = DirectionEngine(params)
    forward = [engine.direction(i, 9) for i in range(len(params))]
    backward = [engine.direction(i, 9) for i in reversed(range(len(params)))][::-1]
    fresh_engine = DirectionEngine(params)  # new generators, nothing drawn before
    alone = [fresh_engine.direction(i, 9) for i in (3, 1, 0, 2)]
    for i in range(len(params)):
        assert torch.equal(forward[i], backward[i])
    for position, i in enumerate((3, 1, 0, 2)):
        assert torch.equal(alone[position], forward[i])


def test_apply_to_a_subset_equals_apply_to_all():
    everything, subset = make_params(), make_params()
    DirectionEngine(everything).apply([(5, 0.1)])
    DirectionEngine(subset).apply([(5, 0.1)], indices=[2, 1])
    for i in (1, 2):
        assert torch.equal(everything[i], subset[i])
    assert torch.equal(subset[0], make_params()[0])


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_do_not_change_the_result(distribution, threads):
    one, many = make_params(), make_params()
    DirectionEngine(one, distribution, num_threads=1).apply([(5, 0.1), (6, -0.2)])
    DirectionEngine(many, distribution, num_threads=threads).apply([(5, 0.1), (6, -0.2)])
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    alone = DirectionEngine(one, distribution, num_threads=1)
    shared = DirectionEngine(one, distribution, num_threads=threads)
    for index in range(len(one)):
        pairs = [torch.empty_like(one[index]) for _ in range(4)]
        alone.perturbed_pair(index, 7, 1e-2, *pairs[:2])
        shared.perturbed_pair(index, 7, 1e-2, *pairs[2:])
        assert torch.equal(pairs[0], pairs[2]) and torch.equal(pairs[1], pairs[3])


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_share_the_values_equally_and_pieces_stay_inside_keyed_blocks(threads):
    params = make_params()
    engine = DirectionEngine(params, num_threads=threads)

    def schedule(indices):
        return engine._workers.schedule(tuple(engine._stretch(i) for i in indices))

    for indices in [(1,), (3,), (0, 1, 2, 3)]:
        shares = schedule(indices)
        sizes = [sum(stop - start for _, start, stop in share) for share in shares]
        assert len(shares) == threads and max(sizes) - min(sizes) <= 16 * threads
        pieces = sorted(piece for share in shares for piece in share)
        for index in indices:  # each parameter tiled once, in order
            own = [(start, stop) for i, start, stop in pieces if i == index]
            assert own[0][0] == 0 and own[-1][1] == params[index].numel()
            assert all(a[1] == b[0] for a, b in zip(own, own[1:]))
        assert all(start // BLOCK_SIZE == (stop - 1) // BLOCK_SIZE for _, start, stop in pieces)
    assert schedule((0,)) == [[(0, 0, 15)]]  # too small to share


def test_apply_matches_dense_formula():
    params = make_params()
    before = [p.clone() for p in params]
    engine = DirectionEngine(params)
    z = {s: [engine.direction(i, s) for i in range(len(params))] for s in (1, 2)}
    engine.apply([(1, 0.3), (2, -0.7)], restore=[(1, 0.05)], scale=0.9)
    for i, (p, p0) in enumerate(zip(params, before)):
        expected = (p0 + 0.05 * z[1][i]) * 0.9 + 0.3 * z[1][i] - 0.7 * z[2][i]
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6)


def test_zero_update_is_bit_exact_even_for_negative_zero():
    params = [torch.tensor([-0.0, 1.5, -2.25]), torch.randn(4, dtype=torch.bfloat16)]
    before = [p.clone() for p in params]
    DirectionEngine(params).apply([(3, 0.0), (4, -0.0)], scale=1.0)
    for p, p0 in zip(params, before):
        assert torch.equal(
            p.view(torch.int16 if p.dtype == torch.bfloat16 else torch.int32),
            p0.view(torch.int16 if p0.dtype == torch.bfloat16 else torch.int32),
        )


def test_low_precision_update_is_computed_in_float32_and_rounded_once():
    param = torch.randn(1000).to(torch.bfloat16)
    start = param.clone()
    engine = DirectionEngine([param])
    z1, z2 = engine.direction(0, 1), engine.direction(0, 2)
    engine.apply([(1, 1e-3), (2, -2e-3)])
    assert torch.equal(param, (start.float() + 1e-3 * z1 - 2e-3 * z2).to(torch.bfloat16))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("threads", [1, 2])
def test_perturbed_copy_leaves_parameter_untouched(distribution, threads):
    params = make_params()
    before = params[1].clone()
    engine = DirectionEngine(params, distribution, num_threads=threads)
    copy = engine.perturbed_copy(1, [(7, 1e-2)])
    assert torch.equal(params[1], before)
    # One pair: a·z rounded, then added to θ, as a dense reference computes it (bit for bit; two keyed blocks).
    assert torch.equal(copy, before + engine.direction(1, 7).mul_(1e-2))
    several = engine.perturbed_copy(1, [(7, 1e-2), (8, -3e-2)])
    torch.testing.assert_close(several, before + 1e-2 * engine.direction(1, 7) - 3e-2 * engine.direction(1, 8))
    assert torch.equal(params[1], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_perturbed_pair_is_the_two_perturbed_copies(dtype):
    params = [p.to(dtype) for p in make_params()]
    engine = DirectionEngine(params, num_threads=2)
    for index in (1, 3):
        plus, minus = torch.empty_like(params[index]), torch.empty_like(params[index])
        engine.perturbed_pair(index, 7, 1e-2, plus, minus)
        assert torch.equal(plus, engine.perturbed_copy(index, [(7, 1e-2)]))
        assert torch.equal(minus, engine.perturbed_copy(index, [(7, -1e-2)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_perturbed_rows_are_rows_of_the_perturbed_copy(dtype):
    # rows 131 and 262 span two keyed blocks
    table = torch.randn(300, 1000, generator=torch.Generator().manual_seed(2)).to(dtype)
    engine = DirectionEngine([table])
    rows = torch.tensor([0, 5, 131, 132, 262, 299])
    for pairs in ([(7, 1e-2)], [(7, 1e-2), (8, -3e-2)]):
        assert torch.equal(engine.perturbed_rows(0, pairs, rows), engine.perturbed_copy(0, pairs)[rows])


def test_gaussian_and_rademacher_distributions():
    param = torch.zeros(4 * BLOCK_SIZE)
    gaussian = DirectionEngine([param]).direction(0, 11)
    assert abs(gaussian.mean().item()) < 0.01 and abs(gaussian.var().item() - 1) < 0.01
    # Kurtosis of a normal distribution is 3; a uniform's is 1.8.
    assert abs((gaussian**4).mean().item() - 3) < 0.05
    signs = DirectionEngine([param], "rademacher").direction(0, 11)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 0.01


def test_blocks_of_one_parameter_are_independent():
    z = DirectionEngine([torch.zeros(2 * BLOCK_SIZE)]).direction(0, 3)
    first, second = z[:BLOCK_SIZE], z[BLOCK_SIZE:]
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.02


def test_keys_and_seeds_are_distinct():
    keys = {block_key(1, i, b) for i in range(50) for b in range(50)}
    assert len(keys) == 2500
    seeds = {derive_seed(0, step, j) for step in range(1000) for j in range(3)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)


def test_unknown_distribution_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown direction distribution 'uniform': choose one of gaussian, rademacher"):
        DirectionEngine([torch.zeros(3)], "uniform")
