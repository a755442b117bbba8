"""Forward gradient: the directional derivative along z by forward-mode differentiation, in place of a
two-point difference (Baydin et al., 2022, "Gradients without Backpropagation"; the ZO benchmark's
Forward-Grad)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..directions import GAUSSIAN
from ..errors import NonFiniteLossError, OptionError
from ..estimators import eval_mode
from .protocol import Loss
from .zeroth_order import ZerothOrder


class _Call(nn.Module):
    """The loss closure as a module over the model, so that ``functional_call`` can give the model other
    parameter values (dual tensors) for one call of the closure."""

    def __init__(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.closure = model, closure

    def forward(self) -> torch.Tensor:
        return self.closure()


class ForwardGrad(ZerothOrder):
    """θ ← θ·(1 − lr·wd) − (lr/n)·Σ_j d_j·z(s_j), where d_j = ∇L(θ)·z(s_j) is computed exactly by one
    forward-mode pass (``torch.func.jvp``) with tangent z(s_j): the estimate ĝ = d·z is unbiased like a
    two-point estimate, without its O(ε²) error, and kept as (seed, d) pairs like every zeroth-order gradient.

    Costs: a forward-mode pass computes each activation and its tangent (about twice a forward's arithmetic
    and activations), and the tangent z is materialised for every trainable parameter (one more copy of the
    trainable weights, as in the benchmark). No backward, no stored gradient.

    Layers: every torch operation the model runs needs a forward-mode derivative. The fused CPU/GPU kernels of
    ``scaled_dot_product_attention`` have none, so the pass runs SDPA on its math kernel (eager attention's
    arithmetic); FlashAttention-2 models (``attn_implementation="flash_attention_2"``) and custom CUDA
    kernels cannot run it and are refused with the operation named. The loss must be differentiable.

    Args:
        params_or_model (nn.Module): the model (needed: the pass gives the model dual parameters for one call).
        lr: the learning rate (>= 0).
        weight_decay: wd in MeZO's θ·(1 − lr·wd) (>= 0).
        n_directions: forward-mode passes per step, a positive integer.
        distribution: ``"gaussian"`` or ``"rademacher"``, as for :class:`MeZO`.
        seed: the base of the seed stream, as for :class:`MeZO`.
        num_threads: the threads for CPU parameters, as for :class:`MeZO` (None: ``torch.get_num_threads()``).
        sparsity: the share of z's entries zeroed (the tangent's and the update's), as for :class:`MeZO`.
        sparse_shares: ``"layer"``, ``"global"`` or ``"magnitude"``, as for :class:`MeZO`.
        mask_every: the steps between new masks, as for :class:`MeZO`.
    """

    needs_differentiable_loss = True

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        return "its forward-mode pass needs the whole model's parameters as dual tensors"

    def __init__(
        self,
        params_or_model,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        n_directions: int = 1,
        distribution: str = GAUSSIAN,
        seed: int = 0,
        num_threads: int | None = None,
        sparsity: float = 0.0,
        sparse_shares: str = "layer",
        mask_every: int = 1,
    ) -> None:
        if not isinstance(params_or_model, nn.Module):
            raise OptionError("forward-grad runs the model on dual parameters: pass the model, not its parameters")
        if not (isinstance(n_directions, int) and n_directions >= 1):
            raise OptionError(f"n_directions must be a positive integer, got {n_directions!r}")
        super().__init__(
            params_or_model, lr=lr, weight_decay=weight_decay, distribution=distribution, seed=seed, num_threads=num_threads
        )
        self.model, self.n_directions = params_or_model, n_directions
        self.sparse_directions(sparsity, sparse_shares, mask_every)
        names = {id(p): name for name, p in params_or_model.named_parameters()}
        self.names = [f"model.{names[id(p)]}" for p in self.param_list]
        self.last_derivatives: list[tuple[int, float]] = []
        self.last_loss = math.nan

    def step(self, closure: Callable[[], torch.Tensor]) -> float:  # type: ignore[override]
        """One step: for each of the n directions z(s_j), the loss of ``closure`` (the differentiable loss on
        the batch, run in eval mode) and its derivative d_j along z(s_j) by one forward-mode pass, then the
        update. Returns the mean loss; ``last_derivatives`` holds the (seed, d_j) pairs.

        Raises:
            TypeError: without a closure.
            NonFiniteLossError: for a non-finite loss or derivative, before any update.
            OptionError: when the model runs an operation without a forward-mode derivative.
        """
        if closure is None:
            raise TypeError("ForwardGrad.step needs a closure that returns the (differentiable) loss")
        step = self.state["zo"]["step"]
        self.renew_mask(step)
        call, derivatives, losses = _Call(self.model, closure), [], []
        for j in range(self.n_directions):
            seed = self.step_seed(j)
            loss, derivative = self._jvp(call, seed)
            if self.estimator.reduce is not None:
                loss, derivative = self.estimator.reduce([loss, derivative])
            if not (math.isfinite(loss) and math.isfinite(derivative)):
                raise NonFiniteLossError(step, {"loss": loss, "directional derivative": derivative}, seed)
            derivatives.append((seed, derivative))
            losses.append(loss)
        self.advance()
        n = self.n_directions
        self.apply_by_group(lambda group: [(seed, -group["lr"] * d / n) for seed, d in derivatives])
        self.last_derivatives, self.last_loss = derivatives, sum(losses) / n
        return self.last_loss

    def _jvp(self, call: _Call, seed: int) -> tuple[float, float]:
        primals = tuple(p.detach() for p in self.param_list)
        tangents = tuple(self.engine.direction(i, seed).to(p.dtype) for i, p in enumerate(primals))

        def loss_of(*values):
            return torch.func.functional_call(call, dict(zip(self.names, values)), ())

        try:
            # No dropout: a random mask would make d the derivative of another function at each step.
            with eval_mode(self.model), sdpa_kernel([SDPBackend.MATH]):
                loss, derivative = torch.func.jvp(loss_of, primals, tangents)
        except NotImplementedError as error:
            operation = str(error).split(" that ")[0].removeprefix("Trying to use forward AD with ")
            raise OptionError(
                f"forward-grad: the model runs {operation}, which has no forward-mode derivative in "
                "torch; load the model with attn_implementation=eager or sdpa, or use mezo"
            ) from None
        return float(loss), float(derivative)

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        batch = batches["batch"]
        value = self.step(lambda: loss(batch))
        seed, derivative = self.last_derivatives[0]
        return dict(loss=value, projected_grad=derivative, seed=seed, forward_passes=self.n_directions)
