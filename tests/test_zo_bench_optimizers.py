"""The ZO benchmark's optimizers (ZO-SGD-Sign, -MMT, -Cons, ZO-Adam) and the one-sided difference, each
against a naive reference that stores its directions and state densely."""

import math

import pytest
import torch
from conftest import keyed_direction, lm_loss, loss_before_and_after, resume_and_compare, train_tiny

from zotune.directions import derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import MeZO, ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign, create_optimizer, is_decayed

SEED, EPS = 11, 1e-3


def estimates(model, batch, theta, direction, step, n=1, one_sided=False):
    """[(c_j, z_j)] at θ with stored directions, as the optimizer's step ``step`` draws them."""
    out = []
    with torch.no_grad():
        here = lm_loss(model, batch, theta).item()
        for j in range(n):
            z = {name: direction(name, derive_seed(SEED, step, j)).double() for name in theta}
            plus = lm_loss(model, batch, {k: theta[k] + EPS * z[k] for k in theta}).item()
            if one_sided:
                out.append(((plus - here) / EPS, z))
            else:
                minus = lm_loss(model, batch, {k: theta[k] - EPS * z[k] for k in theta}).item()
                out.append(((plus - minus) / (2 * EPS), z))
    return out


def gradient(pairs, name):
    return sum(c * z[name] for c, z in pairs) / len(pairs)


def run(optimizer_class, steps=3, **options):
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    batch = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = optimizer_class(model, eps=EPS, seed=SEED, **options)
    for _ in range(steps):
        optimizer.step(lambda: lm_loss(model, batch))
    return model, batch, start, keyed_direction(model, optimizer), optimizer


def assert_params(model, expected, atol=1e-12):
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("sign", ["scalar", "coordinate"])
def test_zo_sign_matches_stored_directions(sign):
    model, batch, theta, direction, _ = run(ZOSGDSign, lr=1e-3, weight_decay=0.1, n_directions=2, sign=sign)
    for step in range(3):
        pairs = estimates(model, batch, theta, direction, step, n=2)
        for name, value in theta.items():
            decay = 0.1 if is_decayed(name, value) else 0.0
            if sign == "scalar":
                move = sum(math.copysign(1.0, c) * z[name] for c, z in pairs) / 2
            else:
                move = sum(torch.sign(c * z[name]) for c, z in pairs) / 2
            theta[name] = value * (1 - 1e-3 * decay) - 1e-3 * move
    assert_params(model, theta)


@pytest.mark.parametrize("buffer,window", [("dense", 50), ("replay", 50), ("replay", 2)])
def test_zo_momentum_is_torch_sgd_momentum_on_the_estimate(buffer, window):
    model, batch, theta, direction, _ = run(
        ZOSGDMomentum, steps=4, lr=1e-2, momentum=0.8, weight_decay=0.1, buffer=buffer, window=window
    )
    history = []  # the estimates, newest last: the dense buffer, or the replayed window
    for step in range(4):
        pairs = estimates(model, batch, theta, direction, step)
        history.append({name: gradient(pairs, name) for name in theta})
        for name, value in theta.items():
            decay = 0.1 if is_decayed(name, value) else 0.0
            kept = history if buffer == "dense" else history[-window:]
            momentum = sum(0.8**k * g[name] for k, g in enumerate(reversed(kept)))
            theta[name] = value * (1 - 1e-2 * decay) - 1e-2 * momentum
    assert_params(model, theta)


def test_dense_momentum_equals_torch_optim_sgd():
    model, batch, theta, direction, _ = run(ZOSGDMomentum, steps=3, lr=1e-2, momentum=0.9)
    params = {name: torch.nn.Parameter(value.clone()) for name, value in theta.items()}
    reference = torch.optim.SGD(params.values(), lr=1e-2, momentum=0.9)
    for step in range(3):
        pairs = estimates(model, batch, {n: p.detach() for n, p in params.items()}, direction, step)
        for name, param in params.items():
            param.grad = gradient(pairs, name)
        reference.step()
    assert_params(model, {n: p.detach() for n, p in params.items()})


