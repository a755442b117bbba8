import math

import pytest
import torch
from conftest import keyed_direction, lm_loss, loss_before_and_after, resume_and_compare

from zotune.directions import BLOCK_SIZE, derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import AdaMeZO, MeZO, is_decayed


def naive_adamezo(
    model, input_ids, *, steps, lr, eps, weight_decay, window, beta1, beta2, delta, seed, direction, form="code", m_scale=None
):
    """AdaMeZO with the last ``window`` directions stored densely and m, v computed explicitly: ``form="code"``
    takes window + 1 plain MeZO steps first and scales m by ``m_scale`` (100 unless given); ``form="paper"``
    normalises m and v by (1 − β) from the first step on. β2 = 0: no second moment, m / (1 + δ)."""
    plain_steps = window + 1 if form == "code" else 0
    scale = (100.0 if m_scale is None else m_scale) if form == "code" else 1.0
    norm1, norm2 = (1 - beta1, 1 - beta2) if form == "paper" else (1.0, 1.0)
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = []  # (projected gradient, {name: z}) newest last
    for step in range(steps):
        s = derive_seed(seed, step, 0)
        z = {name: direction(name, s).to(theta[name].dtype) for name in theta}
        with torch.no_grad():
            plus = lm_loss(model, input_ids, {n: theta[n] + eps * z[n] for n in theta}).item()
            minus = lm_loss(model, input_ids, {n: theta[n] - eps * z[n] for n in theta}).item()
        projected = (plus - minus) / (2 * eps)
        history = (history + [(projected, z)])[-window:]
        for name, value in theta.items():
            decay = weight_decay if is_decayed(name, value) else 0.0
            if step + 1 <= plain_steps:
                theta[name] = value - lr * (projected * z[name] + decay * value)
            else:
                m = norm1 * sum(beta1**k * p * zs[name] for k, (p, zs) in enumerate(reversed(history)))
                v = norm2 * sum(beta2**k * p**2 * zs[name] ** 2 for k, (p, zs) in enumerate(reversed(history)))
                denominator = v.sqrt() + delta if beta2 > 0 else 1.0 + delta
                theta[name] = value - lr * (scale * m / denominator + decay * value)
    return theta


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
def test_adamezo_matches_naive_reference_through_and_after_warm_up(exact, batch):
    hyper = {
        "lr": 1e-4,
        "eps": 1e-3,
        "weight_decay": 0.1,
        "window": 3,
        "beta1": 0.7,
        "beta2": 0.9,
        "delta": 1e-5,
        "m_scale": 100.0,
        "seed": 11,
    }
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    reference = random_llama("tiny", dtype=torch.float64, seed=0)
    if exact:
        optimizer = AdaMeZO(model, **hyper)
    else:
        groups = [
            {"params": [p for n, p in model.named_parameters() if is_decayed(n, p)]},
            {"params": [p for n, p in model.named_parameters() if not is_decayed(n, p)], "weight_decay": 0.0},
        ]
        optimizer = AdaMeZO(groups, **hyper)
    for _ in range(7):  # 4 warm-up (MeZO) steps, window + 1 as in the official code, then 3 windowed steps
        optimizer.step(lambda: lm_loss(model, batch))
    expected = naive_adamezo(reference, batch, steps=7, direction=keyed_direction(model, optimizer), **hyper)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-10, msg=name)
    assert len(optimizer.state["zo"]["window"]) == 3


