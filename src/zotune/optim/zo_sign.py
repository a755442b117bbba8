"""ZO-SGD-Sign: a step of fixed size along the sign of the zeroth-order estimate (the ZO benchmark's
ZO-SGD-Sign; Zhang et al., ICML 2024)."""

from __future__ import annotations

import math

from ..errors import OptionError
from .mezo import MeZO

SIGNS = ("scalar", "coordinate")


class ZOSGDSign(MeZO):
    """MeZO's estimate c_j, a step whose size does not depend on |c_j|:

        sign="scalar":      θ ← θ·(1 − lr·wd) − (lr/n)·Σ_j sign(c_j)·z(s_j)
        sign="coordinate":  θ ← θ·(1 − lr·wd) − (lr/n)·Σ_j sign(c_j·z(s_j))    (entry by entry)

    "scalar" is what the benchmark's code does (the sign of the projected gradient times z): still a sum of
    directions, so one generation sweep applies it. "coordinate" is the sign of the estimate ĝ = c·z itself,
    every entry ±lr: z is regenerated for the sign, never stored. A c of exactly 0 takes no step.

    Args: those of :class:`MeZO` (lr's default is the benchmark's scale for a sign step), and
        sign: ``"scalar"`` (the benchmark's, the default) or ``"coordinate"``.
    """

    def __init__(self, params_or_model, lr: float = 1e-7, sign: str = "scalar", **options) -> None:
        if sign not in SIGNS:
            raise OptionError(f"sign must be scalar or coordinate, got {sign!r}")
        super().__init__(params_or_model, lr=lr, **options)
        self.sign = sign

    def update_pairs(self, estimates, group: dict):
        return [(e.seed, -group["lr"] * _sign(e.projected_gradient) / self.n_directions) for e in estimates]

    def _update(self, estimates) -> None:
        if self.sign == "scalar":
            return super()._update(estimates)

        def update(block, group, state) -> None:
            for seed, coef in self.gradient_pairs(estimates, block.param_index):
                block.work.add_(block.z(seed).sign(), alpha=-group["lr"] * _sign(coef) / self.n_directions)

        self.dense_update(update, (), restore=estimates[-1].restore)


def _sign(value: float) -> float:
    return 0.0 if value == 0 else math.copysign(1.0, value)
