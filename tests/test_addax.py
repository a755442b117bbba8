import math

import pytest
import torch
from torch import nn

from conftest import keyed_direction, lm_loss, resume_and_compare
from test_inplace_sgd import NaNGradient
from zotune import Addax, InPlaceSGD, MeZO, NonFiniteGradientError, NonFiniteLossError
from zotune.config import TrainConfig
from zotune.directions import derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import is_decayed
from zotune.train import build_optimizer


def naive_addax(
    model, long_batch, short_batch, *, steps, lr, alpha, mixing, eps, weight_decay, seed, direction, clip_grad_norm=None
):
    """Addax as the paper writes it: dense z, an explicit full gradient on the short batch, no hooks; with
    ``clip_grad_norm``, that gradient clipped by torch.nn.utils.clip_grad_norm_."""
    theta = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    w0, w1 = (alpha, 1 - alpha) if mixing == "convex" else (alpha, 1.0)
    for step in range(steps):
        z = {name: direction(name, derive_seed(seed, step, 0)).to(theta[name].dtype) for name in theta}
        with torch.no_grad():
            plus = lm_loss(model, long_batch, {n: theta[n] + eps * z[n] for n in theta}).item()
            minus = lm_loss(model, long_batch, {n: theta[n] - eps * z[n] for n in theta}).item()
        projected = (plus - minus) / (2 * eps)
        leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        grads = dict(zip(leaves, torch.autograd.grad(lm_loss(model, short_batch, leaves), list(leaves.values()))))
        if clip_grad_norm is not None:
            for name, leaf in leaves.items():
                leaf.grad = grads[name]
            torch.nn.utils.clip_grad_norm_(list(leaves.values()), clip_grad_norm)
            grads = {name: leaf.grad for name, leaf in leaves.items()}
        for name in theta:
            decay = weight_decay if is_decayed(name, theta[name]) else 0.0
            direction_sum = w1 * grads[name] + w0 * projected * z[name]
            theta[name] = theta[name] - lr * (direction_sum + decay * theta[name])
    return theta


def batches():
    generator = torch.Generator().manual_seed(5)
    return torch.randint(0, 64, (3, 20), generator=generator), torch.randint(0, 64, (4, 6), generator=generator)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("mixing,alpha", [("convex", 0.3), ("additive", 0.05)])
@pytest.mark.parametrize("tie", [True, False])
def test_addax_matches_naive_reference(exact, mixing, alpha, tie):
    check_against_naive_reference(exact, mixing, alpha, tie)


def check_against_naive_reference(exact, mixing, alpha, tie, device="cpu", clip_grad_norm=None):
    """Three float64 Addax steps on ``device`` against :func:`naive_addax` with the same keyed directions;
    returns the optimizer."""
    long_batch, short_batch = (batch.to(device) for batch in batches())
    model = random_llama("tiny", seed=0, tie_embeddings=tie).double().to(device)
    reference_model = random_llama("tiny", seed=0, tie_embeddings=tie).double().to(device)
    options = dict(lr=0.05, alpha=alpha, mixing=mixing, eps=1e-3, weight_decay=0.1, seed=7, clip_grad_norm=clip_grad_norm)
    if exact:
        optimizer = Addax(model, **options)
    else:  # parameters only (in-place perturbation), MeZO's no-decay rule through groups
        named = list(model.named_parameters())
        optimizer = Addax(
            [
                {"params": [p for n, p in named if is_decayed(n, p)]},
                {"params": [p for n, p in named if not is_decayed(n, p)], "weight_decay": 0.0},
            ],
            **options,
        )
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    expected = naive_addax(
        reference_model,
        long_batch,
        short_batch,
        steps=3,
        direction=keyed_direction(model, optimizer),
        **{k: v for k, v in options.items()},
    )
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-10, atol=1e-10, msg=name)
    return optimizer


@pytest.mark.parametrize("mixing,alpha", [("convex", 0.3), ("additive", 0.05)])
def test_clip_grad_norm_clips_the_first_order_term_as_torch_does(mixing, alpha):
    """Only ∇L_B1 is clipped: c·z, about √d times its norm, would dominate a clip of the mixed update."""
    optimizer = check_against_naive_reference(True, mixing, alpha, tie=False, clip_grad_norm=0.5)
    assert optimizer.last_grad_norm > 0.5


