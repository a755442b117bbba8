"""ZO-SGD-Cons: zeroth-order SGD that takes a step only where it lowers the batch's loss (the ZO benchmark's
ZO-SGD-Cons)."""

from __future__ import annotations

import torch

from ..errors import OptionError
from ..estimators import Closure
from .mezo import MeZO
from .protocol import Loss


class ZOSGDConservative(MeZO):
    """MeZO's estimate ĝ = (1/n)·Σ_j c_j·z(s_j), then the loss on the same batch at the two candidate points
    θ − lr·ĝ and θ + lr·ĝ; θ moves to the best of θ, θ − lr·ĝ, θ + lr·ĝ, ties broken as the benchmark's code
    breaks them (L− ≤ L0 prefers θ − lr·ĝ unless L+ is no higher; L− > L0 keeps θ unless L+ ≤ L0).

    Forwards a step: 1 (θ) + 2n (the estimate; n + 0 one-sided, where the loss at θ is shared) + 2 (the
    candidates): 5 for n = 1, as in the benchmark. In module mode the candidates are evaluated on perturbed
    copies, so θ is written once, by the chosen move (none when θ is kept): lr = 0 stays bit-identical.
    Weight decay is refused: the comparison is between the three points, and decay would move θ off them.
    Every group takes the first group's lr (the candidates perturb all parameters alike). Block-wise
    (``blocks``), ĝ is made of each block's own estimate (2 forwards per block) and the three points are
    compared for the whole model.

    Args: those of :class:`MeZO` (``weight_decay`` must be 0).
    """

    def __init__(self, params_or_model, lr: float = 1e-6, weight_decay: float = 0.0, **options) -> None:
        if weight_decay:
            raise OptionError(
                "zo-cons compares the loss at θ and at θ ∓ lr·ĝ and keeps the best: weight decay "
                "would move θ off those points; set weight_decay=0"
            )
        super().__init__(params_or_model, lr=lr, **options)
        self.last_move = 0

    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        """One ZO-SGD-Cons step (see the class docstring) on ``closure``'s batch (the loss, without backward):
        the loss at θ, MeZO's estimate, the losses at θ ∓ lr·ĝ, then the move to the best of the three points
        (``last_move``: −1 for θ − lr·ĝ, 1 for θ + lr·ĝ, 0 for θ kept). Returns the loss at θ before the move.

        Raises:
            TypeError: without a closure.
            NonFiniteLossError: for a non-finite loss, before any move.
        """
        if closure is None:
            raise TypeError("ZOSGDConservative.step needs a closure that returns the loss (without calling backward)")
        step = self.state["zo"]["step"]
        loss_here = self.estimator.loss_at(closure, step=step)
        estimates = self.estimates(closure, loss_here=loss_here if self.estimator.one_sided else None)
        if estimates[-1].restore:  # in place: back to θ before the candidates
            self.engine.apply(estimates[-1].restore)
            estimates[-1].restore = []
        self.advance()
        lr = self.param_groups[0]["lr"]

        def descent(index: int | None = None) -> list:  # −lr·ĝ; block-wise, each index's own block's estimate
            return [(seed, -lr * coef) for seed, coef in self.gradient_pairs(estimates, index)]

        def ascent(index: int | None = None) -> list:
            return [(seed, -coef) for seed, coef in descent(index)]

        loss_down = self.estimator.loss_at(closure, descent if self.blocks else descent(), step)
        loss_up = self.estimator.loss_at(closure, ascent if self.blocks else ascent(), step)
        if loss_down > loss_here:
            move = 0 if loss_here < loss_up else 1
        else:
            move = -1 if loss_down < loss_up else 1
        for block in (self.blocks or [None]) if move else []:
            index = None if block is None else next(iter(block))
            self.engine.apply([(seed, -move * coef) for seed, coef in descent(index)], None if block is None else sorted(block))
        self.last_estimates, self.last_move = estimates, move
        return loss_here

    def forwards(self) -> int:
        return super().forwards() + 3

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        return {**super().train_step(batches, loss, micro_batch), "move": self.last_move}
