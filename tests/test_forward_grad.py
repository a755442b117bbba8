"""Forward-Grad: the directional derivative by a forward-mode pass, against backward's gradient · z."""

import pytest
import torch
from conftest import keyed_direction, lm_loss, loss_before_and_after, resume_and_compare, train_tiny

from zotune.directions import derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import ForwardGrad, is_decayed


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_steps_match_backwards_gradient_along_stored_directions(attention, batch):
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    model.config._attn_implementation = attention
    reference = random_llama("tiny", dtype=torch.float64, seed=0)
    optimizer = ForwardGrad(model, lr=1e-2, weight_decay=0.1, n_directions=2, seed=5)
    direction = keyed_direction(model, optimizer)
    for step in range(2):
        optimizer.step(lambda: lm_loss(model, batch))
        reference.zero_grad()
        lm_loss(reference, batch).backward()
        with torch.no_grad():
            params = dict(reference.named_parameters())
            moves = {name: torch.zeros_like(p) for name, p in params.items()}
            for j in range(2):
                z = {name: direction(name, derive_seed(5, step, j)).double() for name in params}
                derivative = sum((p.grad * z[name]).sum() for name, p in params.items())
                for name in params:
                    moves[name] += derivative * z[name] / 2
            for name, p in params.items():
                decay = 0.1 if is_decayed(name, p) else 0.0
                p.mul_(1 - 1e-2 * decay).sub_(1e-2 * moves[name])
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        # Eager attention takes its softmax in float32 whatever the dtype: float32 noise in a float64 comparison.
        torch.testing.assert_close(
            param.detach(), expected.detach(), rtol=0, atol=1e-11 if attention == "sdpa" else 1e-8, msg=lambda m: f"{name}: {m}"
        )


def test_zero_learning_rate_is_bit_exact_and_resume_is_exact(batch):
    model = random_llama("tiny", dtype=torch.bfloat16, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = ForwardGrad(model, lr=0.0)
    for _ in range(2):
        optimizer.step(lambda: lm_loss(model, batch))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    resume_and_compare(lambda m: ForwardGrad(m, lr=1e-3, seed=3), batch, steps_before=2, steps_after=2)


def test_forward_grad_lowers_the_loss_of_a_tiny_model(batch):
    model = random_llama("tiny", seed=7)
    initial, final = loss_before_and_after(model, ForwardGrad(model, lr=3e-3, seed=0), batch, steps=200)
    assert final < initial - 0.3, (initial, final)


def test_it_trains_through_the_cli(tmp_path):
    steps = train_tiny(tmp_path, "optimizer=forward-grad", "lr=1e-3", "steps=2")
    assert len(steps) == 2 and all({"projected_grad", "seed"} <= r.keys() for r in steps)


def test_parameters_alone_and_operations_without_forward_mode_are_one_line_errors(tiny_llama, batch):
    with pytest.raises(OptionError, match="pass the model, not its parameters"):
        ForwardGrad(list(tiny_llama.parameters()))

    class NoForwardMode(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    handle = tiny_llama.model.norm.register_forward_hook(lambda module, args, out: NoForwardMode.apply(out))
    optimizer = ForwardGrad(tiny_llama, lr=1e-3)
    with pytest.raises(OptionError, match="has no forward-mode derivative in torch"):
        optimizer.step(lambda: lm_loss(tiny_llama, batch))
    handle.remove()


@pytest.mark.parametrize("shares", ["layer", "magnitude"])
def test_sparse_steps_take_backwards_gradient_along_the_masked_directions(shares, batch):
    """sparsity: the tangent and the update are the masked z (the optimizer's own masked directions, which
    tests/test_sparse_masks.py checks against stored masks), d = ∇L·z with the masked z."""
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    reference = random_llama("tiny", dtype=torch.float64, seed=0)
    optimizer = ForwardGrad(model, lr=1e-2, seed=5, sparsity=0.5, sparse_shares=shares)
    direction = keyed_direction(model, optimizer)
    for step in range(2):
        optimizer.step(lambda: lm_loss(model, batch))
        z = {name: direction(name, derive_seed(5, step, 0)).double() for name, _ in model.named_parameters()}
        assert 0.45 < (z["model.embed_tokens.weight"] == 0).float().mean().item() < 0.55
        reference.zero_grad()
        lm_loss(reference, batch).backward()
        with torch.no_grad():
            params = dict(reference.named_parameters())
            derivative = sum((p.grad * z[name]).sum() for name, p in params.items())
            for name, p in params.items():
                p.sub_(1e-2 * derivative * z[name])
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.detach(), expected.detach(), rtol=0, atol=1e-11, msg=name)
