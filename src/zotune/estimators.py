"""Two-point (SPSA) estimates of the projected gradient: :class:`TwoPointEstimator` and :class:`Estimate`,
and :func:`mean_over_micro_batches`, the closure of gradient accumulation.

``c = (L(θ+εz) − L(θ−εz)) / 2ε`` estimates the directional derivative along ``z``; ``c·z`` is the
zeroth-order gradient, kept as the pair ``(seed, c)``. ``difference="forward"`` takes the one-sided
``(L(θ+εz) − L(θ)) / ε`` instead (the ZO benchmark's option): a bias of order ε·zᵀHz against the central
difference's ε², for one forward of θ that every direction of a step shares. A block-wise estimate
(``only``: the indices of one block's parameters, :mod:`zotune.blocks`) perturbs that block alone.

Perturbation modes:

- **module** (exact; needs the model) and **dual** (module mode evaluating θ ± εz in one forward of the
  batch stacked twice): the forwards run on perturbed copies of each module's parameters, never written into
  the stored ones (:mod:`zotune.perturbation`).
- **inplace** (the MeZO paper's scheme; any parameters): θ += εz, forward, θ −= 2εz, forward, then the
  caller folds the restoring +εz into its update pass (3 generations per step whatever the number of
  micro-batches). Rounding makes θ+εz−2εz+εz differ from θ in the last bits, in fp32 too.

Every forward of an estimate runs without dropout, as in MeZO's code: with dropout, L+ and L− would see
different masks. Given the model, the estimator puts it in eval mode for the duration and restores each
module's mode after; given parameters only, the forwards run under :class:`zotune.no_dropout.NoDropout`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .directions import DirectionEngine, Pair
from .errors import NonFiniteLossError, OptionError
from .no_dropout import NoDropout
from .perturbation import ModulePerturbation

Closure = Callable[[], "torch.Tensor | float"]


DIFFERENCES = ("central", "forward")


@dataclass
class Estimate:
    """One two-point estimate. ``restore`` lists pairs the caller must still apply (inplace mode). One-sided
    (``one_sided``): ``loss_minus`` is the loss at the unperturbed point. ``forwards``: the forwards it ran."""

    seed: int
    eps: float
    loss_plus: float
    loss_minus: float
    restore: list[Pair] = field(default_factory=list)
    one_sided: bool = False
    forwards: int = 2
    indices: frozenset[int] | None = None  # a block-wise estimate's block (engine indices); None: every parameter

    @property
    def projected_gradient(self) -> float:
        return (self.loss_plus - self.loss_minus) / (self.eps if self.one_sided else 2.0 * self.eps)


class TwoPointEstimator:
    """Evaluates a loss closure at θ+εz and θ−εz; with ``model`` in module mode, else in place. Either way
    the closure runs without dropout (see the module docstring)."""

    def __init__(
        self,
        engine: DirectionEngine,
        eps: float,
        model: nn.Module | None = None,
        dual_forward: bool = False,
        in_place: bool = False,
        difference: str = "central",
    ) -> None:
        if not eps > 0:
            raise OptionError(f"eps must be positive, got {eps}: the paper default is 1e-3")
        if dual_forward and (model is None or in_place):
            raise OptionError(
                "dual_forward=True evaluates θ+εz and θ−εz inside the model's modules: pass the "
                "model, not its parameters, with module perturbation"
            )
        if difference not in DIFFERENCES:
            raise OptionError(f"difference must be central or forward (one-sided), got {difference!r}")
        if dual_forward and difference == "forward":
            raise OptionError(
                "dual_forward=True evaluates θ+εz and θ−εz together, a central difference: drop "
                "dual_forward, or use difference=central"
            )
        self.engine = engine
        self.eps = eps
        self.one_sided = difference == "forward"
        self.dual_forward = dual_forward
        # Data parallel: replaces this rank's (L+, L−) by the means over the ranks (zotune.distributed).
        self.reduce: Callable[[list[float]], list[float]] | None = None
        self.model = model  # given, its modules run the forwards in eval mode, whatever the perturbation
        self.module_perturbation = ModulePerturbation(engine, model) if model is not None and not in_place else None

    def estimate(
        self,
        closure: Closure,
        seed: int,
        step: int,
        fuse_restore: bool = False,
        base: Sequence[Pair] = (),
        only: frozenset[int] | None = None,
        loss_here: float | None = None,
    ) -> Estimate:
        """Two loss evaluations along ``z(seed)``, around θ + Σ a·z(s) over the ``base`` pairs (default: θ).
        In inplace mode with ``fuse_restore`` the parameters are left at θ−εz and ``Estimate.restore`` holds
        the pair that brings them back; with a ``base`` they are moved there and back (rounding drift).
        ``only``: the engine indices perturbed (a block-wise estimate; module mode). One-sided: ``loss_here``
        is the loss at the point itself when the caller has it (one forward saved), else it is evaluated."""
        if self.one_sided:
            return self._one_sided(closure, seed, step, base, only, loss_here)
        if self.dual_forward and not base and only is None:
            with self.module_perturbation.dual(seed, self.eps):
                loss_plus, loss_minus = self._evaluate_copies(closure)
            estimate = Estimate(seed, self.eps, *self._reduced(loss_plus, loss_minus))
        elif self.module_perturbation is not None:
            with self.module_perturbation([*base, (seed, self.eps)], only):
                loss_plus = self._evaluate(closure)
            with self.module_perturbation([*base, (seed, -self.eps)], only):
                loss_minus = self._evaluate(closure)
            estimate = Estimate(seed, self.eps, *self._reduced(loss_plus, loss_minus), indices=only)
        elif base:
            self.engine.apply(base)
            try:
                estimate = self.estimate(closure, seed, step)
            finally:
                self.engine.apply([(s, -a) for s, a in base])
        else:
            offset = self.eps
            self.engine.apply([(seed, offset)])
            try:
                loss_plus = self._evaluate(closure)
                offset = -self.eps
                self.engine.apply([(seed, -2.0 * self.eps)])
                loss_minus = self._evaluate(closure)
            except BaseException:  # the closure failed: do not leave the weights perturbed
                self.engine.apply([(seed, -offset)])
                raise
            estimate = Estimate(seed, self.eps, *self._reduced(loss_plus, loss_minus), restore=[(seed, self.eps)])
            if not fuse_restore or not _finite(estimate):
                self.engine.apply(estimate.restore)
                estimate.restore = []
        return self._checked(estimate, step)

    def _one_sided(
        self, closure: Closure, seed: int, step: int, base: Sequence[Pair], only: frozenset[int] | None, loss_here: float | None
    ) -> Estimate:
        forwards = 1 if loss_here is not None else 2
        if loss_here is None:
            loss_here = self.loss_at(closure, base, step)
        plus = [*base, (seed, self.eps)]
        if self.module_perturbation is not None:
            with self.module_perturbation(plus, only):
                loss_plus = self._evaluate(closure)
        else:
            loss_plus = self._evaluate_in_place(closure, plus)
        loss_plus = loss_plus if self.reduce is None else self.reduce([loss_plus])[0]
        return self._checked(
            Estimate(seed, self.eps, loss_plus, loss_here, one_sided=True, forwards=forwards, indices=only), step
        )

    def loss_at(self, closure: Closure, pairs: Sequence[Pair] | Callable[[int], Sequence[Pair]] = (), step: int = 0) -> float:
        """The loss at θ + Σ a·z(s) over ``pairs`` (θ itself for none; in module mode, also each engine index's
        own pairs, a block-wise move), without dropout, averaged over the ranks (data parallel); in module mode
        the stored weights are not touched, in place they are moved there and back (rounding drift)."""
        if not callable(pairs) and not pairs:
            value = self._evaluate(closure)
        elif self.module_perturbation is not None:
            with self.module_perturbation(pairs if callable(pairs) else list(pairs)):
                value = self._evaluate(closure)
        else:
            value = self._evaluate_in_place(closure, pairs)
        value = value if self.reduce is None else self.reduce([value])[0]
        if not math.isfinite(value):
            raise NonFiniteLossError(step, {"loss": value})
        return value

    def _evaluate_in_place(self, closure: Closure, pairs: Sequence[Pair]) -> float:
        self.engine.apply(pairs)
        try:
            return self._evaluate(closure)
        finally:
            self.engine.apply([(s, -a) for s, a in pairs])

    @staticmethod
    def _checked(estimate: Estimate, step: int) -> Estimate:
        if not _finite(estimate):
            raise NonFiniteLossError(
                step,
                {"loss+": estimate.loss_plus, "loss-": estimate.loss_minus, "projected gradient": estimate.projected_gradient},
                estimate.seed,
            )
        return estimate

    def _reduced(self, loss_plus: float, loss_minus: float) -> list[float]:
        return [loss_plus, loss_minus] if self.reduce is None else self.reduce([loss_plus, loss_minus])

    @contextmanager
    def _forwards(self):
        """Inference mode without dropout: the model in eval mode (each module's own mode restored after), or,
        given parameters only, :class:`NoDropout`."""
        if self.model is None:
            with torch.inference_mode(), NoDropout():
                yield
            return
        with eval_mode(self.model), torch.inference_mode():
            yield

    def _evaluate(self, closure: Closure) -> float:
        with self._forwards():
            return float(closure())

    def _evaluate_copies(self, closure: Closure) -> tuple[float, float]:
        """The two losses of a closure called with ``copies=2`` (the dual forward's protocol)."""
        try:
            inspect.signature(closure).bind(2)
        except (TypeError, ValueError):
            raise OptionError(
                "dual_forward=True needs a closure that takes copies: closure(2) must evaluate its "
                "batch stacked twice along dim 0 and return the two copies' mean losses (see "
                "zotune.estimators.mean_over_micro_batches and zotune.scoring.classification_loss)"
            ) from None
        with self._forwards():
            losses = torch.as_tensor(closure(2)).detach().flatten().tolist()
        if len(losses) != 2:
            raise OptionError(
                f"dual_forward=True: closure(2) returned {len(losses)} value(s); it must return the "
                "mean loss of each of the two copies of the batch"
            )
        return losses[0], losses[1]


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode for the duration (no dropout), each module's own mode restored after."""
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in training.items():
            module.training = mode


def _finite(estimate: Estimate) -> bool:
    """Finite losses can still give an infinite c when their difference overflows after division by 2ε."""
    return all(math.isfinite(x) for x in (estimate.loss_plus, estimate.loss_minus, estimate.projected_gradient))


def mean_over_micro_batches(loss_fn: Callable[[object], torch.Tensor], micro_batches: Sequence) -> Closure:
    """Gradient accumulation for ZO: a closure returning the mean loss over ``micro_batches``.

    Every micro-batch is evaluated at the same perturbed point (one seed). Micro-batches of different sizes
    (lists) are weighted by their sizes, so with a mean-reduced loss the estimate is the one on the whole
    batch however it was cut.
    """
    if not micro_batches:
        raise OptionError("mean_over_micro_batches needs at least one micro-batch")
    sizes = [len(batch) if hasattr(batch, "__len__") else 1 for batch in micro_batches]
    weights = None if len(set(sizes)) == 1 else [size / sum(sizes) for size in sizes]

    def closure(copies: int = 1) -> torch.Tensor:
        losses = [loss_fn(batch) if copies == 1 else loss_fn(batch, copies) for batch in micro_batches]
        if weights is None:
            return sum(losses) / len(losses)
        return sum(weight * loss for weight, loss in zip(weights, losses))

    return closure
