"""MeZO: zeroth-order SGD with the seed trick (Malladi et al., 2023)."""

from __future__ import annotations

import torch

from ..directions import GAUSSIAN, Pair
from ..errors import OptionError
from ..estimators import Closure
from .protocol import Loss
from .zeroth_order import ZerothOrder


class MeZO(ZerothOrder):
    """Zeroth-order SGD in the memory of inference.

    Each step draws seeds ``s_1..s_n`` from the optimizer's seed stream and, for each, evaluates the loss
    at θ+εz and θ−εz (``z = z(s_j)``, regenerated, never stored) to get ``c_j = (L+ − L−)/2ε``. Then, for
    every parameter tensor in one pass:

        θ ← θ·(1 − lr·wd) − (lr/n)·Σ_j c_j·z(s_j)

    ``step(closure)``: the closure returns the loss on the current batch **without** calling backward;
    it is called 2n times per step under ``torch.inference_mode``. ``step`` returns the mean of the 2n
    losses. For gradient accumulation return the
    mean over micro-batches from the closure (:func:`zotune.estimators.mean_over_micro_batches`): all of
    them see the same z.

    Pass the **model** to get exact module-wise perturbation (lr = 0 leaves parameters bit-identical in
    fp32, bf16 and fp16; the model is put in eval mode during the forwards) and MeZO's weight-decay
    rule (none on biases and norms). Pass **parameters** to get the paper's in-place perturbation, where
    the restore of the last perturbation is fused into the update: 3 generation sweeps per step.
    ``perturbation="inplace"`` with the model is the paper's scheme with the model's modules at hand: they
    run the forwards in eval mode (given parameters only, dropout is switched off by
    :class:`zotune.no_dropout.NoDropout` instead).

    ``dual_forward=True`` (with the model) evaluates θ+εz and θ−εz in one forward over the batch stacked
    twice: each module generates its part of z once for both, so a step costs one forward of the doubled
    batch, one generation inside it and the update's sweep, at the price of a doubled batch's activations.
    The closure must then take ``copies``: ``closure(2)`` evaluates its batch stacked twice along dim 0 (all
    of the first copy, then all of the second) and returns the two copies' mean losses (e.g.
    ``lambda copies=1: classification_loss(model, examples, pad_id, copies)``). The losses, and so the
    steps, are those of separate forwards, up to the rounding of the batched operations.

    Communication (data parallel): ranks share the seed stream; only the n pairs of losses need an
    all-reduce. The step's estimates are kept in ``last_estimates`` for logging.

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): the model (module perturbation by default,
            MeZO's weight-decay rule) or its parameters or parameter groups (in-place perturbation; every parameter
            decayed unless its group says otherwise).
        lr: the learning rate, >= 0; the paper's full fine-tuning uses 1e-6 or 1e-7.
        eps: ε, the perturbation's scale, > 0; 1e-3 is the paper's.
        weight_decay: wd in θ·(1 − lr·wd), >= 0; 0: none.
        n_directions: n, the directions per step (n-SPSA), a positive integer; 1 is the paper's SPSA.
        distribution: ``"gaussian"`` (z ~ N(0, I), the paper's) or ``"rademacher"`` (entries ±1).
        seed: the base of the seed stream: each step's seeds are derived from it, the step and j; kept in
            ``state_dict()`` so a resumed run draws the same directions, and shared by data-parallel ranks.
        num_threads: the threads that generate directions and apply updates on CPU parameters (None:
            ``torch.get_num_threads()``); work on a GPU stays on the calling thread.
        dual_forward: evaluate θ+εz and θ−εz in one forward of the batch stacked twice (see above); needs the
            model and module perturbation.
        perturbation: ``"module"`` (each module runs on perturbed copies of its parameters; needs the model, and
            refuses FSDP2 shards) or ``"inplace"`` (the parameters moved to θ±εz and back, the paper's scheme);
            None: module given the model, inplace given parameters.
        difference: ``"central"`` (the paper's two-sided difference) or ``"forward"``: c_j = (L(θ+εz_j) − L(θ))/ε,
            one forward at θ shared by the step's n directions (n + 1 forwards a step).
        sparsity: the share of z's entries zeroed, in [0, 1) (:mod:`zotune.sparse_masks`); 0: dense directions.
        sparse_shares: ``"layer"`` (``sparsity`` in every parameter) or ``"global"`` (the benchmark's: each
            parameter's share of weights at or below the ``sparsity`` quantile of all weights' magnitudes), both
            seeded masks; or ``"magnitude"`` (Sparse MeZO's): in every parameter, z zeroed on its ``sparsity``
            share of entries of largest magnitude, read off the weights at every step.
        mask_every: the steps between new masks, a positive integer (1: a new mask every step); for
            ``"magnitude"``, between new limits on the magnitudes.
        blocks: None (the whole model perturbed at once) or block-wise perturbation (:mod:`zotune.blocks`):
            ``"layer"``, ``"attention-mlp"`` or ``"module"``: each block perturbed alone along its part of z(s_j),
            its own c_{j,b} from 2 forwards (one-sided: 1, plus the shared loss at θ), and its parameters updated
            with it: θ_b ← θ_b − (lr/n)·Σ_j c_{j,b}·z_b(s_j). Needs module perturbation, without dual_forward.
    """

    variants = {"dual": {"dual_forward": True}, "inplace": {"perturbation": "inplace"}}

    def __init__(
        self,
        params_or_model,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        n_directions: int = 1,
        distribution: str = GAUSSIAN,
        seed: int = 0,
        num_threads: int | None = None,
        dual_forward: bool = False,
        perturbation: str | None = None,
        difference: str = "central",
        sparsity: float = 0.0,
        sparse_shares: str = "layer",
        mask_every: int = 1,
        blocks: str | None = None,
    ) -> None:
        if not (isinstance(n_directions, int) and n_directions >= 1):
            raise OptionError(f"n_directions must be a positive integer, got {n_directions!r}")
        super().__init__(
            params_or_model,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            distribution=distribution,
            seed=seed,
            num_threads=num_threads,
            dual_forward=dual_forward,
            perturbation=perturbation,
            difference=difference,
        )
        self.n_directions = n_directions
        self.sparse_directions(sparsity, sparse_shares, mask_every)
        self.block_wise(params_or_model, blocks)

    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        """One MeZO step (see the class docstring): the n estimates from ``closure`` (the loss on the batch,
        without backward; taking ``copies`` with ``dual_forward``), then the update. Returns the mean of the
        estimates' losses (θ ± εz; one-sided, θ + εz and θ); ``last_estimates`` holds the estimates.

        Raises:
            TypeError: without a closure.
            NonFiniteLossError: for a non-finite loss; the parameters are left as they were.
        """
        if closure is None:
            raise TypeError("MeZO.step needs a closure that returns the loss (without calling backward)")
        estimates = self.estimates(closure)
        self.advance()
        self._update(estimates)
        self.last_estimates = estimates
        return sum(e.loss_plus + e.loss_minus for e in estimates) / (2 * len(estimates))

    def estimates(self, closure: Closure, loss_here: float | None = None) -> list:
        """This step's n estimates at θ (one-sided: the loss at θ, ``loss_here`` if given, evaluated once for
        all n); the last one's in-place restore is left pending, for the update to fold in."""
        step, estimates = self.state["zo"]["step"], []
        self.renew_mask(step)
        for j in range(self.n_directions):
            for only in self.blocks or [None]:
                estimates.append(
                    self.estimator.estimate(
                        closure, self.step_seed(j), step, only=only, fuse_restore=j == self.n_directions - 1, loss_here=loss_here
                    )
                )
                if self.estimator.one_sided:
                    loss_here = estimates[0].loss_minus
        return estimates

    def gradient_pairs(self, estimates, index: int | None = None) -> list[Pair]:
        """The step's zeroth-order gradient ĝ = (1/n)·Σ_j c_j·z(s_j) as (seed, coefficient) pairs; block-wise,
        those of parameter ``index``'s block."""
        return [(e.seed, e.projected_gradient / self.n_directions) for e in estimates if e.indices is None or index in e.indices]

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        batch = batches["batch"]
        value = self.step(lambda copies=1: loss(batch, copies))
        first = self.last_estimates[0]
        return dict(
            loss=value,
            loss_plus=first.loss_plus,
            loss_minus=first.loss_minus,
            projected_grad=first.projected_gradient,
            seed=first.seed,
            forward_passes=self.forwards(),
        )

    def forwards(self) -> int:
        """The forwards the last step ran."""
        return sum(e.forwards for e in self.last_estimates)

    def update_pairs(self, estimates, group: dict) -> list[Pair]:
        """The update rule: the (seed, a) pairs of θ ← θ·(1 − lr·wd) + Σ a·z(seed) for one parameter group,
        from the step's estimates. MeZO's: a_j = −(lr/n)·c_j. A zeroth-order optimizer whose update is a sum of
        directions overrides this alone (see tests/test_new_optimizer.py)."""
        return [(e.seed, -group["lr"] * e.projected_gradient / self.n_directions) for e in estimates]

    def _update(self, estimates) -> None:
        """:meth:`update_pairs` applied per group (and per block, block-wise), weight decay and the pending in-place
        restore folded in."""
        parts: dict[frozenset[int] | None, list] = {}
        for estimate in estimates:
            parts.setdefault(estimate.indices, []).append(estimate)
        for only, part in parts.items():
            self.apply_by_group(lambda group, part=part: self.update_pairs(part, group), restore=estimates[-1].restore, only=only)
