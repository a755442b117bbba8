from functools import partial

import pytest
import torch

from conftest import keyed_direction, lm_loss, resume_and_compare
from zotune import MeZO, MeZOSVRG
from zotune.directions import derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama


def naive_svrg(model, batches, large_batch, *, lr, anchor_lr, anchor_every, eps, seed, direction):
    """MeZO-SVRG as the paper writes it: dense z, θ̃ and G stored as tensors, every point built explicitly."""
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}

    def projected(params, z, batch):
        with torch.no_grad():
            plus = lm_loss(model, batch, {n: params[n] + eps * z[n] for n in params}).item()
            minus = lm_loss(model, batch, {n: params[n] - eps * z[n] for n in params}).item()
        return (plus - minus) / (2 * eps)

    for step, batch in enumerate(batches):
        z = {name: direction(name, derive_seed(seed, step, 0)).to(theta[name].dtype) for name in theta}
        if step % anchor_every == 0:
            anchor = {n: t.clone() for n, t in theta.items()}
            c = projected(theta, z, large_batch)
            full = {n: c * z[n] for n in theta}
            theta = {n: theta[n] - anchor_lr * full[n] for n in theta}
        else:
            difference = projected(theta, z, batch) - projected(anchor, z, batch)
            theta = {n: theta[n] - lr * (difference * z[n] + full[n]) for n in theta}
    return theta


def data(steps):
    generator = torch.Generator().manual_seed(3)
    large = torch.randint(0, 64, (12, 10), generator=generator)
    return [large[torch.randperm(12, generator=generator)[:4]] for _ in range(steps)], large


