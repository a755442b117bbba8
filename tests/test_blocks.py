"""Block-wise perturbation: each block of the model perturbed alone, with its own estimate."""

import pytest
import torch
from conftest import lm_loss
from torch import nn

from zotune.blocks import perturbation_blocks
from zotune.directions import derive_seed
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import MeZO, ZOAdam, create_optimizer


def test_blocks_follow_the_models_structure_and_cover_every_parameter_once():
    model = random_llama("tiny")
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]
    for level, count in (("layer", 4), ("attention-mlp", 10), ("module", 20)):
        blocks = perturbation_blocks(model, params, level)
        assert len(blocks) == count and sorted(i for block in blocks for i in block) == list(range(len(params)))
    layer = perturbation_blocks(model, params, "layer")[1]
    assert {names[i] for i in layer} == {n for n in names if n.startswith("model.layers.0.")}
    with pytest.raises(OptionError, match="has no list of blocks: use blocks=module"):
        perturbation_blocks(nn.Sequential(nn.Linear(2, 2)), list(nn.Linear(2, 2).parameters()), "layer")


@pytest.mark.parametrize("level", ["layer", "attention-mlp"])
def test_blockwise_mezo_matches_a_naive_reference(level, batch):
    model = random_llama("tiny", dtype=torch.float64, seed=0)
    optimizer = MeZO(model, lr=1e-2, eps=1e-3, seed=4, blocks=level)
    name_of = {id(p): name for name, p in model.named_parameters()}
    order = [name_of[id(p)] for p in optimizer.param_list]
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(2):
        optimizer.step(lambda: lm_loss(model, batch))
        seed = derive_seed(4, step, 0)
        z = {name: optimizer.engine.direction(i, seed).double() for i, name in enumerate(order)}
        moves = {}
        for block in optimizer.blocks:
            members = {order[i] for i in block}
            part = {name: (z[name] if name in members else torch.zeros_like(z[name])) for name in theta}
            with torch.no_grad():
                plus = lm_loss(model, batch, {k: theta[k] + 1e-3 * part[k] for k in theta}).item()
                minus = lm_loss(model, batch, {k: theta[k] - 1e-3 * part[k] for k in theta}).item()
            moves.update({name: (plus - minus) / 2e-3 * z[name] for name in members})
        theta = {name: value - 1e-2 * moves[name] for name, value in theta.items()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), theta[name], rtol=0, atol=1e-12, msg=name)
    assert optimizer.forwards() == 2 * len(optimizer.blocks)


def test_blockwise_zo_adam_and_one_sided_blocks_train_and_count_their_forwards(batch):
    model = random_llama("tiny", seed=7)
    optimizer = ZOAdam(model, lr=3e-3, blocks="layer", difference="forward", seed=0)
    with torch.no_grad():
        before = lm_loss(model, batch).item()
    for _ in range(150):
        optimizer.step(lambda: lm_loss(model, batch))
    with torch.no_grad():
        assert lm_loss(model, batch).item() < before - 0.3
    assert optimizer.forwards() == 1 + len(optimizer.blocks)  # the loss at θ, shared, then one per block


@pytest.mark.parametrize("name", ["mezo", "zo-sign", "zo-momentum", "zo-adam"])
def test_blockwise_zero_learning_rate_is_bit_exact_in_bf16(name, batch):
    model = random_llama("tiny", dtype=torch.bfloat16, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = create_optimizer(name, model, lr=0.0, blocks="module")
    for _ in range(2):
        optimizer.step(lambda: lm_loss(model, batch))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_blocks_that_cannot_work_are_one_line_errors(tiny_llama):
    for build, message in [
        (lambda: MeZO(tiny_llama, blocks="rows"), "blocks must be one of layer, attention-mlp"),
        (lambda: MeZO(tiny_llama, blocks="layer", perturbation="inplace"), "perturbation=module"),
        (lambda: MeZO(tiny_llama, blocks="layer", dual_forward=True), "dual_forward=false"),
    ]:
        with pytest.raises(OptionError, match=message):
            build()