def test_zo_adam_is_torch_adamw_on_the_estimate():
    model, batch, theta, direction, _ = run(ZOAdam, steps=3, lr=1e-3, weight_decay=0.1, betas=(0.8, 0.99), delta=1e-6)
    params = {name: torch.nn.Parameter(value.clone()) for name, value in theta.items()}
    decayed = [p for n, p in params.items() if is_decayed(n, p)]
    others = [p for n, p in params.items() if not is_decayed(n, p)]
    reference = torch.optim.AdamW(
        [{"params": decayed}, {"params": others, "weight_decay": 0.0}], lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1
    )
    for step in range(3):
        pairs = estimates(model, batch, {n: p.detach() for n, p in params.items()}, direction, step)
        for name, param in params.items():
            param.grad = gradient(pairs, name)
        reference.step()
    assert_params(model, {n: p.detach() for n, p in params.items()}, atol=1e-10)


@pytest.mark.parametrize("perturbation", ["module", "inplace"])
def test_zo_cons_keeps_the_best_of_three_points(perturbation):
    model, batch, theta, direction, optimizer = run(ZOSGDConservative, steps=6, lr=0.1, perturbation=perturbation)
    moves = []
    for step in range(6):
        ((c, z),) = estimates(model, batch, theta, direction, step)
        with torch.no_grad():
            here = lm_loss(model, batch, theta).item()
            down = lm_loss(model, batch, {k: theta[k] - 0.1 * c * z[k] for k in theta}).item()
            up = lm_loss(model, batch, {k: theta[k] + 0.1 * c * z[k] for k in theta}).item()
        move = (0 if here < up else 1) if down > here else (-1 if down < up else 1)
        moves.append(move)
        theta = {k: theta[k] + move * 0.1 * c * z[k] for k in theta}
    assert_params(model, theta, atol=1e-9 if perturbation == "inplace" else 1e-12)
    assert len(set(moves)) > 1, moves  # a large lr: some candidate steps are refused
    assert optimizer.forwards() == 5


def test_one_sided_difference_matches_stored_directions_and_shares_the_loss_at_theta():
    model, batch, theta, direction, optimizer = run(MeZO, lr=1e-2, n_directions=3, difference="forward")
    for step in range(3):
        pairs = estimates(model, batch, theta, direction, step, n=3, one_sided=True)
        theta = {name: value - 1e-2 * gradient(pairs, name) for name, value in theta.items()}
    assert_params(model, theta)
    assert optimizer.forwards() == 4  # the loss at θ once, then one forward per direction


@pytest.mark.parametrize(
    "name,options",
    [
        ("zo-sign", {"sign": "coordinate"}),
        ("zo-momentum", {}),
        ("zo-momentum", {"buffer": "replay", "window": 3}),
        ("zo-adam", {}),
        ("zo-cons", {}),
        ("mezo", {"difference": "forward"}),
    ],
)
def test_zero_learning_rate_is_bit_exact_in_bf16(name, options, batch):
    model = random_llama("tiny", dtype=torch.bfloat16, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = create_optimizer(name, model, lr=0.0, **options)
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model, batch))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "name,options",
    [
        ("zo-sign", {"sign": "coordinate"}),
        ("zo-momentum", {}),
        ("zo-momentum", {"buffer": "replay", "window": 2}),
        ("zo-adam", {}),
        ("zo-cons", {}),
    ],
)
def test_state_dict_round_trip_resumes_exactly(name, options, batch):
    resume_and_compare(
        lambda model: create_optimizer(name, model, lr=1e-4, seed=3, **options), batch, steps_before=3, steps_after=3
    )


def test_dense_state_in_bf16_resumes_exactly(batch):
    def build(model):
        return ZOAdam(model.to(torch.bfloat16), lr=1e-3, seed=3)

    resume_and_compare(build, batch, steps_before=2, steps_after=2)


@pytest.mark.parametrize(
    "name,lr,options",
    [
        ("zo-sign", 1e-2, {}),
        ("zo-momentum", 3e-4, {}),
        ("zo-momentum", 3e-4, {"buffer": "replay", "window": 10}),
        ("zo-adam", 3e-3, {}),
        ("zo-cons", 5e-3, {}),
        ("mezo", 3e-3, {"difference": "forward"}),
    ],
)
def test_each_lowers_the_loss_of_a_tiny_model(name, lr, options, batch):
    model = random_llama("tiny", seed=7)
    initial, final = loss_before_and_after(model, create_optimizer(name, model, lr=lr, seed=0, **options), batch, steps=300)
    assert final < initial - 0.3, (initial, final)


