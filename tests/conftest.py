import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from zotune.models import random_llama


def _normalize_float64_in_float64() -> None:
    """transformers' LlamaRMSNorm normalizes in float32 whatever the model's dtype. In a float64 model a 1e-17
    change of a weight can then flip a float32 rounding and move the loss by ~1e-11, which a float64 comparison
    with a naive reference cannot absorb (c = ΔL/2ε turns it into ~1e-8). Tests normalize float64 in float64;
    at import, so that processes spawned by a test (which import this module) do too."""
    float32_forward = LlamaRMSNorm.forward

    def forward(self, hidden_states):
        if hidden_states.dtype != torch.float64:
            return float32_forward(self, hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    LlamaRMSNorm.forward = forward


_normalize_float64_in_float64()


@pytest.fixture
def tiny_llama():
    return random_llama("tiny", seed=0)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 12), generator=generator)


def lm_loss(model, input_ids, params=None, copies=1):
    """Next-token cross-entropy in the model's own dtype (transformers' loss upcasts to float32, which would
    put float32 noise into float64 comparisons). ``params`` evaluates the model at other weights. ``copies``
    > 1: one forward over the batch stacked that many times, one loss per copy (MeZO's dual forward)."""
    stacked = input_ids.repeat(copies, 1)
    if params is None:
        logits = model(input_ids=stacked).logits
    else:
        logits = torch.func.functional_call(model, params, (), {"input_ids": stacked}).logits
    losses = [
        torch.nn.functional.cross_entropy(part[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()) for part in logits.chunk(copies)
    ]
    return losses[0] if copies == 1 else torch.stack(losses)


def keyed_direction(model, optimizer):
    """``direction(name, seed)``: the optimizer's keyed z for a parameter named as in ``model``."""
    index = {id(p): i for i, p in enumerate(optimizer.engine.params)}
    params = dict(model.named_parameters())
    return lambda name, s: optimizer.engine.direction(index[id(params[name])], s)


def resume_and_compare(build_optimizer, batch, steps_before: int, steps_after: int, step=None):
    """Train ``steps_before`` steps, save model and optimizer state, train on; then rebuild a different
    model and a fresh optimizer, load the saved states, train the same steps, and check the parameters are
    bit-identical. ``build_optimizer(model)`` makes the optimizer; ``step(model, optimizer, k)`` takes step k
    (default: one closure, the loss on ``batch``); returns the resumed optimizer."""
    if step is None:
        step = lambda model, optimizer, k: optimizer.step(lambda: lm_loss(model, batch))  # noqa: E731
    model = random_llama("tiny", seed=4)
    optimizer = build_optimizer(model)
    for k in range(steps_before):
        step(model, optimizer, k)
    saved_params = {n: p.detach().clone() for n, p in model.state_dict().items()}
    saved_state = copy.deepcopy(optimizer.state_dict())  # a snapshot: dense state is updated in place, as in torch
    for k in range(steps_before, steps_before + steps_after):
        step(model, optimizer, k)
    resumed_model = random_llama("tiny", seed=123)
    resumed_model.load_state_dict(saved_params)
    resumed = build_optimizer(resumed_model)
    resumed.load_state_dict(saved_state)
    loaded_stream = dict(resumed.state["zo"])
    for k in range(steps_before, steps_before + steps_after):
        step(resumed_model, resumed, k)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    return loaded_stream


def loss_before_and_after(model, optimizer, batch, steps: int) -> tuple[float, float]:
    """The loss on ``batch`` before and after ``steps`` optimizer steps on it (a learning check)."""
    with torch.no_grad():
        initial = lm_loss(model, batch).item()
    for _ in range(steps):
        optimizer.step(lambda copies=1: lm_loss(model, batch, copies=copies))  # copies: for a dual forward
    with torch.no_grad():
        return initial, lm_loss(model, batch).item()


class NaNGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def train_tiny(tmp_path, *overrides):
    """``zotune train`` through the real CLI on a tiny random model (16 training examples, batch 4, no evaluation
    during training), with ``overrides``; the step records of its metrics.jsonl."""
    from zotune.cli import main

    common = ["model=random:tiny", "num_train=16", "num_dev=8", "num_test=8", "batch_size=4", "max_length=48"]
    assert main(["train", *common, "eval_every=0", *overrides, f"output_dir={tmp_path}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]
