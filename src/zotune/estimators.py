"""Two-point (SPSA) estimates of the projected gradient, and the ways to evaluate θ ± εz.

``c = (L(θ+εz) − L(θ−εz)) / 2ε`` estimates the directional derivative along ``z``; ``c·z`` is the
zeroth-order gradient, kept as the pair ``(seed, c)``.

Perturbation modes:

- **module** (exact; needs the model): each module that owns trainable parameters runs its forward on a
  fresh copy ``θ_i ± εz_i``, swapped in for the duration of that forward only. Stored parameters never
  change during the estimate, so a step with lr = 0 is bit-identical in every dtype. Peak extra memory: one
  module's parameters (a tied parameter, e.g. a shared embedding, stays perturbed until the closure
  returns). Cost: one generation per forward, so a closure that runs several micro-batches regenerates z
  for each of them. A plain embedding on the CPU perturbs only the rows it looks up.
- **dual** (module mode with ``dual_forward``): one forward over the batch stacked twice; each module runs
  its first half on θ_i + εz_i and its second on θ_i − εz_i, both copies built from one generation
  (a linear layer runs both halves as one batched matmul). Exact like module mode, with one generation
  per estimate instead of two, for the activations of a doubled batch and two copies of the largest
  module. The closure takes ``copies`` (see :class:`zotune.optim.MeZO`).
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
from torch.nn import functional as F

from .directions import DirectionEngine, Pair
from .errors import NonFiniteLossError, OptionError
from .no_dropout import NoDropout

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
    """Evaluates a loss closure at θ+εz and θ−εz; with ``model`` in module mode, else in place. Either way
    the closure runs without dropout (see the module docstring)."""

    def __init__(self, engine: DirectionEngine, eps: float, model: nn.Module | None = None,
                 dual_forward: bool = False) -> None:
        if not eps > 0:
            raise OptionError(f"eps must be positive, got {eps}: the paper default is 1e-3")
        if dual_forward and model is None:
            raise OptionError("dual_forward=True evaluates θ+εz and θ−εz inside the model's modules: pass the "
                              "model, not its parameters")
        self.engine = engine
        self.eps = eps
        self.dual_forward = dual_forward
        # Data parallel: replaces this rank's (L+, L−) by the means over the ranks (zotune.distributed).
        self.reduce: Callable[[list[float]], list[float]] | None = None
        self.model = model
        self.module_perturbation = ModulePerturbation(engine, model) if model is not None else None

    def estimate(self, closure: Closure, seed: int, step: int, fuse_restore: bool = False,
                 base: Sequence[Pair] = ()) -> Estimate:
        """Two loss evaluations along ``z(seed)``, around θ + Σ a·z(s) over the ``base`` pairs (default: θ).
        In inplace mode with ``fuse_restore`` the parameters are left at θ−εz and ``Estimate.restore`` holds
        the pair that brings them back; with a ``base`` they are moved there and back (rounding drift)."""
        if self.dual_forward and not base:
            with self.module_perturbation.dual(seed, self.eps):
                loss_plus, loss_minus = self._evaluate_copies(closure)
            estimate = Estimate(seed, self.eps, *self._reduced(loss_plus, loss_minus))
        elif self.module_perturbation is not None:
            with self.module_perturbation([*base, (seed, self.eps)]):
                loss_plus = self._evaluate(closure)
            with self.module_perturbation([*base, (seed, -self.eps)]):
                loss_minus = self._evaluate(closure)
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
        if not _finite(estimate):
            raise NonFiniteLossError(step, {"loss+": estimate.loss_plus, "loss-": estimate.loss_minus,
                                            "projected gradient": estimate.projected_gradient}, seed)
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
        training = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            for module, mode in training.items():
                module.training = mode

    def _evaluate(self, closure: Closure) -> float:
        with self._forwards():
            return float(closure())

    def _evaluate_copies(self, closure: Closure) -> tuple[float, float]:
        """The two losses of a closure called with ``copies=2`` (the dual forward's protocol)."""
        try:
            inspect.signature(closure).bind(2)
        except (TypeError, ValueError):
            raise OptionError("dual_forward=True needs a closure that takes copies: closure(2) must evaluate its "
                              "batch stacked twice along dim 0 and return the two copies' mean losses (see "
                              "zotune.estimators.mean_over_micro_batches and zotune.scoring.classification_loss)"
                              ) from None
        with self._forwards():
            losses = torch.as_tensor(closure(2)).detach().flatten().tolist()
        if len(losses) != 2:
            raise OptionError(f"dual_forward=True: closure(2) returned {len(losses)} value(s); it must return the "
                              "mean loss of each of the two copies of the batch")
        return losses[0], losses[1]


def _finite(estimate: Estimate) -> bool:
    """Finite losses can still give an infinite c when their difference overflows after division by 2ε."""
    return all(math.isfinite(x) for x in (estimate.loss_plus, estimate.loss_minus, estimate.projected_gradient))


def mean_over_micro_batches(loss_fn: Callable[[object], torch.Tensor], micro_batches: Sequence) -> Closure:
    """Gradient accumulation for ZO: a closure returning the mean loss over ``micro_batches``.

    Every micro-batch is evaluated at the same perturbed point (one seed), so with equal-sized
    micro-batches and a mean-reduced loss the estimate equals the one on the whole batch.
    """
    if not micro_batches:
        raise OptionError("mean_over_micro_batches needs at least one micro-batch")

    def closure(copies: int = 1) -> torch.Tensor:
        if copies == 1:
            return sum(loss_fn(batch) for batch in micro_batches) / len(micro_batches)
        return sum(loss_fn(batch, copies) for batch in micro_batches) / len(micro_batches)

    return closure


class ModulePerturbation:
    """Runs forwards at perturbed parameters without writing to the stored ones (see the module docstring):

    - ``with perturbation(pairs): ...``: forwards at θ + Σ a·z(s) over the pairs;
    - ``with perturbation.dual(seed, eps): ...``: a forward over a batch stacked twice along dim 0 evaluates
      the first copy at θ + εz(seed) and the second at θ − εz(seed). Every module that owns optimized
      parameters splits its inputs in halves and runs once per half, each time on a copy of its parameters,
      and z is generated once per module for both copies.

    For the duration, the forward of every module that owns optimized parameters is replaced (the estimator
    runs these forwards in eval mode). A plain ``nn.Embedding``
    on the CPU perturbs only the rows its input looks up: the rest of a vocabulary-sized table is never
    generated.
    """

    def __init__(self, engine: DirectionEngine, model: nn.Module) -> None:
        self.engine = engine
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
        self._index_of = index_of  # id(parameter) -> its index in the engine
        # Copies are recycled across modules and steps: layers repeat shapes, and a fresh large
        # allocation would page-fault its whole size on every forward.
        self._spare: dict[tuple, list[torch.Tensor]] = {}
        # +1 or -1 while a dual forward runs one of its halves: owners nested inside see one copy only.
        self._sign = 0

    def _copy_buffer(self, param: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """A recycled tensor for ``copies`` copies of ``param`` (shaped like it, or stacked along a new dim 0)."""
        shape = param.shape if copies == 1 else (copies, *param.shape)
        spares = self._spare.get((param.numel() * copies, param.dtype, param.device))
        if spares:
            return spares.pop().view(shape)
        with torch.inference_mode(False):  # a normal tensor, reusable outside inference mode
            return torch.empty(shape, dtype=param.dtype, device=param.device)

    def _recycle(self, buffer: torch.Tensor) -> None:
        self._spare.setdefault((buffer.numel(), buffer.dtype, buffer.device), []).append(buffer)

    def _lookup(self, param_index: int, pairs: Sequence[Pair], input: torch.Tensor) -> torch.Tensor:
        """An embedding lookup at θ + Σ a·z(s), perturbing only the rows looked up."""
        rows, inverse = torch.unique(input, return_inverse=True)
        return F.embedding(inverse, self.engine.perturbed_rows(param_index, pairs, rows))

    @staticmethod
    @contextmanager
    def _swapped(params, copies: dict[int, torch.Tensor]):
        """The parameters' tensors replaced by ``copies`` (by parameter index) for the duration."""
        originals = [(param, param.data) for _, param in params]
        try:
            for index, param in params:
                param.data = copies[index]
            yield
        finally:
            for param, original in originals:
                param.data = original

    def _forward_at(self, params, forward, pairs: Sequence[Pair], args, kwargs):
        """One forward of a module on perturbed copies of its parameters."""
        copies = {}
        try:
            for index, param in params:
                copies[index] = self.engine.perturbed_copy(index, pairs, self._copy_buffer(param))
            with self._swapped(params, copies):
                return forward(*args, **kwargs)
        finally:
            for copy in copies.values():
                self._recycle(copy)

    @contextmanager
    def __call__(self, pairs: Sequence[Pair]):
        originals: dict[int, torch.Tensor] = {}  # shared parameters stay perturbed until the context exits

        def replacement(module, params, forward):
            if _looks_up_rows(module, params):
                (index, table), = params

                def lookup(input):
                    if index in originals:  # a shared table, already swapped for its copy by another module
                        return F.embedding(input, table)
                    return self._lookup(index, pairs, input)

                return lookup

            def perturbed_forward(*args, **kwargs):
                for index, param in params:
                    if index not in originals:
                        originals[index] = param.data
                        param.data = self.engine.perturbed_copy(index, pairs, self._copy_buffer(param))
                try:
                    return forward(*args, **kwargs)
                finally:
                    for index, param in params:
                        if index in originals and index not in self.shared:
                            self._recycle(param.data)
                            param.data = originals.pop(index)

            return perturbed_forward

        try:
            with self._replaced_forwards(replacement):
                yield
        finally:
            for index, original in originals.items():
                self._recycle(self.engine.params[index].data)
                self.engine.params[index].data = original

    @contextmanager
    def dual(self, seed: int, eps: float):
        def replacement(module, params, forward):
            rows_only = _looks_up_rows(module, params)

            def dual_forward(*args, **kwargs):
                if self._sign:
                    pairs = [(seed, self._sign * eps)]
                    if rows_only:
                        return self._lookup(params[0][0], pairs, *args, **kwargs)
                    return self._forward_at(params, forward, pairs, args, kwargs)
                if type(module) is nn.Linear:
                    return self._dual_linear(module, params, seed, eps, *args, **kwargs)
                halves = _halves(module, args, kwargs)
                if rows_only:
                    return torch.cat([self._lookup(params[0][0], [(seed, sign * eps)], *half_args, **half_kwargs)
                                      for sign, (half_args, half_kwargs) in zip((1, -1), halves)])
                with self._pair_copies(params, seed, eps) as stacked:
                    outputs = []
                    try:
                        for side, (sign, (half_args, half_kwargs)) in enumerate(zip((1, -1), halves)):
                            self._sign = sign
                            with self._swapped(params, {index: pair[side] for index, pair in stacked.items()}):
                                outputs.append(forward(*half_args, **half_kwargs))
                    finally:
                        self._sign = 0
                    return _joined(module, *outputs)

            return dual_forward

        with self._replaced_forwards(replacement):
            yield

    def _dual_linear(self, module: nn.Linear, params, seed: int, eps: float, input: torch.Tensor) -> torch.Tensor:
        """A linear layer's dual forward as one batched matmul of the two halves by the two weight copies, stacked
        in one buffer: no cut of the input, no join of the outputs."""
        _batch_rows(module, (input,), {})  # the checks; the halves are views of the reshape below
        with self._pair_copies(params, seed, eps) as stacked:
            weight = stacked.get(self._index_of.get(id(module.weight)), module.weight.expand(2, -1, -1))
            rows = input.reshape(2, -1, module.in_features)
            if module.bias is None:
                output = torch.bmm(rows, weight.transpose(1, 2))
            else:
                bias = stacked.get(self._index_of.get(id(module.bias)), module.bias.expand(2, -1))
                output = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
            return output.view(*input.shape[:-1], module.out_features)

    @contextmanager
    def _pair_copies(self, params, seed: int, eps: float):
        """For each parameter (by index), its copies θ + εz and θ − εz stacked along a new dim 0 in one recycled
        buffer, z generated once for both."""
        stacked = {}
        try:
            for index, param in params:
                stacked[index] = self._copy_buffer(param, 2)
                self.engine.perturbed_pair(index, seed, eps, stacked[index][0], stacked[index][1])
            yield stacked
        finally:
            for buffer in stacked.values():
                self._recycle(buffer)

    @contextmanager
    def _replaced_forwards(self, replacement):
        """Every owning module's forward ← ``replacement(module, its parameters, its forward)``."""
        replaced = []
        for module, params in self.owned:
            replaced.append((module, module.__dict__.get("forward")))
            module.forward = replacement(module, params, module.forward)
        try:
            yield
        finally:
            for module, own_forward in replaced:
                if own_forward is None:
                    del module.forward
                else:
                    module.forward = own_forward


def _looks_up_rows(module: nn.Module, params) -> bool:
    """A plain embedding table on the CPU, where drawing z for single rows costs less than for the whole table
    (on a GPU, a kernel launch per row would cost more)."""
    return (type(module) is nn.Embedding and module.max_norm is None and len(params) == 1
            and params[0][1].device.type == "cpu")


def _batch_rows(module: nn.Module, args, kwargs) -> int:
    """The length along dim 0 of a dual forward's first tensor input, which must be even."""
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor) and value.dim()]
    if not tensors:
        raise OptionError(f"dual_forward: {type(module).__name__} owns optimized parameters but got no tensor input "
                          "to cut in two: use dual_forward=False for this model")
    rows = tensors[0].shape[0]
    if rows % 2:
        raise OptionError(f"dual_forward: {type(module).__name__} got an input of {rows} rows, an odd number: the "
                          "closure must stack two copies of its batch along dim 0 when called with copies=2")
    return rows


def _halves(module: nn.Module, args, kwargs):
    """The inputs of a dual forward cut in two along dim 0: every tensor as long as the first tensor input
    along dim 0 is cut, the rest goes to both halves."""
    rows = _batch_rows(module, args, kwargs)

    def cut(value, part):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            return value[:rows // 2] if part == 0 else value[rows // 2:]
        return value

    return [(tuple(cut(a, part) for a in args), {k: cut(v, part) for k, v in kwargs.items()}) for part in (0, 1)]


def _joined(module: nn.Module, first, second):
    """The two halves' outputs put back together along dim 0, through tuples, lists and dicts."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(_joined(module, a, b) for a, b in zip(first, second))
    if isinstance(first, dict):
        joined = {key: _joined(module, first[key], second[key]) for key in first}
        return type(first)(**joined) if type(first) is not dict else joined
    raise OptionError(f"dual_forward: {type(module).__name__} returned a {type(first).__name__}, which zotune cannot "
                      "join along the batch: use dual_forward=False for this model")