def test_bad_options(tiny_llama):
    for build, message in [
        (lambda: ZOSGDSign(tiny_llama, sign="both"), "sign must be scalar or coordinate"),
        (lambda: ZOSGDMomentum(tiny_llama, momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda: ZOSGDMomentum(tiny_llama, buffer="disk"), "buffer must be dense or replay"),
        (lambda: ZOAdam(tiny_llama, betas=(0.9, 1.0)), "betas must be two numbers"),
        (lambda: ZOSGDConservative(tiny_llama, weight_decay=0.1), "set weight_decay=0"),
        (lambda: MeZO(tiny_llama, difference="backward"), "difference must be central or forward"),
        (lambda: MeZO(tiny_llama, difference="forward", dual_forward=True), "use difference=central"),
    ]:
        with pytest.raises(OptionError, match=message):
            build()


@pytest.mark.parametrize("name", ["mezo", "adamezo", "svrg", "addax", "zo-sign", "zo-momentum", "zo-cons", "zo-adam"])
def test_every_two_point_optimizer_takes_the_one_sided_difference(name, tiny_llama):
    assert create_optimizer(name, tiny_llama, lr=1e-3, difference="forward").estimator.one_sided
    assert not create_optimizer(name, tiny_llama, lr=1e-3).estimator.one_sided


def test_the_estimator_options_reach_the_optimizer_through_the_cli(tmp_path):
    options = ["optimizer_options.blocks=layer", "optimizer_options.sparsity=0.5", "optimizer_options.difference=forward"]
    steps = train_tiny(tmp_path, "optimizer=zo-momentum", "lr=1e-3", "steps=2", *options)
    assert [r["forward_passes"] for r in steps][-1] == 2 * (1 + 4)  # a step: θ once, then 4 blocks


def test_blockwise_zo_cons_builds_its_candidates_from_each_blocks_own_estimate():
    """blocks: ĝ's part in each block is that block's estimate (the other blocks at θ); the three points are
    compared for the whole model."""
    model, batch, theta, direction, optimizer = run(ZOSGDConservative, steps=5, lr=0.1, blocks="layer")
    name_of = {id(p): name for name, p in model.named_parameters()}
    block_of = {name_of[id(optimizer.param_list[i])]: b for b, block in enumerate(optimizer.blocks) for i in block}
    moves = []
    for step in range(5):
        z = {name: direction(name, derive_seed(SEED, step, 0)).double() for name in theta}
        with torch.no_grad():

            def at(move):
                return lm_loss(model, batch, move).item()

            projected = [
                (
                    at({n: v + EPS * z[n] if block_of[n] == b else v for n, v in theta.items()})
                    - at({n: v - EPS * z[n] if block_of[n] == b else v for n, v in theta.items()})
                )
                / (2 * EPS)
                for b in range(len(optimizer.blocks))
            ]
            g = {n: projected[block_of[n]] * z[n] for n in theta}
            here, down, up = (at({n: v + sign * 0.1 * g[n] for n, v in theta.items()}) for sign in (0, -1, 1))
        move = (0 if here < up else 1) if down > here else (-1 if down < up else 1)
        moves.append(move)
        theta = {n: v + move * 0.1 * g[n] for n, v in theta.items()}
    assert_params(model, theta)
    assert len(set(moves)) > 1, moves
    assert optimizer.forwards() == 1 + 2 * len(optimizer.blocks) + 2


@pytest.mark.parametrize("options", [dict(sparsity=0.5, mask_every=1), dict(blocks="layer")], ids=["sparse", "blocks"])
def test_replayed_momentum_equals_the_stored_buffer_within_its_window(options, batch):
    """Sparse, every replayed direction is masked under its own step's mask (renewed every step); block-wise,
    each block's buffer holds its own estimates. Within its window the replayed buffer equals the stored one,
    which added each step's c·z as it went."""
    models = [random_llama("tiny", dtype=torch.float64, seed=0) for _ in range(2)]
    options = dict(lr=1e-2, momentum=0.8, seed=5, **options)
    dense = ZOSGDMomentum(models[0], buffer="dense", **options)
    replay = ZOSGDMomentum(models[1], buffer="replay", window=10, **options)
    for _ in range(3):
        dense.step(lambda: lm_loss(models[0], batch))
        replay.step(lambda: lm_loss(models[1], batch))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    resume_and_compare(lambda m: ZOSGDMomentum(m, buffer="replay", window=2, **options), batch, steps_before=3, steps_after=2)
