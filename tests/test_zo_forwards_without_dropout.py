"""Every zeroth-order forward runs without dropout, in every perturbation mode and optimizer: a model in
training mode with dropout gives the same estimates, bit for bit, as the same model in eval mode."""

import copy

import pytest
import torch
from torch import nn

from conftest import lm_loss
from zotune import AdaMeZO, Addax, MeZO, MeZOSVRG
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.no_dropout import NoDropout
from zotune.optim import trainable_groups


def dropout_llama(attention: str):
    model = random_llama("tiny", seed=11)
    model.config._attn_implementation = attention
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    return model


def build(name: str, model: nn.Module, mode: str):
    """``mode``: module (given the model), dual (module mode, one forward for both sides) or params (given
    parameters only: in-place perturbation, as with FSDP2)."""
    target = list(model.parameters()) if mode == "params" else model
    options = dict(lr=1e-3, eps=1e-2, seed=3)
    if mode == "dual":
        options["dual_forward"] = True
    if name == "mezo":
        return MeZO(target, **options)
    if name == "adamezo":
        return AdaMeZO(target, window=2, **options)
    if name == "svrg":
        return MeZOSVRG(target, anchor_lr=1e-3, lr=1e-3, eps=1e-2, seed=3)
    return Addax(target, lr=1e-3, alpha=0.5, eps=1e-2, seed=3)


def take_steps(name: str, model: nn.Module, optimizer, batch, mode: str, steps: int = 4) -> list[tuple]:
    if mode == "dual":
        closure = lambda copies=1: lm_loss(model, batch, copies=copies)  # noqa: E731
    else:
        closure = lambda: lm_loss(model, batch)  # noqa: E731
    losses = []
    for _ in range(steps):
        if name == "svrg":
            optimizer.step(closure, closure)
        elif name == "addax":
            optimizer.step(closure, None)
        else:
            optimizer.step(closure)
        losses.append(tuple((e.loss_plus, e.loss_minus) for e in optimizer.last_estimates))
    return losses


CASES = [
    (name, mode)
    for name in ("mezo", "adamezo", "svrg", "addax")
    for mode in ("module", "dual", "params")
    if not (mode == "dual" and name in ("svrg", "addax"))
]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_estimates_of_a_training_mode_model_with_dropout_equal_those_in_eval_mode(name, mode, attention, batch):
    trained = dropout_llama(attention).train()
    reference = copy.deepcopy(trained).eval()
    observed = take_steps(name, trained, build(name, trained, mode), batch, mode)
    expected = take_steps(name, reference, build(name, reference, mode), batch, mode)
    assert observed == expected
    assert trained.training and all(module.training for module in trained.modules())
    for a, b in zip(trained.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["module", "params"])
def test_addax_first_order_half_keeps_the_models_mode(mode, batch):
    model = dropout_llama("sdpa").train()
    optimizer = build("addax", model, mode)
    seen = []

    def zo_closure():
        seen.append(("zo", model.training, torch.is_inference_mode_enabled()))
        return lm_loss(model, batch)

    def fo_closure():
        seen.append(("fo", model.training, torch.is_inference_mode_enabled()))
        return lm_loss(model, batch)

    optimizer.step(zo_closure, fo_closure)
    # Given parameters, the model's flag cannot be switched: the forwards run under NoDropout instead.
    zo_training = mode == "params"
    assert seen == [("zo", zo_training, True), ("zo", zo_training, True), ("fo", True, False)]


def test_no_dropout_turns_torchs_dropout_functions_into_the_identity():
    x = torch.randn(4, 8)
    q = k = v = torch.randn(1, 2, 4, 8)
    with NoDropout():
        assert torch.equal(nn.Dropout(0.9).train()(x), x)
        assert torch.equal(nn.functional.dropout(x, 0.9, training=True), x)
        assert torch.equal(nn.AlphaDropout(0.9).train()(x), x)
        assert torch.equal(nn.Dropout2d(0.9).train()(x[None]), x[None])
        assert torch.equal(
            nn.functional.scaled_dot_product_attention(q, k, v, None, 0.9), nn.functional.scaled_dot_product_attention(q, k, v)
        )
        assert torch.equal(
            nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.9),
            nn.functional.scaled_dot_product_attention(q, k, v),
        )


@pytest.mark.parametrize(
    "draw",
    [lambda x: torch.rand_like(x), lambda x: x.bernoulli(0.5), lambda x: torch.randn(3), lambda x: x.clone().uniform_()],
    ids=["rand_like", "bernoulli", "randn", "uniform_"],
)
def test_a_random_draw_in_a_parameters_only_forward_is_refused(draw):
    weight = nn.Parameter(torch.ones(3))
    optimizer = MeZO([weight], lr=0.0)
    with pytest.raises(OptionError, match="drew random numbers"):
        optimizer.step(lambda: (weight * draw(weight)).sum())
    assert torch.equal(weight, torch.ones(3))  # the failed closure left the weights unperturbed


@pytest.mark.parametrize("name", ["mezo", "adamezo"])
def test_inplace_perturbation_given_the_model_is_the_parameters_only_step_and_switches_to_eval(name, batch):
    """perturbation="inplace" with the model: the paper's scheme, bit for bit the step given parameters only,
    with the forwards in eval mode (dropout off through the modules, not NoDropout)."""
    trained, given_parameters = dropout_llama("eager").train(), dropout_llama("eager").train()
    cls = {"mezo": MeZO, "adamezo": AdaMeZO}[name]
    options = dict(lr=1e-3, eps=1e-2, seed=3, **({"window": 2} if name == "adamezo" else {}))
    with_model = cls(trained, perturbation="inplace", **options)
    modes = []
    for _ in range(4):
        with_model.step(lambda: modes.append(trained.training) or lm_loss(trained, batch))
    reference = cls(trainable_groups(given_parameters)[1], **options)  # the model's groups: the same keys for z
    for _ in range(4):
        reference.step(lambda: lm_loss(given_parameters, batch))
    assert set(modes) == {False} and trained.training
    for a, b in zip(trained.parameters(), given_parameters.parameters()):
        assert torch.equal(a, b)


def test_perturbation_options_are_checked():
    weight = nn.Parameter(torch.ones(3))
    with pytest.raises(OptionError, match="perturbation=module runs each module on perturbed copies"):
        MeZO([weight], perturbation="module")
    with pytest.raises(OptionError, match="perturbation must be one of module, inplace"):
        MeZO([weight], perturbation="dual")
    with pytest.raises(OptionError, match="with module perturbation"):
        MeZO(dropout_llama("sdpa"), perturbation="inplace", dual_forward=True)
