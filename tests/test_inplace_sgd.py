import pytest
import torch

from conftest import NaNGradient, lm_loss
from zotune import InPlaceSGD, NonFiniteGradientError, NonFiniteLossError, create_optimizer
from zotune.config import TrainConfig
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import trainable_groups
from zotune.train import build_optimizer


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


@pytest.mark.parametrize("clip", [None, 0.5], ids=["plain", "clipped"])
def test_never_holds_more_than_one_gradient(clip, batch):
    model = random_llama("tiny", seed=1)
    params = [p for p in model.parameters()]
    held_at_each_hook = []

    def count_gradients(param):
        held_at_each_hook.append(sum(p.grad is not None for p in params))

    # Registered before the optimizer's hooks, so each runs just before that parameter's update.
    for param in params:
        param.register_post_accumulate_grad_hook(count_gradients)
    optimizer = InPlaceSGD(model, lr=0.1, clip_grad_norm=clip)
    optimizer.step(lambda: lm_loss(model, batch))
    assert len(held_at_each_hook) == len(params) * (1 if clip is None else 2)  # clipping: a measuring backward first
    assert max(held_at_each_hook) == 1
    assert all(p.grad is None for p in params)


def test_non_finite_loss_stops_before_backward(batch):
    model = random_llama("tiny", seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = InPlaceSGD(model, lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 0: loss=inf\. The parameters were not updated"):
        optimizer.step(lambda: lm_loss(model, batch) * float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_gradients_held_before_an_update_are_refused(batch):
    """Backward adds to a gradient already in .grad, so an update would apply a stale gradient with its own."""
    model, fresh = random_llama("tiny", seed=3), random_llama("tiny", seed=3)
    lm_loss(model, batch).backward()  # before the optimizer's hooks exist: the gradients stay
    with pytest.raises(OptionError, match=r"hold a gradient .*: call model\.zero_grad\(\) before creating InPlaceSGD"):
        InPlaceSGD(model, lr=0.1)
    model.zero_grad()
    optimizer = InPlaceSGD(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model.model.norm.weight.grad = torch.ones_like(model.model.norm.weight)  # put there by other code
    with pytest.raises(OptionError, match=r"1 parameter holds a gradient .*: call optimizer\.zero_grad\(\) before step\(\)"):
        optimizer.step(lambda: lm_loss(model, batch))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    optimizer.zero_grad()
    optimizer.step(lambda: lm_loss(model, batch))
    InPlaceSGD(fresh, lr=0.1).step(lambda: lm_loss(fresh, batch))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


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
    with pytest.raises(
        ValueError,
        match="unknown optimizer .mezzo.: choose one of adam, adamezo, addax, addax-wa, forward-grad, ip-sgd, mezo, sgd, svrg, zo-adam",
    ):
        create_optimizer("mezzo", tiny_llama)


def torch_sgd_with_clipping(model, loss_fn, *, lr, weight_decay, max_norm, steps):
    """The dense reference: a full backward, torch.nn.utils.clip_grad_norm_, torch.optim.SGD; the norms it saw."""
    _, groups = trainable_groups(model, weight_decay=weight_decay)
    sgd = torch.optim.SGD(groups, lr=lr)
    norms = []
    for _ in range(steps):
        sgd.zero_grad()
        loss_fn().backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        sgd.step()
    return norms


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "unclipped"])
def test_clip_grad_norm_matches_torch_clip_grad_norm(max_norm, batch):
    model, reference = random_llama("tiny", seed=0), random_llama("tiny", seed=0)
    optimizer = InPlaceSGD(model, lr=0.5, weight_decay=0.1, clip_grad_norm=max_norm)
    forwards, measured = [], []
    for _ in range(3):
        optimizer.step(lambda: forwards.append(1) or lm_loss(model, batch))
        measured.append(optimizer.last_grad_norm)
    norms = torch_sgd_with_clipping(
        reference, lambda: lm_loss(reference, batch), lr=0.5, weight_decay=0.1, max_norm=max_norm, steps=3
    )
    assert all(norm > max_norm for norm in norms) == (max_norm < 1)  # the clip acts in one case only
    assert measured == pytest.approx(norms, rel=1e-5)
    assert len(forwards) == 3  # one forward a step: the measuring backward keeps the graph for the updating one
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        assert a.grad is None


def test_a_clip_that_does_not_act_changes_nothing(batch):
    clipped, plain = random_llama("tiny", seed=0), random_llama("tiny", seed=0)
    InPlaceSGD(clipped, lr=0.5, weight_decay=0.1, clip_grad_norm=1e3).step(lambda: lm_loss(clipped, batch))
    InPlaceSGD(plain, lr=0.5, weight_decay=0.1).step(lambda: lm_loss(plain, batch))
    assert all(torch.equal(a, b) for a, b in zip(clipped.parameters(), plain.parameters()))


def test_the_clipping_norm_is_that_of_the_gradient_averaged_over_the_ranks(batch):
    """Data parallel, each gradient is averaged over the ranks in its hook, in both backwards. A stand-in
    average (three times this rank's gradient) must be clipped as torch clips the gradient of 3·loss."""
    model, reference = random_llama("tiny", seed=5), random_llama("tiny", seed=5)
    optimizer = InPlaceSGD(model, lr=0.5, clip_grad_norm=0.5)
    reduced = []
    optimizer.reduce_gradient = lambda grad: reduced.append(grad.mul_(3.0))
    optimizer.step(lambda: lm_loss(model, batch))
    assert len(reduced) == 2 * len(list(model.parameters()))
    norms = torch_sgd_with_clipping(
        reference, lambda: 3 * lm_loss(reference, batch), lr=0.5, weight_decay=0.0, max_norm=0.5, steps=1
    )
    assert optimizer.last_grad_norm == pytest.approx(norms[0], rel=1e-5) and norms[0] / 3 > 0.5
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_clipping_refuses_a_non_finite_gradient_before_any_update(batch):
    model = random_llama("tiny", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = InPlaceSGD(model, lr=0.1, clip_grad_norm=1.0)
    with pytest.raises(NonFiniteGradientError, match="at step 0 with a finite loss: the parameters were not updated"):
        optimizer.step(lambda: NaNGradient.apply(lm_loss(model, batch)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    optimizer.step(lambda: lm_loss(model, batch))  # the refused step left nothing behind


def test_a_backward_of_ones_own_cannot_skip_the_clip(batch):
    model = random_llama("tiny", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    InPlaceSGD(model, lr=0.1, clip_grad_norm=1.0)
    with pytest.raises(OptionError, match=r"call optimizer\.step\(lambda: loss\) instead of loss\.backward\(\)"):
        lm_loss(model, batch).backward()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_bad_clip_grad_norm(tiny_llama):
    for bad in (0.0, -1.0, True, "1"):
        with pytest.raises(OptionError, match="clip_grad_norm must be a positive number or None"):
            InPlaceSGD(tiny_llama, clip_grad_norm=bad)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_clip_grad_norm_reaches_the_optimizer_from_the_config(clip, tiny_llama):
    options = {} if clip is None else {"clip_grad_norm": clip}
    optimizer = build_optimizer(TrainConfig(optimizer="ip-sgd", lr=0.1, optimizer_options=options), tiny_llama)
    assert optimizer.clip_grad_norm == clip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_update_is_computed_in_float32_and_rounded_once(dtype, batch):
    """θ ← round(θ·(1 − lr·wd) − lr·g), θ and g in float32 (the same operations, so exactly); rounding after
    the decay too, as the update in the weights' dtype does, gives other weights. In float32 it is the plain update."""
    model = random_llama("tiny", dtype=dtype, seed=6, tie_embeddings=False)
    copy = random_llama("tiny", dtype=dtype, seed=6, tie_embeddings=False)
    lr = 0.1
    optimizer = InPlaceSGD(model, lr=lr, weight_decay=0.1)
    decay = {id(p): 1.0 - lr * g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(lm_loss(copy, batch), list(copy.parameters()))
    optimizer.step(lambda: lm_loss(model, batch))
    rounded_twice = []
    for (name, param), theta, grad in zip(model.named_parameters(), before, grads):
        once = (theta.float() * decay[id(param)]).add(grad.float(), alpha=-lr).to(dtype)
        assert torch.equal(param, once), name
        rounded_twice.append(torch.equal(param, (theta * decay[id(param)]).add(grad, alpha=-lr)))
    assert all(rounded_twice) == (dtype == torch.float32)