@pytest.mark.parametrize("memory", ["seeds", "dense"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("anchor_every", [2, 3])
def test_svrg_matches_naive_reference(memory, exact, anchor_every):
    batches, large = data(7)
    model = random_llama("tiny", seed=0).double()
    reference_model = random_llama("tiny", seed=0).double()
    options = dict(lr=0.005, anchor_lr=0.01, anchor_every=anchor_every, eps=1e-3, seed=5)  # a stable path: a diverging
    # one amplifies the rounding of in-place moves past any tolerance
    optimizer = MeZOSVRG(model if exact else model.parameters(), memory=memory, **options)
    for batch in batches:
        optimizer.step(lambda: lm_loss(model, batch), lambda: lm_loss(model, large))
    expected = naive_svrg(reference_model, batches, large, direction=keyed_direction(model, optimizer), **options)
    # In-place mode moves θ (to θ±εz and, in seeds mode, to θ̃ and back): ~1e-14 of float64 rounding per
    # move, which c = ΔL/2ε multiplies by |∇L|·√d/2ε (~1e4 here) into later steps; module mode never moves θ.
    tolerance = 1e-10 if exact else 1e-8
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=tolerance, atol=tolerance, msg=name)


def test_seeds_mode_holds_no_parameter_sized_state():
    batches, large = data(3)
    model = random_llama("tiny", seed=0)
    optimizer = MeZOSVRG(model, lr=0.01, anchor_lr=0.01, memory="seeds")
    for batch in batches:
        optimizer.step(lambda: lm_loss(model, batch), lambda: lm_loss(model, large))
    state = optimizer.state_dict()["state"]
    assert set(state) == {"zo"} and len(state["zo"]["path"]) <= 2
    dense = MeZOSVRG(model, lr=0.01, anchor_lr=0.01, memory="dense")
    dense.step(None, lambda: lm_loss(model, large))
    assert all({"anchor", "anchor_gradient"} <= set(dense.state[p]) for p in model.parameters())


def svrg_steps(batches, large):
    """``step(model, optimizer, k)`` for resume_and_compare: step k on ``batches[k]``, ``large`` at anchors."""
    return lambda model, optimizer, k: optimizer.step(lambda: lm_loss(model, batches[k]), lambda: lm_loss(model, large))


@pytest.mark.parametrize("memory", ["seeds", "dense"])
def test_resume_is_exact(memory):
    batches, large = data(6)
    build = lambda m: MeZOSVRG(m, lr=0.01, anchor_lr=0.02, anchor_every=3, memory=memory, seed=4)  # noqa: E731
    resume_and_compare(build, None, steps_before=2, steps_after=4, step=svrg_steps(batches, large))


def test_svrg_direction_has_lower_variance_than_mezo_near_a_solution():
    """Least squares near its minimum: per-example gradients are large, their mean is ~0. MeZO's direction
    carries the minibatch noise; SVRG's cancels it against the same minibatch at the anchor."""
    generator = torch.Generator().manual_seed(0)
    features, d = torch.randn(64, 20, generator=generator, dtype=torch.float64), 20
    targets = features @ torch.randn(d, generator=generator, dtype=torch.float64) + torch.randn(
        64, generator=generator, dtype=torch.float64
    )
    solution = torch.linalg.lstsq(features, targets[:, None]).solution[:, 0]
    start = solution + 1e-3 * torch.randn(d, generator=generator, dtype=torch.float64)
    loss = lambda w, rows: 0.5 * ((features[rows] @ w - targets[rows]) ** 2).mean()  # noqa: E731
    errors = {"mezo": [], "svrg": []}
    for trial in range(300):
        rows = torch.randperm(64, generator=generator)[:4]
        svrg_w = start.clone().requires_grad_()
        svrg = MeZOSVRG([svrg_w], lr=1.0, anchor_lr=1e-2, eps=1e-4, seed=trial)
        svrg.step(None, lambda: loss(svrg_w, slice(None)))  # anchor at the start, then a small move
        point = svrg_w.detach().clone()
        true_gradient = features.T @ (features @ point - targets) / 64
        mezo_w = point.clone().requires_grad_()
        MeZO([mezo_w], lr=1.0, eps=1e-4, seed=10_000 + trial).step(lambda: loss(mezo_w, rows))
        svrg.step(lambda: loss(svrg_w, rows))
        for name, moved in (("mezo", mezo_w), ("svrg", svrg_w)):
            errors[name].append(((point - moved.detach()) - true_gradient).pow(2).sum().item())
    mezo, svrg = (torch.tensor(errors[name]).mean().item() for name in ("mezo", "svrg"))
    assert svrg < mezo / 5, (svrg, mezo)


def test_svrg_lowers_the_loss_of_a_tiny_model():
    batches, large = data(200)
    model = random_llama("tiny", seed=0)
    optimizer = MeZOSVRG(model, lr=3e-3, anchor_lr=3e-3, seed=0)
    with torch.no_grad():
        before = lm_loss(model, large).item()
    for batch in batches:
        optimizer.step(lambda: lm_loss(model, batch), lambda: lm_loss(model, large))
    # Over seeds 0-4 the loss falls by 0.143-0.160 (measured); 0.1 leaves room for the direction stream.
    with torch.no_grad():
        assert lm_loss(model, large).item() < before - 0.1


def naive_annealed_rates(losses, *, lr, anchor_lr, anneal, window, threshold=0.05, min_lr=1e-6, min_anchor_lr=1e-5):
    """The official code's schedule as a plain loop over the losses the steps report: the (lr, anchor_lr) each
    step updates with. Step t checks before its update, when t is a multiple of the window and more than 4
    windows of losses are in, the last window's mean against the mean of the window two windows before it."""
    rates = []
    for t in range(len(losses)):
        if t % window == 0 and t > 4 * window:
            recent = sum(losses[t - window : t]) / window
            earlier = sum(losses[t - 3 * window : t - 2 * window]) / window
            if recent / earlier > 1 + threshold:
                lr = lr if lr <= min_lr else max(lr / anneal, min_lr)  # a rate at or below its floor stays
                anchor_lr = anchor_lr if anchor_lr <= min_anchor_lr else max(anchor_lr / anneal, min_anchor_lr)
        rates.append((lr, anchor_lr))
    return rates


def scripted_rates(losses, **options):
    """The rates each step of MeZO-SVRG updates with when every loss it sees is scripted (so c = 0 and the
    reported loss is the script's). A step anneals before its update, so its group holds them after it."""
    weight = torch.zeros(3, requires_grad=True)
    optimizer = MeZOSVRG([weight], **options)

    def scripted():
        return losses[optimizer.state["zo"]["step"]]

    rates = []
    for loss in losses:
        assert optimizer.step(scripted, scripted) == loss
        rates.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["anchor_lr"]))
    return rates


