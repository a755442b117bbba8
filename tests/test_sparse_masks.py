"""Sparse directions: a seeded, exact share of z's entries zeroed, the same in every operation of the engine."""

from statistics import NormalDist

import pytest
import torch
from conftest import lm_loss, resume_and_compare

from zotune.directions import GAUSSIAN, DirectionEngine, derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import MeZO, ZOSGDMomentum, create_optimizer
from zotune.sparse_masks import MASK_COUNTER, shares_of


def naive_masked(params, seed, mask_seed, shares, distribution=GAUSSIAN):
    """z from an unmasked engine, zeroed where a Gaussian drawn from the mask's key is below Φ⁻¹(share)."""
    plain, gaussian = DirectionEngine(params, distribution), DirectionEngine(params, GAUSSIAN)
    out = []
    for i, share in enumerate(shares):
        z = plain.direction(i, seed)
        if share:
            z[gaussian.direction(i, mask_seed) < NormalDist().inv_cdf(share)] = 0
        out.append(z)
    return out


def stored_masked_directions(model, optimizer, seed: int, steps: int, share: float, mask_every: int):
    """``direction(name, s)``: the naive masked z of the direction seed ``s`` of one of the first ``steps`` steps
    (its first direction), under that step's seeded mask, for ``model``'s parameter ``name``."""
    params = [p.detach() for p in optimizer.param_list]
    name_of = {id(p): name for name, p in model.named_parameters()}
    order = [name_of[id(p)] for p in optimizer.param_list]
    step_of = {derive_seed(seed, step, 0): step for step in range(steps)}

    def direction(name, s):
        mask_seed = derive_seed(seed, step_of[s] // mask_every, MASK_COUNTER)
        return naive_masked(params, s, mask_seed, [share] * len(params))[order.index(name)]

    return direction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_operation_draws_the_same_masked_direction(dtype):
    params = [torch.zeros(300, 700, dtype=dtype), torch.zeros(5000, dtype=dtype)]
    engine = DirectionEngine(params)
    mask = engine.mask_directions([0.3, 0.0])
    mask.seed = 77
    expected = naive_masked(params, 5, 77, [0.3, 0.0])
    zeroed = (expected[0] == 0).float().mean().item()
    assert abs(zeroed - 0.3) < 4 * (0.3 * 0.7 / expected[0].numel()) ** 0.5  # exactly 0.3 in probability
    assert (expected[1] != 0).all()
    for i, z in enumerate(expected):
        torch.testing.assert_close(engine.direction(i, 5), z, rtol=0, atol=0)
        torch.testing.assert_close(engine.perturbed_copy(i, [(5, 1.0)]).float(), z.to(dtype).float(), rtol=0, atol=0)
        plus, minus = torch.empty_like(params[i]), torch.empty_like(params[i])
        engine.perturbed_pair(i, 5, 0.5, plus, minus)
        torch.testing.assert_close(minus.float(), (-0.5 * z).to(dtype).float(), rtol=0, atol=0)
    rows = torch.tensor([3, 250, 17])
    torch.testing.assert_close(
        engine.perturbed_rows(0, [(5, 1.0)], rows).float(), expected[0][rows].to(dtype).float(), rtol=0, atol=0
    )
    engine.apply([(5, 2.0)])
    for param, z in zip(params, expected):
        torch.testing.assert_close(param.float(), (2.0 * z).to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("perturbation", ["module", "inplace"])
def test_sparse_mezo_matches_stored_masked_directions_and_masks_change_every_n_steps(perturbation, batch):
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = MeZO(model, lr=1e-2, eps=1e-3, seed=3, sparsity=0.6, mask_every=2, perturbation=perturbation)
    name_of = {id(p): name for name, p in model.named_parameters()}
    order = [name_of[id(p)] for p in optimizer.param_list]  # the engine's order: its index keys z and the mask
    params = [theta[name] for name in order]
    masks = []
    for step in range(3):
        optimizer.step(lambda: lm_loss(model, batch))
        mask_seed = derive_seed(3, step // 2, MASK_COUNTER)
        z = {
            name: value.double()
            for name, value in zip(order, naive_masked(params, derive_seed(3, step, 0), mask_seed, [0.6] * len(params)))
        }
        masks.append(z["model.embed_tokens.weight"] == 0)
        with torch.no_grad():
            plus = lm_loss(model, batch, {k: theta[k] + 1e-3 * z[k] for k in theta}).item()
            minus = lm_loss(model, batch, {k: theta[k] - 1e-3 * z[k] for k in theta}).item()
        for name in theta:
            theta[name] = theta[name] - 1e-2 * (plus - minus) / 2e-3 * z[name]
        params = [theta[name] for name in order]
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), theta[name], rtol=0, atol=1e-9 if perturbation == "inplace" else 1e-12)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_global_shares_follow_the_weights_magnitudes():
    small, large = torch.randn(1000) * 0.01, torch.randn(1000)
    shares = shares_of([small, large], 0.5, "global", seed=0)
    assert shares[0] > 0.95 and shares[1] < 0.05 and abs(sum(shares) / 2 - 0.5) < 0.02
    assert shares_of([small, large], 0.5, "layer", seed=0) == [0.5, 0.5]


@pytest.mark.parametrize("shares", ["global", "magnitude"])
@pytest.mark.parametrize("name", ["mezo", "zo-adam", "zo-cons"])
def test_sparse_steps_at_zero_lr_are_bit_exact_and_resume_exactly(name, shares, batch):
    model = random_llama("tiny", dtype=torch.bfloat16, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = create_optimizer(name, model, lr=0.0, sparsity=0.5, sparse_shares=shares)
    for _ in range(2):
        optimizer.step(lambda: lm_loss(model, batch))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    options = dict(lr=1e-4, weight_decay=0.0 if name == "zo-cons" else 0.1, seed=3, sparsity=0.5, mask_every=2)
    resume_and_compare(lambda m: create_optimizer(name, m, sparse_shares=shares, **options), batch, steps_before=3, steps_after=3)


@pytest.mark.parametrize("perturbation", ["module", "inplace"])
def test_magnitude_masked_mezo_matches_stored_directions_zeroed_on_the_largest_weights(perturbation, batch):
    """Sparse MeZO's mask: each step z zeroed where |θ| (as the step starts) is above a limit found every
    ``mask_every`` steps, the magnitude of the ⌈(1 − s)·n⌉-th smallest entry."""
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = MeZO(
        model, lr=1e-2, eps=1e-3, seed=3, sparsity=0.3, sparse_shares="magnitude", mask_every=2, perturbation=perturbation
    )
    name_of = {id(p): name for name, p in model.named_parameters()}
    order = [name_of[id(p)] for p in optimizer.param_list]
    plain = DirectionEngine([theta[name] for name in order])
    for step in range(3):
        if step % 2 == 0:  # the limits of this epoch of mask_every steps
            limits = {}
            for name in order:
                magnitudes = theta[name].abs().reshape(-1)
                limits[name] = magnitudes.kthvalue(magnitudes.numel() - round(0.3 * magnitudes.numel())).values
        optimizer.step(lambda: lm_loss(model, batch))
        z = {}
        for i, name in enumerate(order):
            dense = plain.direction(i, derive_seed(3, step, 0)).double()
            z[name] = dense.masked_fill(theta[name].abs() > limits[name], 0.0)
        if step % 2 == 0:  # the share asked for, up to ties; later in the epoch the weights have moved
            assert abs((z["model.embed_tokens.weight"] == 0).float().mean().item() - 0.3) < 1e-3
        with torch.no_grad():
            plus = lm_loss(model, batch, {k: theta[k] + 1e-3 * z[k] for k in theta}).item()
            minus = lm_loss(model, batch, {k: theta[k] - 1e-3 * z[k] for k in theta}).item()
        for name in theta:
            theta[name] = theta[name] - 1e-2 * (plus - minus) / 2e-3 * z[name]
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), theta[name], rtol=0, atol=1e-9 if perturbation == "inplace" else 1e-12)


def test_magnitude_masks_refuse_fsdp_shards_and_pack_one_bit_per_weight():
    from zotune.sparse_masks import bits_at, packed_bits

    flags = torch.rand(1003, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = packed_bits(flags)
    assert bits.dtype == torch.uint8 and bits.numel() == 126
    assert torch.equal(bits_at(bits, torch.arange(1003)), flags)
    assert torch.equal(bits_at(bits, torch.tensor([[5, 1002], [0, 999]])), flags[torch.tensor([[5, 1002], [0, 999]])])


def test_bad_sparse_options(tiny_llama):
    for build, message in [
        (lambda: MeZO(tiny_llama, sparsity=1.0), r"sparsity must be .* in \[0, 1\)"),
        (lambda: MeZO(tiny_llama, sparsity=0.5, sparse_shares="rows"), "layer, global or magnitude"),
        (lambda: MeZO(tiny_llama, sparsity=0.5, mask_every=0), "mask_every must be a positive"),
        (lambda: ZOSGDMomentum(tiny_llama, buffer="replay", sparsity=0.5, sparse_shares="magnitude"), "or buffer=dense"),
    ]:
        with pytest.raises(OptionError, match=message):
            build()
