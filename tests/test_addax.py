import math

import pytest
import torch
from torch import nn

from conftest import keyed_direction, lm_loss
from zotune import Addax, InPlaceSGD, MeZO, NonFiniteLossError
from zotune.directions import derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import is_decayed


def naive_addax(model, long_batch, short_batch, *, steps, lr, alpha, mixing, eps, weight_decay, seed, direction):
    """Addax as the paper writes it: dense z, an explicit full gradient on the short batch, no hooks."""
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


def check_against_naive_reference(exact, mixing, alpha, tie, device="cpu"):
    """Three float64 Addax steps on ``device`` against :func:`naive_addax` with the same keyed directions."""
    long_batch, short_batch = (batch.to(device) for batch in batches())
    model = random_llama("tiny", seed=0, tie_embeddings=tie).double().to(device)
    reference_model = random_llama("tiny", seed=0, tie_embeddings=tie).double().to(device)
    options = dict(lr=0.05, alpha=alpha, mixing=mixing, eps=1e-3, weight_decay=0.1, seed=7)
    if exact:
        optimizer = Addax(model, **options)
    else:  # parameters only (in-place perturbation), MeZO's no-decay rule through groups
        named = list(model.named_parameters())
        optimizer = Addax([{"params": [p for n, p in named if is_decayed(n, p)]},
                           {"params": [p for n, p in named if not is_decayed(n, p)], "weight_decay": 0.0}], **options)
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model, long_batch), lambda: lm_loss(model, short_batch))
    expected = naive_addax(reference_model, long_batch, short_batch, steps=3, direction=keyed_direction(model, optimizer),
                           **{k: v for k, v in options.items()})
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-10, atol=1e-10, msg=name)


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
    optimizer.step(lambda: (model.used(x) + model.unused_by_short(x)).pow(2).mean(),
                   lambda: model.used(x).pow(2).mean())
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
