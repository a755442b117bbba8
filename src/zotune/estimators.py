"""Two-point (SPSA) estimates of the projected gradient, and the two ways to evaluate θ ± εz.

``c = (L(θ+εz) − L(θ−εz)) / 2ε`` estimates the directional derivative along ``z``; ``c·z`` is the
zeroth-order gradient, kept as the pair ``(seed, c)``.

Two perturbation modes:

- **module** (exact; needs the model): a forward pre-hook on each module that owns trainable parameters
  swaps in a fresh copy ``θ_i ± εz_i`` for the duration of that module's forward, then swaps the stored
  tensor back. Stored parameters never change during the estimate, so a step with lr = 0 is
  bit-identical in every dtype. Peak extra memory: one module's parameters (a tied parameter, e.g. a
  shared embedding, stays perturbed until the closure returns). Cost: one generation per forward, so a
  closure that runs several micro-batches regenerates z for each of them.
- **inplace** (the MeZO paper's scheme; any parameters): θ += εz, forward, θ −= 2εz, forward, then the
  caller folds the restoring +εz into its update pass (3 generations per step whatever the number of
  micro-batches). Rounding makes θ+εz−2εz+εz differ from θ in the last bits, in fp32 too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .directions import DirectionEngine, Pair
from .errors import NonFiniteLossError, OptionError

Closure = Callable[[], "torch.Tensor | float"]


@dataclass
class Estimate:
    """One two-point estimate. ``restore`` lists pairs the caller must still apply (inplace mode)."""

    seed: int
    eps: float
    loss_plus: float
    loss_minus: float
    restore: list[Pair] = field(default_factory=list)

    @property
    def projected_gradient(self) -> float:
        return (self.loss_plus - self.loss_minus) / (2.0 * self.eps)


class TwoPointEstimator:
    """Evaluates a loss closure at θ+εz and θ−εz; with ``model`` in module mode, else in place."""

    def __init__(self, engine: DirectionEngine, eps: float, model: nn.Module | None = None) -> None:
        if not eps > 0:
            raise OptionError(f"eps must be positive, got {eps}: the paper default is 1e-3")
        self.engine = engine
        self.eps = eps
        # Data parallel: replaces this rank's (L+, L−) by the means over the ranks (zotune.distributed).
        self.reduce: Callable[[list[float]], list[float]] | None = None
        self.module_perturbation = ModulePerturbation(engine, model) if model is not None else None

    def estimate(self, closure: Closure, seed: int, step: int, fuse_restore: bool = False,
                 base: Sequence[Pair] = ()) -> Estimate:
        """Two loss evaluations along ``z(seed)``, around θ + Σ a·z(s) over the ``base`` pairs (default: θ).
        In inplace mode with ``fuse_restore`` the parameters are left at θ−εz and ``Estimate.restore`` holds
        the pair that brings them back; with a ``base`` they are moved there and back (rounding drift)."""
        if self.module_perturbation is not None:
            with self.module_perturbation([*base, (seed, self.eps)]):
                loss_plus = _evaluate(closure)
            with self.module_perturbation([*base, (seed, -self.eps)]):
                loss_minus = _evaluate(closure)
            estimate = Estimate(seed, self.eps, *self._reduced(loss_plus, loss_minus))
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
                loss_plus = _evaluate(closure)
                offset = -self.eps
                self.engine.apply([(seed, -2.0 * self.eps)])
                loss_minus = _evaluate(closure)
            except BaseException:  # the closure failed: do not leave the weights perturbed
                self.engine.apply([(seed, -offset)])
                raise
            estimate = Estimate(seed, self.eps, *self._reduced(loss_plus, loss_minus), restore=[(seed, self.eps)])
            if not fuse_restore or not _finite(estimate):
                self.engine.apply(estimate.restore)
                estimate.restore = []
        if not _finite(estimate):
            raise NonFiniteLossError(step, {"loss+": estimate.loss_plus, "loss-": estimate.loss_minus,
                                            "projected gradient": estimate.projected_gradient}, seed)
        return estimate

    def _reduced(self, loss_plus: float, loss_minus: float) -> list[float]:
        return [loss_plus, loss_minus] if self.reduce is None else self.reduce([loss_plus, loss_minus])


def _finite(estimate: Estimate) -> bool:
    """Finite losses can still give an infinite c when their difference overflows after division by 2ε."""
    return all(math.isfinite(x) for x in (estimate.loss_plus, estimate.loss_minus, estimate.projected_gradient))


def _evaluate(closure: Closure) -> float:
    with torch.inference_mode():
        return float(closure())


def mean_over_micro_batches(loss_fn: Callable[[object], torch.Tensor], micro_batches: Sequence) -> Closure:
    """Gradient accumulation for ZO: a closure returning the mean loss over ``micro_batches``.

    Every micro-batch is evaluated at the same perturbed point (one seed), so with equal-sized
    micro-batches and a mean-reduced loss the estimate equals the one on the whole batch.
    """
    if not micro_batches:
        raise OptionError("mean_over_micro_batches needs at least one micro-batch")

    def closure() -> torch.Tensor:
        return sum(loss_fn(batch) for batch in micro_batches) / len(micro_batches)

    return closure


class ModulePerturbation:
    """Context manager factory: ``with perturbation(pairs): ...`` runs forwards at θ + Σ a·z(s) over the pairs
    without writing to the stored parameters (see the module docstring). Also puts the model in eval mode
    for the duration, so dropout cannot make the two forwards disagree."""

    def __init__(self, engine: DirectionEngine, model: nn.Module) -> None:
        self.engine, self.model = engine, model
        index_of = {id(param): i for i, param in enumerate(engine.params)}
        self.owned: list[tuple[nn.Module, list[tuple[int, nn.Parameter]]]] = []
        owners: dict[int, int] = {}
        for module in model.modules():
            mine = [(index_of[id(p)], p) for p in module.parameters(recurse=False) if id(p) in index_of]
            if mine:
                self.owned.append((module, mine))
                for index, _ in mine:
                    owners[index] = owners.get(index, 0) + 1
        missing = [i for i in range(len(engine.params)) if i not in owners]
        if missing:
            raise OptionError(
                f"{len(missing)} optimized parameter(s) do not belong to the model given for exact "
                "perturbation: pass the model that owns every optimized parameter, or pass parameters "
                "only (in-place perturbation)."
            )
        self.shared = {index for index, count in owners.items() if count > 1}
        # Copies are recycled across modules and steps: layers repeat shapes, and a fresh large
        # allocation would page-fault its whole size on every forward.
        self._spare: dict[tuple, list[torch.Tensor]] = {}

    def _copy_buffer(self, param: torch.Tensor) -> torch.Tensor:
        spares = self._spare.get((param.numel(), param.dtype, param.device))
        if spares:
            return spares.pop().view(param.shape)
        with torch.inference_mode(False):  # a normal tensor, reusable outside inference mode
            return torch.empty(param.shape, dtype=param.dtype, device=param.device)

    def _recycle(self, buffer: torch.Tensor) -> None:
        self._spare.setdefault((buffer.numel(), buffer.dtype, buffer.device), []).append(buffer)

    @contextmanager
    def __call__(self, pairs: Sequence[Pair]):
        originals: dict[int, torch.Tensor] = {}

        def swap_in(params: Iterable[tuple[int, nn.Parameter]]):
            for index, param in params:
                if index not in originals:
                    originals[index] = param.data
                    param.data = self.engine.perturbed_copy(index, pairs, self._copy_buffer(param))

        def swap_back(params: Iterable[tuple[int, nn.Parameter]]):
            for index, param in params:
                if index in originals and index not in self.shared:
                    self._recycle(param.data)
                    param.data = originals.pop(index)

        handles = []
        for module, params in self.owned:
            handles.append(module.register_forward_pre_hook(lambda *_, p=params: swap_in(p)))
            handles.append(module.register_forward_hook(lambda *_, p=params: swap_back(p)))
        training = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for index, original in originals.items():
                self._recycle(self.engine.params[index].data)
                self.engine.params[index].data = original
            for module, mode in training.items():
                module.training = mode