def test_moments_are_accumulated_in_float32_where_fp16_would_overflow():
    """P = 300 gives P² = 9e4 > 65504, fp16's largest value: fp16 sums of v would be inf and the update 0."""

    class Holder(torch.nn.Module):  # a model, so that the perturbation is module-wise and exact
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float16))

        def forward(self):
            return 600.0 * self.weight.float().mean()

    holder = Holder()
    param = holder.weight
    optimizer = AdaMeZO(holder, lr=1e-3, window=2, m_scale=1.0)
    optimizer.state["zo"] = {**optimizer.state["zo"], "step": 3, "window": [[5, 300.0]]}  # past the 3 plain steps
    optimizer.step(holder)
    estimate = optimizer.last_estimates[0]
    window = [(5, 300.0), (estimate.seed, estimate.projected_gradient)]
    z = {s: optimizer.engine.direction(0, s) for s, _ in window}  # float32
    m = sum(0.7**k * p * z[s] for k, (s, p) in enumerate(reversed(window)))
    v = sum(0.9**k * p**2 * z[s] ** 2 for k, (s, p) in enumerate(reversed(window)))
    expected = (-1e-3 * m / (v.sqrt() + 1e-5)).to(torch.float16)  # float32 math, rounded once
    assert torch.isfinite(param).all() and param.abs().max() > 0
    torch.testing.assert_close(param.detach(), expected, rtol=1e-3, atol=1e-7)
    assert torch.isinf(300.0**2 * z[5].half() ** 2).any()  # the same sum in fp16 overflows


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
@pytest.mark.parametrize("threads", [1, 2])
def test_windowed_update_in_float32_equals_moments_computed_densely(exact, threads):
    """float32 moments are generated and accumulated in one pass per seed; here against dense z tensors, on a
    parameter of two keyed blocks, with the in-place restore (whose seed is drawn once, for both uses)."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(-0.3, 0.3, BLOCK_SIZE + 1000))

        def forward(self):
            return 600.0 * self.weight.mean()

    holder = Holder()
    before = holder.weight.detach().clone()
    optimizer = AdaMeZO(holder if exact else holder.parameters(), lr=1.0, window=3, m_scale=1.0, num_threads=threads)
    optimizer.state["zo"] = {**optimizer.state["zo"], "step": 4, "window": [[5, 300.0], [6, -120.0]]}
    optimizer.step(holder)
    estimate = optimizer.last_estimates[0]
    window = [(5, 300.0), (6, -120.0), (estimate.seed, estimate.projected_gradient)]
    z = {s: optimizer.engine.direction(0, s) for s, _ in window}
    m = sum(0.7**k * p * z[s] for k, (s, p) in enumerate(reversed(window)))
    v = sum(0.9**k * p**2 * z[s] ** 2 for k, (s, p) in enumerate(reversed(window)))
    # lr = 1: the update is of the order of 1, so a few float32 roundings of it (~1e-7 each) are the whole
    # allowed difference; in-place θ + εz − 2εz + εz also rounds back to θ within an ulp of the weights (3e-8).
    torch.testing.assert_close(holder.weight.detach(), before - m / (v.sqrt() + 1e-5), rtol=0, atol=1e-6)


def test_zero_learning_rate_is_bit_exact_in_bf16(batch):
    model = random_llama("tiny", dtype=torch.bfloat16, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = AdaMeZO(model, lr=0.0, window=2)
    for _ in range(5):
        optimizer.step(lambda: lm_loss(model, batch))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_window_is_in_state_dict_and_resume_is_exact(batch):
    # Saved after 3 steps with a window of 2: resumed past the warm-up, with a full window.
    stream = resume_and_compare(lambda model: AdaMeZO(model, lr=1e-5, window=2, seed=3), batch, steps_before=3, steps_after=3)
    assert stream["step"] == 3 and len(stream["window"]) == 2


def test_adamezo_lowers_the_loss_of_a_tiny_model(batch):
    model = random_llama("tiny", seed=7)
    initial, final = loss_before_and_after(model, AdaMeZO(model, lr=3e-5, window=10, seed=0), batch, steps=300)
    assert final < initial - 0.3, (initial, final)


def test_bad_options(tiny_llama):
    with pytest.raises(OptionError, match="window must be a positive integer"):
        AdaMeZO(tiny_llama, window=0)
    with pytest.raises(OptionError, match="beta2 must be in"):
        AdaMeZO(tiny_llama, beta2=1.0)
    with pytest.raises(OptionError, match="form must be 'code' or 'paper'"):
        AdaMeZO(tiny_llama, form="adam")
    with pytest.raises(OptionError, match="m_scale applies to form='code' only"):
        AdaMeZO(tiny_llama, form="paper", m_scale=100.0)


@pytest.mark.parametrize(
    "form,beta2", [("paper", 0.9), ("code", 0.0), ("paper", 0.0)], ids=["paper", "code-momentum-only", "paper-momentum-only"]
)
def test_forms_and_momentum_only_match_naive_reference(form, beta2, batch):
    hyper = {
        "lr": 1e-4,
        "eps": 1e-3,
        "weight_decay": 0.1,
        "window": 3,
        "beta1": 0.7,
        "beta2": beta2,
        "delta": 1e-5,
        "seed": 11,
        "form": form,
    }
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    reference = random_llama("tiny", dtype=torch.float64, seed=0)
    optimizer = AdaMeZO(model, **hyper)
    for _ in range(6):  # code: 4 plain steps, then 2 windowed; paper: 6 windowed, the first 2 over a filling window
        optimizer.step(lambda: lm_loss(model, batch))
    expected = naive_adamezo(reference, batch, steps=6, direction=keyed_direction(model, optimizer), **hyper)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_plain_mezo_steps_come_first_in_the_code_form_only(form, batch):
    """The official trainer counts steps from 0 and takes the plain MeZO branch while the count is <= h: h + 1 plain
    steps. The paper form has none (a plain step at its lr, ~100x MeZO's, would be far too large)."""
    window = 2
    model, mezo_model = (random_llama("tiny", dtype=torch.float64, seed=0) for _ in range(2))
    adamezo = AdaMeZO(model, lr=1e-4, window=window, form=form, seed=3)
    mezo = MeZO(mezo_model, lr=1e-4, seed=3)
    plain_steps = window + 1 if form == "code" else 0
    for step in range(1, window + 3):
        adamezo.step(lambda: lm_loss(model, batch))
        mezo.step(lambda: lm_loss(mezo_model, batch))
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), mezo_model.parameters()))
        assert same == (step <= plain_steps), step


