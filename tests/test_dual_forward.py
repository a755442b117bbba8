"""MeZO's dual forward: θ+εz and θ−εz evaluated in one forward over the batch stacked twice."""

import pytest
import torch
from torch import nn

from conftest import lm_loss, loss_before_and_after
from zotune import MeZO
from zotune.directions import DirectionEngine
from zotune.errors import OptionError
from zotune.estimators import TwoPointEstimator, mean_over_micro_batches
from zotune.models import random_llama
from zotune.optim import AdaMeZO


class Nested(nn.Module):
    """The cases the dual forward treats apart: an embedding (rows only), a parameter owned by a module whose
    children own parameters too, linear layers with and without bias, and one whose weight is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.hidden = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, ids):
        x = self.embedding(ids).mean(dim=1) * self.scale
        return self.head(torch.tanh(self.frozen(torch.tanh(self.hidden(x)))))


def nested_loss(model, ids, targets, copies=1):
    losses = nn.functional.cross_entropy(model(ids.repeat(copies, 1)), targets.repeat(copies), reduction="none")
    return losses.mean() if copies == 1 else losses.view(copies, -1).mean(dim=1)


def nested_case():
    torch.manual_seed(0)
    model = Nested().double()
    generator = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 50, (6, 5), generator=generator), torch.randint(0, 3, (6,), generator=generator)
    return model, lambda copies=1: nested_loss(model, ids, targets, copies)


def llama_case(tie, batch):
    model = random_llama("tiny", dtype=torch.float64, seed=0, tie_embeddings=tie)
    return model, lambda copies=1: lm_loss(model, batch, copies=copies)


@pytest.mark.parametrize("case", ["llama-tied", "llama-untied", "nested"])
def test_dual_forward_gives_the_losses_of_two_separate_forwards(case, batch):
    model, closure = nested_case() if case == "nested" else llama_case(case == "llama-tied", batch)
    engine = DirectionEngine([p for p in model.parameters() if p.requires_grad])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for seed in (3, 4):
        separate = TwoPointEstimator(engine, 1e-3, model).estimate(closure, seed, 0)
        dual = TwoPointEstimator(engine, 1e-3, model, dual_forward=True).estimate(closure, seed, 0)
        assert separate.loss_plus != separate.loss_minus
        assert dual.loss_plus == pytest.approx(separate.loss_plus, rel=0, abs=1e-12)
        assert dual.loss_minus == pytest.approx(separate.loss_minus, rel=0, abs=1e-12)
    for name, param in model.named_parameters():  # nothing left perturbed, no forward left replaced
        assert torch.equal(param, before[name]), name
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_learning_rate_leaves_parameters_bit_identical(dtype, batch):
    model = random_llama("tiny", dtype=dtype, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model, lr=0.0, eps=1e-2, weight_decay=0.1, dual_forward=True)
    moved = []
    for _ in range(6):  # a bf16 loss is rounded to ~0.03, so some steps see no difference
        optimizer.step(lambda copies=1: lm_loss(model, batch, copies=copies))
        moved.append(optimizer.last_estimates[0].projected_gradient != 0)
    assert any(moved)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_adamezo_takes_the_same_steps_with_a_dual_forward(batch):
    models = [random_llama("tiny", dtype=torch.float64, seed=0) for _ in range(2)]
    optimizers = [AdaMeZO(model, lr=1e-4, window=2, seed=5, dual_forward=dual)
                  for model, dual in zip(models, (False, True))]
    for _ in range(4):  # through the warm-up and past it
        for model, optimizer in zip(models, optimizers):
            optimizer.step(lambda copies=1, model=model: lm_loss(model, batch, copies=copies))
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    untrained = random_llama("tiny", dtype=torch.float64, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), untrained.parameters()))


def test_clear_errors(batch):
    model = random_llama("tiny", seed=0)
    with pytest.raises(OptionError, match="pass the model"):
        MeZO(model.parameters(), dual_forward=True)
    optimizer = MeZO(model, dual_forward=True)
    with pytest.raises(OptionError, match="closure that takes copies"):
        optimizer.step(lambda: lm_loss(model, batch))
    with pytest.raises(OptionError, match="returned 1 value"):
        optimizer.step(lambda copies=1: lm_loss(model, batch))
    with pytest.raises(OptionError, match="odd number"):
        optimizer.step(lambda copies=1: lm_loss(model, batch[:3]))
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert optimizer.state["zo"]["step"] == 0


def test_gradient_accumulation_with_a_dual_forward_equals_full_batch(batch):
    models = [random_llama("tiny", dtype=torch.float64, seed=1) for _ in range(2)]
    full, accumulated = (MeZO(model, lr=1e-3, seed=5, dual_forward=True) for model in models)
    closure = mean_over_micro_batches(lambda b, copies=1: lm_loss(models[1], b, copies=copies), [batch[:2], batch[2:]])
    for _ in range(3):
        full.step(lambda copies=1: lm_loss(models[0], batch, copies=copies))
        accumulated.step(closure)
        assert accumulated.last_estimates[0].projected_gradient == pytest.approx(
            full.last_estimates[0].projected_gradient, rel=1e-6)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_mezo_with_a_dual_forward_lowers_the_loss_of_a_tiny_model(batch):
    model = random_llama("tiny", seed=7)
    optimizer = MeZO(model, lr=3e-3, eps=1e-3, seed=0, dual_forward=True)
    initial, final = loss_before_and_after(model, optimizer, batch, steps=300)
    assert final < initial - 0.3, (initial, final)
