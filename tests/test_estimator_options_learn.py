"""The estimator options (sparse directions, blocks) learn on every ZO optimizer that takes them.

The naive-reference tests check each combination's update for a few steps; these check that a few hundred
steps of it lower the loss clearly of a tiny model, as each optimizer's own learning test does without the options.
"""

import pytest
import torch
from conftest import lm_loss

from zotune.models import random_llama
from zotune.optim import create_optimizer

SPARSE = {"sparsity": 0.5, "mask_every": 50}
MAGNITUDE = {"sparsity": 0.5, "sparse_shares": "magnitude", "mask_every": 50}
BLOCKS = {"blocks": "layer"}
STEPS = 150


@pytest.mark.parametrize(
    "name,lr,options",
    [
        ("mezo", 6e-3, MAGNITUDE),
        ("adamezo", 3e-5, {"window": 10, **SPARSE}),
        ("adamezo", 3e-5, {"window": 10, **BLOCKS}),
        ("zo-momentum", 3e-4, {"buffer": "replay", "window": 10, **BLOCKS}),
        ("zo-cons", 5e-3, BLOCKS),
        ("forward-grad", 6e-3, MAGNITUDE),
        ("svrg", 3e-3, {"anchor_lr": 3e-3, **SPARSE}),
        ("svrg", 3e-3, {"anchor_lr": 3e-3, "memory": "dense", **BLOCKS}),
        ("addax", 3e-3, {"alpha": 0.5, **SPARSE}),
    ],
)
def test_each_option_lowers_the_loss_of_a_tiny_model(name, lr, options, batch):
    model = random_llama("tiny", seed=7)
    optimizer = create_optimizer(name, model, lr=lr, seed=0, **options)

    def closure(copies=1):
        return lm_loss(model, batch, copies=copies)

    with torch.no_grad():
        initial = lm_loss(model, batch).item()
    for _ in range(STEPS):
        # MeZO-SVRG's large batch and Addax's short batch: the same batch here, a check of learning only
        optimizer.step(closure, closure) if name in ("svrg", "addax") else optimizer.step(closure)
    with torch.no_grad():
        final = lm_loss(model, batch).item()
    assert final < initial - 0.15, (initial, final)
