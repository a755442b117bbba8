import pytest
import torch

from conftest import lm_loss
from zotune import InPlaceSGD, NonFiniteLossError, create_optimizer
from zotune.models import random_llama
from zotune.optim import trainable_groups


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_inplace_sgd_matches_torch_sgd(tie, batch):
    model = random_llama("tiny", seed=0, tie_embeddings=tie)
    reference = random_llama("tiny", seed=0, tie_embeddings=tie)
    optimizer = InPlaceSGD(model, lr=0.5, weight_decay=0.1)
    _, groups = trainable_groups(reference, weight_decay=0.1)
    torch_sgd = torch.optim.SGD(groups, lr=0.5)
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model, batch))
        torch_sgd.zero_grad()
        lm_loss(reference, batch).backward()
        torch_sgd.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        assert a.grad is None
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), random_llama("tiny", seed=0).parameters()))


def test_never_holds_more_than_one_gradient(batch):
    model = random_llama("tiny", seed=1)
    params = [p for p in model.parameters()]
    held_at_each_hook = []

    def count_gradients(param):
        held_at_each_hook.append(sum(p.grad is not None for p in params))

    # Registered before the optimizer's hooks, so each runs just before that parameter's update.
    for param in params:
        param.register_post_accumulate_grad_hook(count_gradients)
    optimizer = InPlaceSGD(model, lr=0.1)
    optimizer.step(lambda: lm_loss(model, batch))
    assert len(held_at_each_hook) == len(params)
    assert max(held_at_each_hook) == 1
    assert all(p.grad is None for p in params)


def test_non_finite_loss_stops_before_backward(batch):
    model = random_llama("tiny", seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = InPlaceSGD(model, lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 0: loss=inf\. The parameters were not updated"):
        optimizer.step(lambda: lm_loss(model, batch) * float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_remove_hooks_detaches_the_optimizer(batch):
    model = random_llama("tiny", seed=3)
    optimizer = InPlaceSGD(model, lr=0.1)
    optimizer.remove_hooks()
    before = [p.detach().clone() for p in model.parameters()]
    lm_loss(model, batch).backward()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["mezo", "adamezo", "ip-sgd", "sgd", "adam"])
def test_registry_builds_every_optimizer_with_the_decay_rule(name, tiny_llama):
    optimizer = create_optimizer(name, tiny_llama, lr=1e-3, weight_decay=0.1)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(tiny_llama.named_parameters())
    assert decays[id(named["model.layers.0.mlp.up_proj.weight"])] == 0.1
    assert decays[id(named["model.norm.weight"])] == 0.0
    assert len(decays) == len(named)


def test_unknown_optimizer_name(tiny_llama):
    with pytest.raises(ValueError, match="unknown optimizer 'mezzo': choose one of adam, adamezo, addax, addax-wa, ip-sgd, mezo, sgd, svrg"):
        create_optimizer("mezzo", tiny_llama)
