"""IP-SGD: SGD whose update is fused into backward, so no full gradient is ever held (as in LOMO)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import NonFiniteGradientError, NonFiniteLossError, OptionError
from .params import refuse_sharded, trainable_groups


class UpdatesInBackward:
    """For optimizers whose updates run in post-accumulate-grad hooks (IP-SGD, Addax): owns the hooks, and
    watches the gradients they consume.

    A gradient can overflow in backward while the loss is finite (fp16). The hooks cannot wait for the
    whole backward before updating, that is the point of them, so each adds its gradient's sum to a
    running total on the gradient's device (no synchronisation per tensor); one check after backward
    then reports a NaN or inf that reached the weights, and the trainer stops without saving them.
    """

    def _register_update_hooks(self, hooks) -> None:
        """``hooks``: (parameter, hook) pairs; each hook runs when that parameter's gradient is complete."""
        hooks = list(hooks)
        refuse_sharded([param for param, _ in hooks], f"{type(self).__name__} updates each parameter inside backward, "
                       "before FSDP2 has reduce-scattered its gradient")
        self._handles = [param.register_post_accumulate_grad_hook(hook) for param, hook in hooks]
        self._gradient_total: torch.Tensor | None = None
        # Data parallel (zotune.distributed): averages losses over the ranks, and each gradient in place.
        self.reduce_losses: Callable[[list[float]], list[float]] = lambda values: values
        self.reduce_gradient: Callable[[torch.Tensor], None] | None = None

    def _take_gradient(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter's complete gradient (averaged over the ranks when data parallel), watched."""
        grad = param.grad
        if self.reduce_gradient is not None:
            self.reduce_gradient(grad)
        total = grad.sum(dtype=torch.float32)
        self._gradient_total = total if self._gradient_total is None else self._gradient_total + total.to(
            self._gradient_total.device)
        return grad

    def _checked_loss(self, loss: torch.Tensor, step: int, seed: int | None = None, name: str = "loss") -> float:
        """The loss's value (its mean over the ranks when data parallel); raises if it is not finite, so
        that every rank refuses the same step before backward."""
        value = self.reduce_losses([loss.detach().item()])[0]
        if not math.isfinite(value):
            raise NonFiniteLossError(step, {name: value}, seed)
        return value

    def _backward_and_check(self, loss: torch.Tensor, step: int, seed: int | None = None) -> None:
        """``loss.backward()`` (the hooks update the weights), then raise if a gradient was not finite."""
        self._gradient_total = None
        loss.backward()
        total, self._gradient_total = self._gradient_total, None
        if total is not None and not math.isfinite(total.item()):
            raise NonFiniteGradientError(step, seed)

    def remove_hooks(self) -> None:
        """Detach the optimizer from its parameters (afterwards, backward no longer updates them)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class InPlaceSGD(UpdatesInBackward, torch.optim.Optimizer):
    """Plain SGD (θ ← θ·(1 − lr·wd) − lr·∇θ), applied to each parameter the moment its gradient is
    complete, from a post-accumulate-grad hook that then frees the gradient.

    Peak memory: parameters + activations + the largest single gradient (SGD holds all gradients).
    ``step(closure)``: the closure returns the loss without calling backward; ``step`` checks that the
    loss is finite, then runs backward, which performs the update, then checks that the gradients were
    finite (:class:`NonFiniteGradientError` otherwise: the weights are already changed). Calling
    ``loss.backward()`` yourself updates the parameters too (``step()`` without a closure then does nothing). Gradient accumulation is
    impossible by construction: each backward is a step.
    """

    def __init__(self, params_or_model, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise OptionError(f"lr must be >= 0, got {lr}")
        _, groups = trainable_groups(params_or_model, weight_decay)
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self._steps = 0
        self._register_update_hooks((param, self._updater(group)) for group in self.param_groups
                                    for param in group["params"])

    def _updater(self, group: dict):
        @torch.no_grad()
        def update(param: torch.Tensor) -> None:
            lr, weight_decay = group["lr"], group["weight_decay"]
            if weight_decay:
                param.mul_(1.0 - lr * weight_decay)
            param.add_(self._take_gradient(param), alpha=-lr)
            param.grad = None

        return update

    def step(self, closure=None):  # type: ignore[override]
        if closure is None:
            return None
        with torch.enable_grad():
            loss = closure()
            value = self._checked_loss(loss, self._steps)
            self._backward_and_check(loss, self._steps)
        self._steps += 1
        return value
