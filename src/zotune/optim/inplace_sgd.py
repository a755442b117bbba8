"""IP-SGD: SGD whose update is fused into backward, so no full gradient is ever held (as in LOMO)."""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteLossError, OptionError
from .params import trainable_groups


class UpdatesInBackward:
    """For optimizers whose updates run in post-accumulate-grad hooks (IP-SGD, Addax): owns the hooks."""

    def _register_update_hooks(self, hooks) -> None:
        """``hooks``: (parameter, hook) pairs; each hook runs when that parameter's gradient is complete."""
        self._handles = [param.register_post_accumulate_grad_hook(hook) for param, hook in hooks]

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
    loss is finite, then runs backward, which performs the update. Calling ``loss.backward()`` yourself
    updates the parameters too (``step()`` without a closure then does nothing). Gradient accumulation is
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

    @staticmethod
    def _updater(group: dict):
        @torch.no_grad()
        def update(param: torch.Tensor) -> None:
            lr, weight_decay = group["lr"], group["weight_decay"]
            if weight_decay:
                param.mul_(1.0 - lr * weight_decay)
            param.add_(param.grad, alpha=-lr)
            param.grad = None

        return update

    def step(self, closure=None):  # type: ignore[override]
        if closure is None:
            return None
        with torch.enable_grad():
            loss = closure()
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(self._steps, {"loss": value})
            loss.backward()
        self._steps += 1
        return value
