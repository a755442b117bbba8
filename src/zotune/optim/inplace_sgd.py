"""IP-SGD: SGD whose update is fused into backward, so no full gradient is ever held (as in LOMO)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import NonFiniteGradientError, NonFiniteLossError, OptionError
from .params import refuse_sharded, trainable_groups
from .protocol import Loss, TrainingStep

# Updated in place; weights of other dtypes (bf16, fp16) are updated in a float32 copy and rounded once.
FULL_PRECISION = (torch.float32, torch.float64)


class UpdatesInBackward(TrainingStep):
    """For optimizers whose updates run in post-accumulate-grad hooks (IP-SGD, Addax): owns the hooks, and
    watches the gradients they consume.

    A gradient can overflow in backward while the loss is finite (fp16). The hooks cannot wait for the
    whole backward before updating, that is the point of them, so each adds its gradient's sum to a
    running total on the gradient's device (no synchronisation per tensor); one check after backward
    then reports a NaN or inf that reached the weights, and the trainer stops without saving them.

    Gradient clipping (``clip_grad_norm``, LOMO's recipe): the global norm is known only after the whole
    backward, and the updates happen during it, so a first backward only measures. Its hooks add each
    gradient's squared norm (averaged over the ranks first, data parallel: the norm is the averaged
    gradient's) to a running total and free the gradient, updating nothing; the graph is kept, and the
    second backward updates with every gradient scaled by min(1, C / (‖g‖ + 1e-6)), the factor of
    ``torch.nn.utils.clip_grad_norm_`` and LOMO. Cost: one extra backward per step, and, data parallel,
    every gradient is all-reduced twice. LOMO's trainer runs the forward again for the updating backward;
    keeping the graph saves that forward and clips exactly the gradient measured (a second forward in
    training mode draws other dropout masks). The activations then stay through the measuring backward, but
    the peak, at the start of a backward, is the same. A non-finite gradient is caught by the measuring
    backward, before any weight has changed.
    """

    def _register_update_hooks(self, hooks, clip_grad_norm: float | None) -> None:
        """``hooks``: (parameter, hook) pairs; each hook runs when that parameter's gradient is complete and
        updates it, the gradient scaled by ``_gradient_scale``."""
        if clip_grad_norm is not None and (
            isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float)) or not clip_grad_norm > 0
        ):
            raise OptionError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        hooks = list(hooks)
        refuse_sharded(
            [param for param, _ in hooks],
            f"{type(self).__name__} updates each parameter inside backward, before FSDP2 has reduce-scattered its gradient",
        )
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.last_grad_norm: float | None = None  # the step's gradient norm before clipping, when clipping
        self._gradient_scale: float | None = None  # set during an updating backward inside step()
        self._measuring, self._squared_norm = False, None
        self._handles = [param.register_post_accumulate_grad_hook(self._measuring_or(hook)) for param, hook in hooks]
        self._gradient_total: torch.Tensor | None = None
        # Data parallel (zotune.distributed): averages losses over the ranks, and each gradient in place.
        self.reduce_losses: Callable[[list[float]], list[float]] = lambda values: values
        self.reduce_gradient: Callable[[torch.Tensor], None] | None = None

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        return "its update runs inside backward, before FSDP2 has reduce-scattered the gradient"

    def data_parallel(self, group) -> None:
        self.reduce_losses, self.reduce_gradient = group.mean, group.mean_gradient

    def _with_grad_norm(self, record: dict) -> dict:
        """The step's log fields, with the gradient's norm before clipping when the step clipped."""
        return record if self.last_grad_norm is None else {**record, "grad_norm": self.last_grad_norm}

    def _measuring_or(self, hook):
        """``hook``, or, during a measuring backward, :meth:`_measure` in its place."""

        def run(param: torch.Tensor) -> None:
            (self._measure if self._measuring else hook)(param)

        return run

    def _parameters(self) -> list[torch.Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def _refuse_held_gradients(self, fix: str) -> None:
        """Backward adds a gradient to the one in ``.grad``, so one left by an earlier backward would enter
        the update with this one: refused rather than cleared, since it may be someone's data."""
        held = sum(param.grad is not None for param in self._parameters())
        if held:
            raise OptionError(
                f"{type(self).__name__}: {held} parameter{' holds' if held == 1 else 's hold'} a gradient "
                f"already, which backward would add to the next update's: {fix}"
            )

    def _reduced_gradient(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter's complete gradient, averaged over the ranks when data parallel."""
        if self.reduce_gradient is not None:
            self.reduce_gradient(param.grad)
        return param.grad

    def _take_gradient(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter's complete gradient (averaged over the ranks when data parallel), watched."""
        grad = self._reduced_gradient(param)
        total = grad.sum(dtype=torch.float32)
        self._gradient_total = (
            total if self._gradient_total is None else self._gradient_total + total.to(self._gradient_total.device)
        )
        return grad

    @torch.no_grad()
    def _measure(self, param: torch.Tensor) -> None:
        """A measuring backward's hook: adds the gradient's squared norm (float32, float64 for float64) to the
        running total and frees the gradient."""
        grad = self._reduced_gradient(param)
        norm = torch.linalg.vector_norm(grad, dtype=grad.dtype if grad.dtype in FULL_PRECISION else torch.float32)
        square = norm * norm
        self._squared_norm = square if self._squared_norm is None else self._squared_norm + square.to(self._squared_norm.device)
        param.grad = None

    def _clip_scale(self, loss: torch.Tensor, step: int, seed: int | None) -> float:
        """The measuring backward (the graph kept); the factor that clips the gradient's norm to
        ``clip_grad_norm``. Raises if the gradient was not finite: nothing has been updated yet (and every rank
        raises, data parallel: each measures the same averaged gradient)."""
        self._squared_norm, self._measuring = None, True
        try:
            loss.backward(retain_graph=True)
        finally:
            self._measuring = False
        squared, self._squared_norm = self._squared_norm, None
        norm = 0.0 if squared is None else math.sqrt(squared.item())
        if not math.isfinite(norm):
            raise NonFiniteGradientError(step, seed, applied=False)
        self.last_grad_norm = norm
        return min(1.0, self.clip_grad_norm / (norm + 1e-6))

    def _checked_loss(self, loss: torch.Tensor, step: int, seed: int | None = None, name: str = "loss") -> float:
        """The loss's value (its mean over the ranks when data parallel); raises if it is not finite, so
        that every rank refuses the same step before backward."""
        value = self.reduce_losses([loss.detach().item()])[0]
        if not math.isfinite(value):
            raise NonFiniteLossError(step, {name: value}, seed)
        return value

    def _backward_and_check(self, loss: torch.Tensor, step: int, seed: int | None = None) -> None:
        """``loss.backward()`` (the hooks update the weights; with ``clip_grad_norm``, after a backward that
        measures the norm), then raise if a gradient was not finite."""
        scale = 1.0 if self.clip_grad_norm is None else self._clip_scale(loss, step, seed)
        self._gradient_total, self._gradient_scale = None, scale
        try:
            loss.backward()
        finally:
            self._gradient_scale = None
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
    complete, from a post-accumulate-grad hook that then frees the gradient: LOMO's fused update
    (OpenLMLab/LOMO). bf16/fp16 weights are updated as LOMO does, in a float32 copy rounded once (in their own
    dtype the decay and the gradient step would each round).

    Peak memory: parameters + activations + the largest single gradient (SGD holds all gradients), plus,
    for bf16/fp16 weights, a float32 copy of the tensor being updated.
    ``step(closure)``: the closure returns the loss without calling backward; ``step`` checks that the
    loss is finite, then runs backward, which performs the update, then checks that the gradients were
    finite (:class:`NonFiniteGradientError` otherwise: the weights are already changed). Calling
    ``loss.backward()`` yourself updates the parameters too (``step()`` without a closure then does nothing). Gradient accumulation is
    impossible by construction: each backward is a step.

    ``clip_grad_norm``: clip the global gradient norm to this value (LOMO's recipe: 1.0) with a measuring
    backward first (:class:`UpdatesInBackward`): one extra backward per step, the closure still called once;
    ``last_grad_norm`` holds the norm before clipping. Only ``step`` can clip: a backward of your own is then
    refused. Gradients already in ``.grad`` when the optimizer is created or a step starts are refused, not
    cleared: backward would add them to the update's gradient.

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): a model (its trainable parameters, no decay on
            biases and norms) or parameters.
        lr: the learning rate, >= 0.
        weight_decay: wd in θ·(1 − lr·wd), applied before the gradient step; 0: none.
        clip_grad_norm: the global gradient norm to clip to, > 0 (see above; LOMO's recipe: 1.0); None (the
            default): no clipping.
    """

    def __init__(self, params_or_model, lr: float = 1e-3, weight_decay: float = 0.0, clip_grad_norm: float | None = None) -> None:
        if lr < 0:
            raise OptionError(f"lr must be >= 0, got {lr}")
        _, groups = trainable_groups(params_or_model, weight_decay)
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self._steps = 0
        # Before the hooks exist: a refused optimizer must leave none behind on the parameters.
        self._refuse_held_gradients("call model.zero_grad() before creating InPlaceSGD")
        self._register_update_hooks(
            ((param, self._updater(group)) for group in self.param_groups for param in group["params"]), clip_grad_norm
        )

    def _updater(self, group: dict):
        @torch.no_grad()
        def update(param: torch.Tensor) -> None:
            scale = self._gradient_scale
            if scale is None:  # a backward of the caller's own, outside step()
                if self.clip_grad_norm is not None:
                    param.grad = None
                    raise OptionError(
                        "InPlaceSGD with clip_grad_norm updates only in step(), which measures the "
                        "gradient's norm first: call optimizer.step(lambda: loss) instead of loss.backward()"
                    )
                scale = 1.0
            lr, weight_decay = group["lr"], group["weight_decay"]
            grad = self._take_gradient(param)
            work = param if param.dtype in FULL_PRECISION else param.float()
            if weight_decay:
                work.mul_(1.0 - lr * weight_decay)
            work.add_(grad, alpha=-lr * scale)
            if work is not param:
                param.copy_(work)
            param.grad = None

        return update

    def step(self, closure=None):  # type: ignore[override]
        """One step: ``closure()`` returns the loss (a tensor with its graph, backward not called), and the
        backward run here updates each parameter as its gradient completes. Returns the loss's value (averaged
        over the ranks, data parallel); without a closure, does nothing and returns None.

        Raises:
            OptionError: when a parameter already holds a gradient.
            NonFiniteLossError: for a non-finite loss, before backward.
            NonFiniteGradientError: for a non-finite gradient, which has already reached the weights unless
                ``clip_grad_norm``'s measuring backward caught it.
        """
        if closure is None:
            return None
        self._refuse_held_gradients("call optimizer.zero_grad() before step()")
        with torch.enable_grad():
            loss = closure()
            value = self._checked_loss(loss, self._steps)
            self._backward_and_check(loss, self._steps)
        self._steps += 1
        return value

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        batch = batches["batch"]
        record = dict(loss=self.step(lambda: loss(batch)), forward_passes=1)
        return self._with_grad_norm(record)
