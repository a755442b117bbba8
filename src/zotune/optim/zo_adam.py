"""ZO-Adam: Adam's update on the zeroth-order estimate, with its moments stored (the ZO benchmark's
ZO-Adam)."""

from __future__ import annotations

import math

from ..errors import OptionError
from .mezo import MeZO


class ZOAdam(MeZO):
    """Adam on MeZO's estimate ĝ_t = (1/n)·Σ_j c_j·z(s_j), as ``torch.optim.Adam`` applies it to a gradient
    (the benchmark's way), with MeZO's decoupled weight decay (so AdamW's update):

        m ← β1·m + (1 − β1)·ĝ,   v ← β2·v + (1 − β2)·ĝ²
        θ ← θ·(1 − lr·wd) − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + δ)

    m and v are two parameter-sized tensors per parameter: the memory of two more copies of the trainable
    weights. :class:`AdaMeZO` is the other way: no stored moments, rebuilt each step from a window of
    (seed, c) pairs, without bias correction, for window-many generations per update.

    Args: those of :class:`MeZO`, and
        betas: (β1, β2), each in [0, 1); torch's (0.9, 0.999) by default.
        delta: δ > 0, added to the root (Adam's eps; ``eps`` is the perturbation's scale here); 1e-8.
    """

    def __init__(
        self, params_or_model, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), delta: float = 1e-8, **options
    ) -> None:
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise OptionError(f"betas must be two numbers in [0, 1), got {betas}")
        if not delta > 0:
            raise OptionError(f"delta must be positive, got {delta}")
        super().__init__(params_or_model, lr=lr, **options)
        self.betas, self.delta = betas, delta

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        return "its dense moments are not sharded"

    def _update(self, estimates) -> None:
        beta1, beta2 = self.betas
        t = self.state["zo"]["step"]  # already advanced: counts this step from 1
        correction1, root_correction2 = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)

        def update(block, group, state) -> None:
            m, v = state["exp_avg"], state["exp_avg_sq"]
            gradient = block.scratch("gradient").zero_()
            for seed, coef in self.gradient_pairs(estimates, block.param_index):
                gradient.add_(block.z(seed), alpha=coef)
            m.mul_(beta1).add_(gradient, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
            denominator = gradient.copy_(v).sqrt_().div_(root_correction2).add_(self.delta)
            block.work.addcdiv_(m, denominator, value=-group["lr"] / correction1)

        self.dense_update(update, ("exp_avg", "exp_avg_sq"), restore=estimates[-1].restore)
