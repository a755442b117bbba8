import math

import pytest
import torch

from conftest import keyed_direction, lm_loss, loss_before_and_after, resume_and_compare
from zotune import MeZO, NonFiniteLossError
from zotune.counter_rng import STREAM_VERSION
from zotune.directions import BLOCK_SIZE, derive_seed
from zotune.errors import CheckpointError
from zotune.estimators import mean_over_micro_batches
from zotune.models import random_llama
from zotune.optim import is_decayed


def naive_mezo(model, input_ids, *, steps, lr, eps, weight_decay, n_directions, seed, direction, first_step=0):
    """MeZO as the paper writes it, with every z stored densely and θ±εz built as new tensors, for steps
    ``first_step``, ``first_step + 1``, ... of the seed stream.

    ``direction(name, step_seed)`` supplies z for a parameter (the keyed generator under test elsewhere)."""
    theta = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def loss_at(params):
        with torch.no_grad():
            return lm_loss(model, input_ids, params).item()

    for step in range(first_step, first_step + steps):
        seeds = [derive_seed(seed, step, j) for j in range(n_directions)]
        zs = [{name: direction(name, s).to(theta[name].dtype) for name in theta} for s in seeds]
        grads = []
        for z in zs:
            plus = loss_at({n: theta[n] + eps * z[n] for n in theta})
            minus = loss_at({n: theta[n] - eps * z[n] for n in theta})
            grads.append((plus - minus) / (2 * eps))
        for name in theta:
            decay = weight_decay if is_decayed(name, theta[name]) else 0.0
            estimate = sum(g * z[name] for g, z in zip(grads, zs)) / n_directions
            theta[name] = theta[name] - lr * (estimate + decay * theta[name])
    return theta


def run_mezo(model, input_ids, steps, exact, **kwargs):
    if exact == "dual":
        optimizer = MeZO(model, dual_forward=True, **kwargs)
        for _ in range(steps):
            optimizer.step(lambda copies=1: lm_loss(model, input_ids, copies=copies))
        return optimizer
    if exact:
        optimizer = MeZO(model, **kwargs)
    else:  # parameters only: apply MeZO's no-decay rule through groups, as a user would
        groups = [
            {"params": [p for n, p in model.named_parameters() if is_decayed(n, p)]},
            {"params": [p for n, p in model.named_parameters() if not is_decayed(n, p)], "weight_decay": 0.0},
        ]
        optimizer = MeZO(groups, **kwargs)
    for _ in range(steps):
        optimizer.step(lambda: lm_loss(model, input_ids))
    return optimizer


# Over several steps, float32 SPSA drifts from the reference at the 1e-6 level: once a parameter differs by
# an ulp, a loss (~4.18) can round one ulp (4.8e-7) apart, which moves c = ΔL/2ε by 2.4e-4 and θ by up to
# lr·2.4e-4·|z| = 1.6e-6. So several steps are compared in float64 (in-place θ+εz−2εz rounds differently from
# a dense θ−εz, and the dual forward's batched matmuls and per-copy means from separate forwards), and
# float32 step by step below.
@pytest.mark.parametrize(
    "exact,dtype,tolerance",
    [(True, torch.float64, 1e-10), (False, torch.float64, 1e-10), ("dual", torch.float64, 1e-10)],
    ids=["module-fp64", "inplace-fp64", "dual-fp64"],
)
@pytest.mark.parametrize("n_directions,distribution", [(1, "gaussian"), (2, "gaussian"), (1, "rademacher")])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mezo_matches_naive_reference(exact, dtype, tolerance, n_directions, distribution, tie, batch):
    hyper = dict(lr=1e-3, eps=1e-3, weight_decay=0.1, n_directions=n_directions, seed=42)
    model = random_llama("tiny", dtype=dtype, seed=0, tie_embeddings=tie)
    reference_model = random_llama("tiny", dtype=dtype, seed=0, tie_embeddings=tie)
    optimizer = run_mezo(model, batch, 3, exact, distribution=distribution, **hyper)
    expected = naive_mezo(reference_model, batch, steps=3, direction=keyed_direction(model, optimizer), **hyper)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=tolerance, msg=name)
    moved = sum((p.detach() - reference_model.state_dict()[n]).abs().sum() for n, p in model.named_parameters())
    assert moved > 1e-3  # the comparison is not between two unchanged models