@pytest.mark.parametrize("rise", [1.06, 1.04])
def test_annealing_divides_both_rates_when_the_loss_rises_more_than_5_percent(rise):
    losses = [1.0] * 11 + [rise] * 13
    options = {"lr": 1e-4, "anchor_lr": 1e-3, "anneal": 5.0}
    rates = scripted_rates(losses, anneal_window=2, **options)
    assert rates == naive_annealed_rates(losses, window=2, **options)
    # Window 2: step 12 compares steps 10-11 (half risen) with 6-7; step 14 compares 12-13 with 8-9, the first
    # full rise; later checks compare risen losses with partly or fully risen ones.
    expected = [(1e-4, 1e-3)] * 14 + [(1e-4 / 5, 1e-3 / 5)] * 10 if rise > 1.05 else [(1e-4, 1e-3)] * 24
    assert rates == expected


@pytest.mark.parametrize("lr", [4e-6, 1e-7])
def test_annealing_stops_at_the_floors(lr):
    losses = [1.1**t for t in range(12)]  # window 1: every check from step 5 on sees a 21% rise
    options = {"lr": lr, "anchor_lr": 1e-4, "anneal": 2.0}
    rates = scripted_rates(losses, anneal_window=1, **options)
    assert rates == naive_annealed_rates(losses, window=1, **options)
    assert [anchor for _, anchor in rates[4:9]] == [1e-4, 5e-5, 2.5e-5, 1.25e-5, 1e-5]
    # 1e-7 starts below the η2 floor of 1e-6 and stays there (the code's max() would raise it to 1e-6).
    assert rates[-1] == (min(lr, 1e-6), 1e-5)


def offset_loss(model, batch, optimizer, offsets):
    """The model's loss plus a scripted offset for the step being taken: a rise the annealing must react to."""
    return lambda: lm_loss(model, batch) + offsets[optimizer.state["zo"]["step"]]


@pytest.mark.parametrize("memory", ["seeds", "dense"])
def test_annealed_rates_are_the_ones_the_update_uses(memory):
    batches, large = data(10)
    offsets = [0.0] * 4 + [1.0] * 6  # window 1: steps 5 and 6 see a rise of ~25% over steps 2 and 3
    options = {"lr": 0.01, "anchor_lr": 0.02, "anchor_every": 3, "memory": memory, "seed": 4}
    model, by_hand_model = random_llama("tiny", seed=0), random_llama("tiny", seed=0)
    optimizer = MeZOSVRG(model, anneal=2.0, anneal_window=1, anneal_min_lr=0.0, anneal_min_anchor_lr=0.0, **options)
    by_hand = MeZOSVRG(by_hand_model, **options)
    losses, rates = [], []
    for batch in batches:
        losses.append(
            optimizer.step(offset_loss(model, batch, optimizer, offsets), offset_loss(model, large, optimizer, offsets))
        )
        rates.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["anchor_lr"]))
        for group in by_hand.param_groups:
            group["lr"], group["anchor_lr"] = rates[-1]
        by_hand.step(offset_loss(by_hand_model, batch, by_hand, offsets), offset_loss(by_hand_model, large, by_hand, offsets))
    assert rates == naive_annealed_rates(losses, lr=0.01, anchor_lr=0.02, anneal=2.0, window=1, min_lr=0.0, min_anchor_lr=0.0)
    assert rates[4] == (0.01, 0.02) and rates[6] == (0.0025, 0.005) == rates[-1]
    assert all(group["lr"] == 0.0025 for group in optimizer.param_groups)
    for a, b in zip(model.parameters(), by_hand_model.parameters()):
        assert torch.equal(a, b)


