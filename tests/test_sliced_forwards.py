"""Large linear layers and embeddings run their perturbed forwards slice by slice, never copying the whole weight."""

import pytest
import torch

from conftest import lm_loss
from zotune import perturbation
from zotune.directions import DirectionEngine
from zotune.estimators import TwoPointEstimator
from zotune.models import random_llama
from zotune.optim import MeZO


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_of_a_perturbed_copy_equal_those_rows_of_the_whole_copy(dtype):
    weight = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    engine = DirectionEngine([weight])
    pairs = [(5, 1e-2)]
    whole = engine.perturbed_copy(0, pairs)
    for rows in (slice(0, 4), slice(9, 30), slice(30, 37)):
        assert torch.equal(engine.perturbed_copy(0, pairs, rows=rows), whole[rows])
        assert torch.equal(
            engine.perturbed_copy(0, [(5, 1e-2), (6, -3e-3)], rows=rows), engine.perturbed_copy(0, [(5, 1e-2), (6, -3e-3)])[rows]
        )
        plus, minus = torch.empty_like(whole[rows]), torch.empty_like(whole[rows])
        engine.perturbed_pair(0, 5, 1e-2, plus, minus, rows=rows)
        assert torch.equal(plus, whole[rows]) and torch.equal(minus, engine.perturbed_copy(0, [(5, -1e-2)])[rows])


def estimates(model, batch, dual=False):
    engine = DirectionEngine([p for p in model.parameters() if p.requires_grad])
    closure = lambda copies=1: lm_loss(model, batch, copies=copies)  # noqa: E731
    estimate = TwoPointEstimator(engine, 1e-2, model, dual_forward=dual).estimate(closure, 3, 0)
    return estimate.loss_plus, estimate.loss_minus


def copied_shapes(monkeypatch):
    """The shapes of every perturbed copy the module perturbation allocates or recycles."""
    shapes = []
    original = perturbation.ModulePerturbation._copy_buffer

    def recording(self, param, copies=1):
        shapes.append(tuple(param.shape))
        return original(self, param, copies)

    monkeypatch.setattr(perturbation.ModulePerturbation, "_copy_buffer", recording)
    return shapes


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("table", ["rows", "slices"])  # the embedding: looked-up rows (CPU) or slices (the GPU's way)
def test_sliced_forwards_give_the_losses_of_whole_copies_without_copying_the_head(monkeypatch, batch, tie, dual, table):
    model = random_llama("tiny", dtype=torch.float64, seed=0, tie_embeddings=tie)
    whole = estimates(model, batch, dual)
    head = tuple(model.lm_head.weight.shape)
    monkeypatch.setattr(perturbation, "SLICE_ELEMENTS", model.lm_head.weight.numel() // 5)
    if table == "slices":
        monkeypatch.setattr(perturbation, "_looks_up_rows", lambda module, params: False)
    shapes = copied_shapes(monkeypatch)
    sliced = estimates(model, batch, dual)
    assert sliced == pytest.approx(whole, rel=0, abs=1e-12)
    assert shapes and head not in shapes and (head[0] // 5, head[1]) in shapes  # slices of the head, never all of it


def test_zero_learning_rate_stays_bit_identical_with_sliced_forwards(monkeypatch, batch):
    model = random_llama("tiny", dtype=torch.bfloat16, seed=3)
    monkeypatch.setattr(perturbation, "SLICE_ELEMENTS", 1000)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model, lr=0.0, eps=1e-2)
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model, batch))
    assert any(e.projected_gradient != 0 for e in optimizer.last_estimates)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
