"""A new zeroth-order optimizer is a few lines and one registry entry: here MeZO with its projected gradient
clipped to [−1, 1], built from MeZO's estimate and a new update rule, checked against a naive reference and
trained through the real CLI code path."""

import torch

from conftest import keyed_direction, lm_loss, train_tiny
from zotune import optim
from zotune.directions import derive_seed
from zotune.models import random_llama


class ClippedMeZO(optim.MeZO):
    """θ ← θ − lr·clip(c, −1, 1)·z: MeZO's estimate, its own update rule."""

    def update_pairs(self, estimates, group):
        return [(e.seed, -group["lr"] * max(-1.0, min(1.0, e.projected_gradient))) for e in estimates]


def test_the_new_rule_matches_a_naive_reference_with_stored_directions(batch):
    model = random_llama("tiny", seed=5).double()
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = ClippedMeZO(model, lr=1e-3, eps=1e-3, seed=9)
    optimizer.step(lambda: lm_loss(model, batch))
    z = {name: keyed_direction(model, optimizer)(name, derive_seed(9, 0, 0)).double() for name in theta}
    with torch.no_grad():
        plus = lm_loss(model, batch, {n: theta[n] + 1e-3 * z[n] for n in theta}).item()
        minus = lm_loss(model, batch, {n: theta[n] - 1e-3 * z[n] for n in theta}).item()
    clipped = max(-1.0, min(1.0, (plus - minus) / 2e-3))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, theta[name] - 1e-3 * clipped * z[name], rtol=0, atol=1e-12)


def test_one_registry_line_trains_it_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(optim.OPTIMIZERS, "zo-clipped", ClippedMeZO)
    steps = train_tiny(tmp_path, "optimizer=zo-clipped", "lr=1e-3", "steps=3")
    assert len(steps) == 3 and all({"loss_plus", "loss_minus", "projected_grad", "seed"} <= r.keys() for r in steps)
    assert steps[-1]["forward_passes"] == 6