def test_annealing_is_off_by_default_and_changes_nothing_until_it_fires():
    losses = [1.1**t for t in range(12)]
    assert scripted_rates(losses, lr=1e-4, anchor_lr=1e-3) == [(1e-4, 1e-3)] * 12
    batches, large = data(12)
    models = [random_llama("tiny", seed=0) for _ in range(3)]
    options = {"lr": 3e-3, "anchor_lr": 3e-3, "seed": 2}
    optimizers = [
        MeZOSVRG(models[0], **options),
        MeZOSVRG(models[1], anneal=None, **options),
        MeZOSVRG(models[2], anneal=5.0, anneal_window=1, **options),
    ]  # a falling loss: no rise of 5%
    assert set(optimizers[0].state["zo"]) == {"seed", "step", "stream", "anchor_gradient", "path"}
    for batch in batches:
        for model, optimizer in zip(models, optimizers):
            optimizer.step(partial(lm_loss, model, batch), partial(lm_loss, model, large))
    assert optimizers[2].param_groups[0]["lr"] == 3e-3 and len(optimizers[2].state["zo"]["anneal_losses"]) == 3
    for model in models[1:]:
        for a, b in zip(models[0].parameters(), model.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("memory", ["seeds", "dense"])
def test_resume_with_annealing_is_exact(memory):
    """Saved after 5 steps; steps 5 and 6 anneal on losses from before the save, so the saved losses decide."""
    batches, large = data(10)
    offsets = [0.0] * 4 + [1.0] * 6

    def build(model):
        return MeZOSVRG(
            model,
            lr=0.01,
            anchor_lr=0.02,
            anchor_every=3,
            memory=memory,
            seed=4,
            anneal=2.0,
            anneal_window=1,
            anneal_min_lr=0.0,
            anneal_min_anchor_lr=0.0,
        )

    model = random_llama("tiny", seed=0)
    optimizer = build(model)
    for batch in batches[:5]:
        optimizer.step(offset_loss(model, batch, optimizer, offsets), offset_loss(model, large, optimizer, offsets))
    saved_model, saved_state = {k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict()
    assert optimizer.param_groups[0]["lr"] == 0.01 and len(saved_state["state"]["zo"]["anneal_losses"]) == 3
    for batch in batches[5:]:
        optimizer.step(offset_loss(model, batch, optimizer, offsets), offset_loss(model, large, optimizer, offsets))
    resumed = random_llama("tiny", seed=9)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = build(resumed)
    resumed_optimizer.load_state_dict(saved_state)
    for batch in batches[5:]:
        resumed_optimizer.step(
            offset_loss(resumed, batch, resumed_optimizer, offsets), offset_loss(resumed, large, resumed_optimizer, offsets)
        )
    assert all(g["lr"] == 0.0025 for g in resumed_optimizer.param_groups + optimizer.param_groups)
    assert resumed_optimizer.state["zo"]["anneal_losses"] == optimizer.state["zo"]["anneal_losses"]
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_options_and_missing_large_batch(tiny_llama):
    with pytest.raises(OptionError, match="memory must be one of seeds, dense"):
        MeZOSVRG(tiny_llama, memory="sparse")
    with pytest.raises(OptionError, match="anchor_every"):
        MeZOSVRG(tiny_llama, anchor_every=1)
    with pytest.raises(OptionError, match="anneal must be > 1"):
        MeZOSVRG(tiny_llama, anneal=1.0)
    with pytest.raises(OptionError, match="anneal_window must be a positive integer"):
        MeZOSVRG(tiny_llama, anneal=5.0, anneal_window=0)
    with pytest.raises(OptionError, match="anneal_threshold must be >= 0"):
        MeZOSVRG(tiny_llama, anneal=5.0, anneal_threshold=-0.05)
    with pytest.raises(OptionError, match="anneal_min_lr and anneal_min_anchor_lr must be >= 0"):
        MeZOSVRG(tiny_llama, anneal=5.0, anneal_min_anchor_lr=-1e-5)
    with pytest.raises(TypeError, match="step 0 is an anchor step"):
        MeZOSVRG(tiny_llama).step(lambda: 0.0)


@pytest.mark.parametrize("memory", ["seeds", "dense"])
def test_sparse_svrg_matches_naive_reference_with_each_steps_masked_direction(memory):
    """Masks renewed every step: in seeds mode the estimate at θ̃ replays the path's directions (G's among
    them) under their own steps' masks."""
    from test_sparse_masks import stored_masked_directions

    batches, large = data(7)
    model = random_llama("tiny", seed=0).double()
    reference_model = random_llama("tiny", seed=0).double()
    options = dict(lr=0.005, anchor_lr=0.01, anchor_every=3, eps=1e-3, seed=5)
    optimizer = MeZOSVRG(model, memory=memory, sparsity=0.5, **options)
    for batch in batches:
        optimizer.step(lambda: lm_loss(model, batch), lambda: lm_loss(model, large))
    direction = stored_masked_directions(model, optimizer, 5, 7, 0.5, 1)
    expected = naive_svrg(reference_model, batches, large, direction=direction, **options)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("memory,shares", [("seeds", "layer"), ("dense", "magnitude")])
def test_sparse_svrg_resumes_exactly(memory, shares):
    batches, large = data(6)
    options = dict(lr=0.01, anchor_lr=0.02, anchor_every=3, memory=memory, seed=4, sparsity=0.5, sparse_shares=shares)
    resume_and_compare(lambda m: MeZOSVRG(m, **options), None, steps_before=2, steps_after=4, step=svrg_steps(batches, large))
    model = random_llama("tiny", seed=0)
    with pytest.raises(OptionError, match="or memory=dense"):
        MeZOSVRG(model, sparsity=0.5, sparse_shares="magnitude")


def test_blockwise_svrg_in_dense_memory_takes_each_blocks_own_estimates():
    """blocks (memory=dense): G, c(θ) and c(θ̃) one estimate per block, the other blocks at the same point
    (θ̃ for c(θ̃)), each parameter updated with its own block's."""
    batches, large = data(5)
    model = random_llama("tiny", seed=0).double()
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    options = dict(lr=0.005, anchor_lr=0.01, anchor_every=3, eps=1e-3, seed=5)
    optimizer = MeZOSVRG(model, memory="dense", blocks="layer", **options)
    for batch in batches:
        optimizer.step(lambda: lm_loss(model, batch), lambda: lm_loss(model, large))
    direction = keyed_direction(model, optimizer)
    name_of = {id(p): name for name, p in model.named_parameters()}
    block_of = {name_of[id(optimizer.param_list[i])]: b for b, block in enumerate(optimizer.blocks) for i in block}

    def projected(point, z, batch):
        """Each block's c at ``point``, the block alone moved by ±εz."""
        out = []
        with torch.no_grad():
            for b in range(len(optimizer.blocks)):
                moved = [{n: v + s * 1e-3 * z[n] if block_of[n] == b else v for n, v in point.items()} for s in (1, -1)]
                out.append((lm_loss(model, batch, moved[0]).item() - lm_loss(model, batch, moved[1]).item()) / 2e-3)
        return out

    for step, batch in enumerate(batches):
        z = {name: direction(name, derive_seed(5, step, 0)).double() for name in theta}
        if step % 3 == 0:
            anchor, c = dict(theta), projected(theta, z, large)
            full = {n: c[block_of[n]] * z[n] for n in theta}
            theta = {n: v - 0.01 * full[n] for n, v in theta.items()}
        else:
            here, there = projected(theta, z, batch), projected(anchor, z, batch)
            theta = {n: v - 0.005 * ((here[block_of[n]] - there[block_of[n]]) * z[n] + full[n]) for n, v in theta.items()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, theta[name], rtol=1e-10, atol=1e-10, msg=name)
    with pytest.raises(OptionError, match="takes blocks with memory=dense"):
        MeZOSVRG(model, blocks="layer")