@pytest.mark.parametrize("n_directions,distribution", [(1, "gaussian"), (2, "gaussian"), (1, "rademacher")])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_module_mode_matches_naive_reference_step_by_step_in_float32(n_directions, distribution, tie, batch):
    hyper = dict(lr=1e-3, eps=1e-3, weight_decay=0.1, n_directions=n_directions, seed=42)
    model = random_llama("tiny", seed=0, tie_embeddings=tie)
    reference_model = random_llama("tiny", seed=0, tie_embeddings=tie)
    optimizer = MeZO(model, distribution=distribution, **hyper)
    direction = keyed_direction(model, optimizer)
    for step in range(3):
        reference_model.load_state_dict(model.state_dict())
        optimizer.step(lambda: lm_loss(model, batch))
        expected = naive_mezo(reference_model, batch, steps=1, first_step=step, direction=direction, **hyper)
        for name, param in model.named_parameters():
            # Module mode evaluates the reference's own θ ± εz, so the losses agree; the update rounds
            # differently, by at most two ulps of the largest weights (1.0).
            torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=2.4e-7, msg=f"step {step}: {name}")
        assert not torch.equal(expected["model.norm.weight"], reference_model.model.norm.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_learning_rate_leaves_parameters_bit_identical(dtype, batch):
    model = random_llama("tiny", dtype=dtype, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model, lr=0.0, eps=1e-2, weight_decay=0.1)
    for _ in range(20):
        optimizer.step(lambda: lm_loss(model, batch))
    assert all(e.projected_gradient != 0 for e in optimizer.last_estimates)
    for name, param in model.named_parameters():
        assert torch.equal(
            param.detach().view(torch.int16 if dtype != torch.float32 else torch.int32),
            before[name].view(torch.int16 if dtype != torch.float32 else torch.int32),
        ), name


def test_inplace_perturbation_drifts_in_bf16_which_is_why_module_mode_exists(batch):
    model = random_llama("tiny", dtype=torch.bfloat16, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model.parameters(), lr=0.0, eps=1e-2)
    for _ in range(5):
        optimizer.step(lambda: lm_loss(model, batch))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("cut", [2, 1])  # micro-batches of 2 and 2 examples, and of 1 and 3 (weighted by size)
def test_gradient_accumulation_equals_full_batch(batch, cut):
    # float64: in float32 the two sums of token losses round differently, and c = ΔL/2ε magnifies that.
    full_model = random_llama("tiny", dtype=torch.float64, seed=1)
    accumulated_model = random_llama("tiny", dtype=torch.float64, seed=1)
    full = MeZO(full_model, lr=1e-3, seed=5)
    accumulated = MeZO(accumulated_model, lr=1e-3, seed=5)
    micro_batches = [batch[:cut], batch[cut:]]
    for _ in range(3):
        full.step(lambda: lm_loss(full_model, batch))
        accumulated.step(mean_over_micro_batches(lambda b: lm_loss(accumulated_model, b), micro_batches))
        assert math.isclose(
            full.last_estimates[0].projected_gradient, accumulated.last_estimates[0].projected_gradient, rel_tol=1e-6
        )
    for (name, a), b in zip(full_model.named_parameters(), accumulated_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_learning_rate_scheduler_drives_the_update(batch):
    plain_model, scheduled_model = random_llama("tiny", seed=1), random_llama("tiny", seed=1)
    plain = MeZO(plain_model, lr=1e-3, seed=2)
    scheduled = MeZO(scheduled_model, lr=2e-3, seed=2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(scheduled, lambda step: 0.5)
    for _ in range(2):
        plain.step(lambda: lm_loss(plain_model, batch))
        scheduled.step(lambda: lm_loss(scheduled_model, batch))
        scheduler.step()
    for a, b in zip(plain_model.parameters(), scheduled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_state_dict_resumes_the_seed_stream_exactly(batch):
    stream = resume_and_compare(lambda model: MeZO(model, lr=1e-3, seed=9), batch, steps_before=2, steps_after=2)
    assert stream == {"seed": 9, "step": 2, "stream": STREAM_VERSION}


def test_a_state_saved_with_other_directions_is_refused(batch):
    model = random_llama("tiny", seed=3)
    optimizer = MeZO(model, lr=1e-3, seed=9)
    optimizer.step(lambda: lm_loss(model, batch))
    state = optimizer.state_dict()
    older = {**state, "state": {**state["state"], "zo": {"seed": 9, "step": 1}}}  # saved before versions were kept
    for saved in (older, {**state, "state": {**state["state"], "zo": {**state["state"]["zo"], "stream": 99}}}):
        with pytest.raises(CheckpointError, match="stream (1|99).*Resume with the zotune version that saved it"):
            MeZO(model, lr=1e-3).load_state_dict(saved)
    resumed = MeZO(model, lr=1e-3)
    resumed.load_state_dict(state)
    assert resumed.state["zo"] == state["state"]["zo"]


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
def test_only_trainable_parameters_are_touched(exact, batch):
    model = random_llama("tiny", seed=5, tie_embeddings=False)
    frozen = [n for n, _ in model.named_parameters() if "layers.0." in n or "embed" in n]
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model if exact else model.parameters(), lr=1e-2)
    optimizer.step(lambda: lm_loss(model, batch))
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name in frozen), name


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
def test_non_finite_loss_is_reported_and_parameters_are_kept(exact, batch):
    model = random_llama("tiny", seed=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model if exact else model.parameters(), lr=1e-2, seed=1)
    optimizer.step(lambda: lm_loss(model, batch))
    after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(after_first[n], before[n]) for n in before)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 \(direction seed \d+\): loss\+=nan"):
        optimizer.step(lambda: lm_loss(model, batch) * float("nan"))
    for name, param in model.named_parameters():
        if exact:
            assert torch.equal(param, after_first[name]), name
        else:  # θ+εz−2εz+εz: restored up to rounding, the documented limit of in-place perturbation
            torch.testing.assert_close(param, after_first[name], rtol=1e-6, atol=1e-7, msg=name)


def test_mezo_lowers_the_loss_of_a_tiny_model(batch):
    model = random_llama("tiny", seed=7)
    initial, final = loss_before_and_after(model, MeZO(model, lr=3e-3, eps=1e-3, seed=0), batch, steps=300)
    assert final < initial - 0.3, (initial, final)


def test_dropout_is_disabled_during_the_estimate_and_training_mode_restored(batch):
    model = random_llama("tiny", seed=8)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    optimizer = MeZO(model, lr=0.0)
    modes = []
    optimizer.step(lambda: modes.append(model.training) or lm_loss(model, batch))
    assert modes == [False, False] and model.training
    assert all(e.loss_plus != e.loss_minus for e in optimizer.last_estimates)


def test_clear_errors_for_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="eps must be positive"):
        MeZO(tiny_llama, eps=0.0)
    with pytest.raises(ValueError, match="n_directions must be a positive integer"):
        MeZO(tiny_llama, n_directions=0)
    with pytest.raises(TypeError, match="needs a closure"):
        MeZO(tiny_llama).step(None)
    for param in tiny_llama.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        MeZO(tiny_llama)
    with pytest.raises(ValueError, match="do not belong to the model"):
        MeZO([{"params": [torch.nn.Parameter(torch.zeros(3))]}], lr=1.0).estimator.__class__(
            MeZO([torch.nn.Parameter(torch.zeros(3))]).engine, 1e-3, tiny_llama
        )


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
def test_threads_and_multi_block_parameters_give_the_same_step(exact):
    """Parameters larger than one block are split across threads, also inside a forward under inference_mode."""

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(400, 400), torch.nn.Tanh(), torch.nn.Linear(400, 1))

    inputs = torch.randn(8, 400, generator=torch.Generator().manual_seed(1))
    models = [build(), build()]
    assert models[0][0].weight.numel() > BLOCK_SIZE
    for model, threads in zip(models, (1, 2)):
        optimizer = MeZO(model if exact else model.parameters(), lr=1e-2, num_threads=threads)
        for _ in range(2):
            optimizer.step(lambda: model(inputs).square().mean())
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("exact", [True, False], ids=["module", "inplace"])
def test_a_failing_closure_leaves_the_weights_unperturbed(exact, batch):
    model = random_llama("tiny", seed=9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model if exact else model.parameters(), lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return lm_loss(model, batch)

    with pytest.raises(RuntimeError, match="simulated"):
        optimizer.step(closure)
    for name, param in model.named_parameters():
        if exact:
            assert torch.equal(param, before[name]), name
        else:  # restored up to rounding (θ+εz−2εz+εz: the in-place limit)
            torch.testing.assert_close(param, before[name], rtol=1e-6, atol=1e-7, msg=name)
    assert optimizer.state["zo"]["step"] == 0