def test_the_first_order_term_is_clipped_by_the_norm_of_the_gradient_averaged_over_the_ranks():
    """A stand-in data-parallel average (three times this rank's gradient) is clipped as the gradient of 3·L_B1."""
    long_batch, short_batch = batches()
    models = [random_llama("tiny", seed=0).double() for _ in range(2)]
    options = {"lr": 0.05, "alpha": 0.3, "seed": 7, "clip_grad_norm": 0.5}
    averaged, scaled = Addax(models[0], **options), Addax(models[1], **options)
    averaged.reduce_gradient = lambda grad: grad.mul_(3.0)
    averaged.step(lambda: lm_loss(models[0], long_batch), lambda: lm_loss(models[0], short_batch))
    scaled.step(lambda: lm_loss(models[1], long_batch), lambda: 3 * lm_loss(models[1], short_batch))
    assert averaged.last_grad_norm == pytest.approx(scaled.last_grad_norm, rel=1e-12)
    assert averaged.last_grad_norm / 3 > 0.5  # a norm taken before the average would clip by another factor
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_clipping_refuses_a_non_finite_first_order_gradient_before_any_update():
    long_batch, short_batch = batches()
    model = random_llama("tiny", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = Addax(model, lr=0.01, alpha=0.1, clip_grad_norm=1.0)
    with pytest.raises(
        NonFiniteGradientError, match=r"step 0 \(direction seed \d+\) with a finite loss: the parameters were not"
    ):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: NaNGradient.apply(lm_loss(model, short_batch)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state["zo"]["step"] == 0  # the refused step consumed nothing


def test_a_gradient_left_by_a_backward_outside_step_never_enters_an_update():
    long_batch, short_batch = batches()
    model, fresh = random_llama("tiny", seed=0), random_llama("tiny", seed=0)
    optimizer = Addax(model, lr=0.01, alpha=0.1, seed=4)
    lm_loss(model, long_batch).backward()  # outside step: the gradients stay in .grad
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OptionError, match=r"parameters hold a gradient .*: call optimizer\.zero_grad\(\) before step\(\)"):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.state["zo"]["step"] == 0
    optimizer.zero_grad()
    optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    Addax(fresh, lr=0.01, alpha=0.1, seed=4).step(lambda: lm_loss(fresh, long_batch), lambda: lm_loss(fresh, short_batch))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_update_is_computed_in_float32_and_rounded_once(dtype):
    """θ ← round(θ·(1 − lr·wd) + a·z − lr·w1·g), θ, z and g in float32 (the same operations as the update, so
    exactly); rounding the decayed ZO part first, as a separate gradient step does, gives other weights."""
    long_batch, short_batch = batches()
    model = random_llama("tiny", dtype=dtype, seed=0, tie_embeddings=False)
    copy = random_llama("tiny", dtype=dtype, seed=0, tie_embeddings=False)
    lr = 0.05
    optimizer = Addax(model, lr=lr, alpha=0.3, eps=1e-2, weight_decay=0.1, seed=7)
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(lm_loss(copy, short_batch), list(copy.parameters()))
    optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    estimate, (w0, w1) = optimizer.last_estimates[0], optimizer.weights
    index = {id(p): i for i, p in enumerate(optimizer.engine.params)}
    decay = {id(p): 1.0 - lr * g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    rounded_twice = []
    for (name, param), theta, grad in zip(model.named_parameters(), before, grads):
        z = optimizer.engine.direction(index[id(param)], estimate.seed)
        zeroth_order = (theta.float() * decay[id(param)]).add(z, alpha=-lr * (w0 * estimate.projected_gradient))
        assert torch.equal(param, zeroth_order.add(grad.float(), alpha=-lr * w1).to(dtype)), name
        rounded_twice.append(torch.equal(param, zeroth_order.to(dtype).add(grad, alpha=-lr * w1)))
    assert not all(rounded_twice)


@pytest.mark.parametrize("name", ["addax", "addax-wa"])
def test_clip_grad_norm_reaches_the_optimizer_from_the_config(name, tiny_llama):
    config = TrainConfig(optimizer=name, lr=0.1, optimizer_options={"clip_grad_norm": 0.5, "K0": 2})
    assert build_optimizer(config, tiny_llama).clip_grad_norm == 0.5


def test_no_full_gradient_is_held_during_backward():
    long_batch, short_batch = batches()
    model = random_llama("tiny", seed=0)
    optimizer = Addax(model, lr=0.01, alpha=0.1)
    params = list(model.parameters())
    held = []
    for param in params:  # registered after the optimizer's hooks, so it runs after each update
        param.register_post_accumulate_grad_hook(lambda _: held.append(sum(p.grad is not None for p in params)))
    optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    assert held and max(held) == 0


def test_tensor_the_short_batch_does_not_reach_still_gets_decay_and_zeroth_order_part():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 1, bias=False)
            self.unused_by_short = nn.Linear(4, 1, bias=False)

    model = TwoHeads().double()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    optimizer = Addax(model, lr=0.1, alpha=0.5, weight_decay=0.2, seed=3)
    before = model.unused_by_short.weight.detach().clone()
    optimizer.step(lambda: (model.used(x) + model.unused_by_short(x)).pow(2).mean(), lambda: model.used(x).pow(2).mean())
    c = optimizer.last_estimates[0].projected_gradient
    z = optimizer.engine.direction(1, optimizer.last_estimates[0].seed).double()
    torch.testing.assert_close(model.unused_by_short.weight, before * (1 - 0.1 * 0.2) - 0.1 * 0.5 * c * z)


def test_one_sided_steps_are_mezo_and_ip_sgd():
    long_batch, short_batch = batches()
    addax_model, mezo_model, sgd_model = (random_llama("tiny", seed=0).double() for _ in range(3))
    addax = Addax(addax_model, lr=0.01, alpha=0.2, seed=1)
    addax.step(lambda: lm_loss(addax_model, long_batch), None)
    MeZO(mezo_model, lr=0.01, seed=1).step(lambda: lm_loss(mezo_model, long_batch))
    for a, b in zip(addax_model.parameters(), mezo_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    addax.step(None, lambda: lm_loss(addax_model, short_batch))
    for param in mezo_model.parameters():
        param.requires_grad_(True)
    sgd = InPlaceSGD(mezo_model, lr=0.01)
    sgd.step(lambda: lm_loss(mezo_model, short_batch))
    for a, b in zip(addax_model.parameters(), mezo_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(addax.last_losses) == {"fo"}


def addax_steps():
    """``step(model, optimizer, k)`` for resume_and_compare: the long and the short batch."""
    long_batch, short_batch = batches()
    return lambda model, optimizer, k: optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))


def test_resume_is_exact():
    long_batch, short_batch = batches()
    model = random_llama("tiny", seed=0)
    optimizer = Addax(model, lr=0.01, alpha=0.1, seed=2)
    step = lambda m, o: o.step(lambda: lm_loss(m, long_batch), lambda: lm_loss(m, short_batch))  # noqa: E731
    step(model, optimizer)
    saved_model, saved_state = {k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict()
    step(model, optimizer)
    resumed = random_llama("tiny", seed=9)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = Addax(resumed, lr=0.01, alpha=0.1, seed=0)
    resumed_optimizer.load_state_dict(saved_state)
    step(resumed, resumed_optimizer)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_non_finite_first_order_loss_stops_with_weights_untouched():
    long_batch, _ = batches()
    model = random_llama("tiny", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = Addax(model, lr=0.01, alpha=0.1)
    with pytest.raises(NonFiniteLossError, match="step 0"):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: torch.tensor(math.nan, requires_grad=True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_addax_beats_mezo_per_step_on_the_same_data_and_seed():
    long_batch, short_batch = batches()
    losses = {}
    for name in ("addax", "mezo"):
        model = random_llama("tiny", seed=0)
        if name == "addax":
            optimizer = Addax(model, lr=0.05, alpha=0.01, seed=0)
            step = lambda: optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))  # noqa: E731
        else:  # MeZO sees both batches' examples through its one estimate
            optimizer = MeZO(model, lr=1e-3, seed=0)
            step = lambda: optimizer.step(lambda: (lm_loss(model, long_batch) + lm_loss(model, short_batch)) / 2)  # noqa: E731
        for _ in range(30):
            step()
        with torch.no_grad():
            losses[name] = ((lm_loss(model, long_batch) + lm_loss(model, short_batch)) / 2).item()
    assert losses["addax"] < losses["mezo"] - 0.5


def test_bad_options(tiny_llama):
    with pytest.raises(OptionError, match="mixing"):
        Addax(tiny_llama, mixing="average")
    with pytest.raises(OptionError, match="alpha"):
        Addax(tiny_llama, alpha=1.5)
    with pytest.raises(TypeError, match="zo_closure"):
        Addax(tiny_llama).step()
    with pytest.raises(OptionError, match="clip_grad_norm must be a positive number or None, got -1"):
        Addax(tiny_llama, clip_grad_norm=-1)


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
def test_sparse_addax_matches_naive_reference_with_masked_directions(exact):
    """sparsity: the zeroth-order term's z under each step's seeded mask (renewed every 2 steps), in the
    estimate on the long batch and in the update inside backward alike."""
    from test_sparse_masks import stored_masked_directions

    long_batch, short_batch = batches()
    model = random_llama("tiny", seed=0).double()
    reference_model = random_llama("tiny", seed=0).double()
    options = dict(lr=0.05, alpha=0.3, mixing="convex", eps=1e-3, weight_decay=0.0, seed=7)
    optimizer = Addax(model if exact else list(model.parameters()), **options, sparsity=0.5, mask_every=2)
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    direction = stored_masked_directions(model, optimizer, 7, 3, 0.5, 2)
    expected = naive_addax(reference_model, long_batch, short_batch, steps=3, direction=direction, **options)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("shares", ["layer", "magnitude"])
def test_sparse_addax_at_zero_lr_is_bit_exact_and_resumes_exactly(shares):
    long_batch, short_batch = batches()
    model = random_llama("tiny", seed=0, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = Addax(model, lr=0.0, alpha=0.1, seed=2, sparsity=0.5, sparse_shares=shares)
    for _ in range(2):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    build = lambda m: Addax(m, lr=0.01, alpha=0.1, seed=2, sparsity=0.5, sparse_shares=shares, mask_every=2)  # noqa: E731
    resume_and_compare(build, None, steps_before=3, steps_after=2, step=addax_steps())


def test_blockwise_addax_mixes_each_blocks_own_estimate_into_its_parameters_updates():
    """blocks: one estimate on the long batch per transformer block (the others at θ), and each parameter's
    zeroth-order term its own block's c·z, beside the full gradient of the short batch."""
    long_batch, short_batch = batches()
    model = random_llama("tiny", seed=0).double()
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = Addax(model, lr=0.05, alpha=0.3, eps=1e-3, seed=7, blocks="layer")
    direction = keyed_direction(model, optimizer)
    name_of = {id(p): name for name, p in model.named_parameters()}
    block_of = {name_of[id(optimizer.param_list[i])]: b for b, block in enumerate(optimizer.blocks) for i in block}
    for step in range(2):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
        z = {name: direction(name, derive_seed(7, step, 0)).double() for name in theta}

        def moved(b, sign):
            return {n: v + sign * 1e-3 * z[n] if block_of[n] == b else v for n, v in theta.items()}

        with torch.no_grad():
            projected = [
                (lm_loss(model, long_batch, moved(b, 1)).item() - lm_loss(model, long_batch, moved(b, -1)).item()) / 2e-3
                for b in range(len(optimizer.blocks))
            ]
        leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        grads = dict(zip(leaves, torch.autograd.grad(lm_loss(model, short_batch, leaves), list(leaves.values()))))
        theta = {n: v - 0.05 * (0.7 * grads[n] + 0.3 * projected[block_of[n]] * z[n]) for n, v in theta.items()}
    assert len(set(projected)) == len(projected) > 2  # the blocks' estimates differ
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, theta[name], rtol=1e-10, atol=1e-10, msg=name)
    assert len(optimizer.last_estimates) == len(optimizer.blocks)