@pytest.mark.parametrize("beta2", [0.9, 0.0], ids=["adam", "momentum-only"])
def test_paper_form_at_the_mapped_lr_takes_the_code_forms_step(beta2):
    """With M, V the unnormalised sums, code takes lr·100·M/(√V + δ) and paper lr'·(1−β1)·M/(√(1−β2)·√V + δ'):
    the same step when lr' = lr·100·√(1−β2)/(1−β1) and δ' = δ·√(1−β2), and nearly when δ is negligible next to
    √v. β2 = 0 has no √V: lr' = lr·100/(1−β1), δ' = δ."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float64))  # zeros: θ after = the step

        def forward(self):
            return 600.0 * self.weight.mean()

    def step(form, lr, delta):
        holder = Holder()
        optimizer = AdaMeZO(holder, lr=lr, window=3, beta2=beta2, delta=delta, form=form, seed=5)
        optimizer.state["zo"] = {**optimizer.state["zo"], "step": 4, "window": [[5, 300.0], [6, -120.0]]}
        optimizer.step(holder)
        return holder.weight.detach()

    lr, root = 1e-7, math.sqrt(1 - beta2) if beta2 else 1.0
    mapped = AdaMeZO.paper_lr(lr, 0.7, beta2)
    assert mapped == pytest.approx(lr * 100 * root / (1 - 0.7), rel=1e-15)
    code = step("code", lr, 1e-5)
    assert code.abs().min() > 0
    torch.testing.assert_close(step("paper", mapped, 1e-5 * root), code, rtol=1e-12, atol=0)
    torch.testing.assert_close(step("paper", mapped, 1e-12), step("code", lr, 1e-12), rtol=1e-9, atol=0)


def test_default_learning_rate_fits_the_form(tiny_llama):
    def lr(**options):
        return AdaMeZO(tiny_llama, **options).param_groups[0]["lr"]

    assert lr() == 1e-7  # the official example's, on OPT-1.3B
    assert lr(form="paper") == pytest.approx(1e-7 * 100 * math.sqrt(1 - 0.9) / (1 - 0.7))  # ~1.05e-5
    assert lr(form="paper", beta1=0.9, beta2=0.0) == pytest.approx(1e-7 * 100 / (1 - 0.9))
    assert lr(form="paper", lr=3e-6) == 3e-6


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
def test_sparse_adamezo_replays_each_direction_under_its_own_steps_mask(exact, batch):
    """Sparse directions with masks renewed every 2 steps and a window of 3: the moments mix directions drawn
    under different masks, each replayed under its own (the naive reference stores every masked z)."""
    from test_sparse_masks import stored_masked_directions

    hyper = dict(lr=1e-4, eps=1e-3, weight_decay=0.0, window=3, beta1=0.7, beta2=0.9, delta=1e-5, seed=11)
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    reference = random_llama("tiny", dtype=torch.float64, seed=0)
    sparse = dict(sparsity=0.5, mask_every=2, perturbation=None if exact else "inplace")
    optimizer = AdaMeZO(model, **hyper, **sparse)
    steps = 8  # 4 plain steps, then 4 windowed ones, over masks of 4 epochs
    for _ in range(steps):
        optimizer.step(lambda: lm_loss(model, batch))
    direction = stored_masked_directions(model, optimizer, 11, steps, 0.5, 2)
    expected = naive_adamezo(reference, batch, steps=steps, direction=direction, **hyper)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-9 if not exact else 1e-10, msg=name)
    resume_and_compare(lambda m: AdaMeZO(m, lr=1e-5, window=3, sparsity=0.5, mask_every=2), batch, steps_before=5, steps_after=3)
    with pytest.raises(OptionError, match="use sparse_shares=layer or global"):
        AdaMeZO(model, sparsity=0.5, sparse_shares="magnitude")


def test_blockwise_adamezo_builds_each_blocks_moments_from_its_own_projected_gradients(batch):
    """blocks: one estimate per transformer block (the others at θ), and each parameter's m and v from its own
    block's projected gradients over the window (the naive reference stores them with every z)."""
    hyper = dict(lr=1e-4, eps=1e-3, window=2, beta1=0.7, beta2=0.9, delta=1e-5, seed=11)
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = AdaMeZO(model, blocks="layer", **hyper)
    direction = keyed_direction(model, optimizer)
    name_of = {id(p): name for name, p in model.named_parameters()}
    blocks = [[name_of[id(optimizer.param_list[i])] for i in block] for block in optimizer.blocks]
    assert len(blocks) > 2
    history = []  # (z, the blocks' projected gradients), newest last
    for step in range(6):  # window + 1 plain steps, then 3 windowed ones
        optimizer.step(lambda: lm_loss(model, batch))
        z = {name: direction(name, derive_seed(11, step, 0)).double() for name in theta}
        projected = []
        with torch.no_grad():
            for names in blocks:
                plus = lm_loss(model, batch, {n: v + 1e-3 * z[n] if n in names else v for n, v in theta.items()}).item()
                minus = lm_loss(model, batch, {n: v - 1e-3 * z[n] if n in names else v for n, v in theta.items()}).item()
                projected.append((plus - minus) / 2e-3)
        history = (history + [(z, projected)])[-2:]
        for b, names in enumerate(blocks):
            for name in names:
                if step + 1 <= 3:
                    theta[name] = theta[name] - 1e-4 * projected[b] * z[name]
                else:
                    m = sum(0.7**k * p[b] * zs[name] for k, (zs, p) in enumerate(reversed(history)))
                    v = sum(0.9**k * p[b] ** 2 * zs[name] ** 2 for k, (zs, p) in enumerate(reversed(history)))
                    theta[name] = theta[name] - 1e-4 * 100 * m / (v.sqrt() + 1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), theta[name], rtol=0, atol=1e-10, msg=name)
    resume_and_compare(lambda m: AdaMeZO(m, lr=1e-5, window=2, blocks="layer"), batch, steps_before=4, steps_after=2)
