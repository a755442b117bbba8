"""Addax: a zeroth-order estimate on long sequences mixed into in-place SGD on short ones (Li et al., 2025)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..directions import GAUSSIAN
from ..errors import OptionError
from ..estimators import Closure
from ..lengths import ADDAX_DATA_OPTIONS, agreed_plan, check_addax_options, plan_addax
from ..sampling import AddaxBatches
from .inplace_sgd import FULL_PRECISION, UpdatesInBackward
from .zeroth_order import ZerothOrder
from .protocol import Loss

MIXINGS = ("convex", "additive")


class Addax(UpdatesInBackward, ZerothOrder):
    """One Addax step on a zeroth-order batch B0 and a first-order batch B1:

        c  = (L_B0(θ+εz) − L_B0(θ−εz)) / 2ε          two forwards, θ restored, z = z(seed) never stored
        θ_i ← θ_i·(1 − lr·wd) − lr·(w1·∇_i L_B1(θ) + w0·c·z_i)   for each tensor i, inside backward on B1

    The second line runs in a post-accumulate-grad hook the moment ∇_i is complete, regenerating z_i from
    the seed, and frees ∇_i at once: like IP-SGD, no full gradient is ever held. Peak memory is the larger of
    an inference forward on B0 and an IP-SGD step on B1, which is why B0 gets the long sequences. For
    bf16/fp16 weights the whole line is computed in float32 and rounded once, block by block, through the
    direction engine's ``transform`` (on a GPU, z is then drawn into a float32 buffer rather than inside the
    fused Triton update, which has no gradient to add). Float32 and float64 weights are updated in place: the
    decayed ZO part by the engine, then the gradient added.

    ``clip_grad_norm``: ∇L_B1 is clipped to this global norm (c·z is not: it has about √d times the norm of
    the true gradient, so any clip of the mixed update would be a clip of c·z), with a measuring backward
    first as in IP-SGD (:class:`~zotune.optim.inplace_sgd.UpdatesInBackward`): one extra backward on B1 per
    step, ``fo_closure`` still called once; ``last_grad_norm`` holds the norm before clipping.

    ``mixing``: ``convex`` (default) w1 = 1 − α, w0 = α; ``additive`` w1 = 1, w0 = α. The paper mixes with
    one constant α; public text does not settle which form, so both are offered. α must be small either way:
    c·z has about √d times the norm of the true gradient (d = trainable parameters).

    ``step(zo_closure, fo_closure)``: ``zo_closure`` returns the loss on B0 without backward (called twice
    under inference mode); ``fo_closure`` returns the loss on B1 as a tensor with a graph (``step`` calls
    backward). Either may be ``None`` for a step on one batch only: with no B1 the step is MeZO's
    (w0 = 1), with no B0 it is IP-SGD's (w1 = 1); the trainer uses this when a length bucket is empty.
    ``step`` returns the mean of the losses it saw; ``last_losses`` holds each.

    Calling ``backward`` outside ``step`` leaves the gradients in ``.grad`` as usual, updating nothing; a step
    with a first-order batch then refuses to start until they are cleared (``optimizer.zero_grad()``), since
    its backward would add them to ∇L_B1. They are not cleared for you: they may be someone's data.
    Communication (data parallel): the two ZO losses are all-reduced as in MeZO, the gradient of each
    tensor inside its hook before the update (with clipping, in the measuring backward too: the norm is that
    of the averaged gradient, and every gradient is all-reduced twice).

    The defaults of ``lr`` and ``alpha`` are documented choices, not the paper's: its OPT-13B values could not be
    read from it (see configs/paper/addax-opt13b-sst2.yaml).

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): the model (module perturbation for the
            estimate on B0, MeZO's weight-decay rule) or its parameters (in-place perturbation), as for :class:`MeZO`.
        lr: the learning rate of the mixed update, >= 0.
        alpha: α, the weight of the zeroth-order term: in [0, 1] for convex mixing, >= 0 for additive; small
            (default 1e-3) because c·z has about √d times the gradient's norm.
        mixing: ``"convex"`` (the default) or ``"additive"`` (see above).
        eps: ε, the perturbation's scale for the estimate on B0, > 0; 1e-3 is MeZO's.
        weight_decay: wd in θ·(1 − lr·wd) above, >= 0; 0: none.
        distribution: ``"gaussian"`` or ``"rademacher"``, as for :class:`MeZO`.
        seed: the base of the seed stream, as for :class:`MeZO`.
        num_threads: the threads for CPU parameters, as for :class:`MeZO` (None: ``torch.get_num_threads()``).
        clip_grad_norm: the global norm, > 0, that ∇L_B1 is clipped to (see above); None (the default): no clipping.
        difference: ``"central"`` or ``"forward"`` (one-sided) for the zeroth-order estimate.
        sparsity: the share of z's entries zeroed (the ZO term's directions), as for :class:`MeZO`.
        sparse_shares: ``"layer"``, ``"global"`` or ``"magnitude"``, as for :class:`MeZO`; a magnitude mask is read
            off the weights as the step starts, before the first-order update moves them.
        mask_every: the steps between new masks, as for :class:`MeZO`.
        blocks: block-wise perturbation of the estimate on B0, as for :class:`MeZO` (2 forwards per block; one-
            sided, 1 and the shared loss at θ): each parameter's zeroth-order term is its own block's c·z.
    """

    needs_differentiable_loss = True  # the first-order batch runs backward
    # The trainer's length split (L_T, K0, K1, memory_budget, on_empty_bucket; by_length: false is Addax-WA).
    data_options = ADDAX_DATA_OPTIONS
    variants = {}
    hf_trainer = False  # two batches a step, from a length split

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        return "its first-order update runs inside backward, before FSDP2 has reduce-scattered the gradient"

    @classmethod
    def check_data_options(cls, options, batch_size, size):
        check_addax_options(options, batch_size)

    @classmethod
    def data_plan(cls, examples, batch_size, options, seed, measure=None, from_first=int):
        """D0 (longer than L_T) feeds the ``K0 batch``, D1 the ``K1 batch`` (see :func:`zotune.lengths.plan_addax`)."""
        plan = agreed_plan(plan_addax(options, examples, batch_size, measure), from_first, options, examples, batch_size)
        return AddaxBatches(plan.split, plan.k0, plan.k1, seed, plan.notes)

    def data_parallel(self, group) -> None:
        UpdatesInBackward.data_parallel(self, group)  # the first-order half: losses and each gradient
        ZerothOrder.data_parallel(self, group)  # the zeroth-order half: its two losses

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        """One step on the ``K0 batch`` (zeroth-order) and the ``K1 batch`` (first-order), either of which may be
        missing (an empty bucket); the logged loss is the mean over the examples of both."""
        long, short = batches.get("K0 batch"), batches.get("K1 batch")
        self.step(long and (lambda: loss(long)), short and (lambda: loss(short)))
        losses, sizes = self.last_losses, {"zo": len(long or ()), "fo": len(short or ())}
        record = dict(
            loss=sum(losses[key] * sizes[key] for key in losses) / sum(sizes[key] for key in losses),
            **{f"loss_{key}": value for key, value in losses.items()},
            forward_passes=sum(e.forwards for e in self.last_estimates) + ("fo" in losses),
        )
        if self.last_estimates:
            estimate = self.last_estimates[0]
            record.update(projected_grad=estimate.projected_gradient, seed=estimate.seed)
        return self._with_grad_norm(record)

    def __init__(
        self,
        params_or_model,
        lr: float = 1e-4,
        alpha: float = 1e-3,
        mixing: str = "convex",
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        distribution: str = GAUSSIAN,
        seed: int = 0,
        num_threads: int | None = None,
        clip_grad_norm: float | None = None,
        difference: str = "central",
        sparsity: float = 0.0,
        sparse_shares: str = "layer",
        mask_every: int = 1,
        blocks: str | None = None,
    ) -> None:
        if mixing not in MIXINGS:
            raise OptionError(f"Addax mixing must be one of {', '.join(MIXINGS)}, got {mixing!r}")
        if not (isinstance(alpha, (int, float)) and 0 <= alpha and (mixing == "additive" or alpha <= 1)):
            raise OptionError(f"Addax alpha must be in [0, 1] for convex mixing (>= 0 for additive), got {alpha!r}")
        super().__init__(
            params_or_model,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            distribution=distribution,
            seed=seed,
            num_threads=num_threads,
            difference=difference,
        )
        self.alpha, self.mixing = float(alpha), mixing
        self.sparse_directions(sparsity, sparse_shares, mask_every)
        self.block_wise(params_or_model, blocks)
        self.last_losses: dict[str, float] = {}
        # During backward: each engine index's (seed, w0·c) pairs, and w1.
        self._pending: tuple[Callable[[int], list], float] | None = None
        self._updated: set[int] = set()
        self._register_update_hooks(
            (
                (param, self._updater(group, index))
                for group, indices in zip(self.param_groups, self.group_indices)
                for param, index in zip(group["params"], indices)
            ),
            clip_grad_norm,
        )

    @property
    def weights(self) -> tuple[float, float]:
        """(w0, w1): the weights of the zeroth- and first-order terms."""
        return (self.alpha, 1.0 - self.alpha) if self.mixing == "convex" else (self.alpha, 1.0)

    def _updater(self, group: dict, index: int):
        @torch.no_grad()
        def update(param: torch.Tensor) -> None:
            if self._pending is None:
                return
            zo_pairs, w1 = self._pending
            lr = group["lr"]
            terms, decay = [(s, -lr * a) for s, a in zo_pairs(index)], 1.0 - lr * group["weight_decay"]
            grad, alpha = self._take_gradient(param), -lr * w1 * self._gradient_scale
            if param.dtype in FULL_PRECISION:
                self.engine.apply(terms, (index,), scale=decay)
                param.add_(grad, alpha=alpha)
            else:
                self._update_rounding_once(index, terms, decay, grad, alpha)
            param.grad = None
            self._updated.add(index)

        return update

    def _update_rounding_once(self, index: int, terms: list, decay: float, grad: torch.Tensor, alpha: float) -> None:
        """θ_i ← θ_i·decay + Σ c·z_i(s) + alpha·grad over ``terms`` [(s, c)], in float32 blocks of θ_i, each
        rounded once to the weights' dtype (``engine.apply`` rounds the ZO part itself)."""
        terms = [(seed, coef) for seed, coef in terms if coef != 0.0]  # as apply: a zero term draws nothing
        flat = grad.reshape(-1)

        def update(block) -> None:
            if decay != 1.0:
                block.work.mul_(decay)
            for seed, coef in terms:
                block.work.add_(block.z(seed), alpha=coef)
            block.work.add_(flat[block.start : block.start + block.work.numel()], alpha=alpha)

        self.engine.transform(update, (index,))

    @torch.no_grad()
    def step(self, zo_closure: Closure | None = None, fo_closure: Closure | None = None) -> float:  # type: ignore[override]
        """One Addax step (see the class docstring): the estimate on B0 from ``zo_closure``, then backward on
        ``fo_closure``'s loss over B1, which applies the mixed update; either closure may be None. Returns the
        mean of the losses it saw (each in ``last_losses``). The seed stream advances only once the step is done.

        Raises:
            TypeError: when both closures are None.
            OptionError: with ``fo_closure``, when a parameter already holds a gradient.
            NonFiniteLossError: for a non-finite loss, before any update.
            NonFiniteGradientError: for a non-finite gradient of the first-order loss, as in IP-SGD.
        """
        if zo_closure is None and fo_closure is None:
            raise TypeError("Addax.step needs zo_closure (loss on the long batch), fo_closure (loss on the short batch), or both")
        if fo_closure is not None:
            self._refuse_held_gradients("call optimizer.zero_grad() before step()")
        step, seed = self.state["zo"]["step"], self.step_seed()
        self.renew_mask(step)
        losses: dict[str, float] = {}
        estimates, self.last_estimates, self.last_grad_norm = [], [], None
        if zo_closure is not None:
            loss_here = None
            for only in self.blocks or [None]:
                # With a first-order batch to follow, θ must be restored before its forward: no fused restore.
                estimate = self.estimator.estimate(
                    zo_closure, seed, step, fuse_restore=fo_closure is None, only=only, loss_here=loss_here
                )
                estimates.append(estimate)
                if self.estimator.one_sided:
                    loss_here = estimates[0].loss_minus
            losses["zo"] = sum(e.loss_plus + e.loss_minus for e in estimates) / (2 * len(estimates))
            self.last_estimates = estimates
        by_index = {i: e for e in estimates for i in (e.indices or ())}  # block-wise: each index's own estimate
        if fo_closure is None:
            # MeZO's update (w0 = 1), the pending in-place restore folded in
            for e in estimates:
                self.apply_by_group(
                    lambda group, e=e: [(seed, -group["lr"] * e.projected_gradient)], restore=e.restore, only=e.indices
                )
        else:
            w0, w1 = self.weights if estimates else (0.0, 1.0)

            def zo_pairs(index: int) -> list:
                estimate = by_index.get(index, estimates[0] if estimates else None)
                return [(seed, w0 * estimate.projected_gradient)] if estimate is not None else []

            losses["fo"] = self._first_order_pass(fo_closure, zo_pairs, w1, step, seed)
        self.advance()  # only now: a step refused for a non-finite loss leaves the optimizer as it was
        self.last_losses = losses
        return sum(losses.values()) / len(losses)

    def _first_order_pass(self, fo_closure: Closure, zo_pairs: Callable[[int], list], w1: float, step: int, seed: int) -> float:
        """Backward on B1; each tensor is updated in its hook, then any tensor B1 did not reach."""
        with torch.enable_grad():
            loss = fo_closure()
            value = self._checked_loss(loss, step, seed, "first-order loss")
            self._pending, self._updated = (zo_pairs, w1), set()
            try:
                self._backward_and_check(loss, step, seed)
            finally:
                self._pending = None
        for group, indices in zip(self.param_groups, self.group_indices):
            lr = group["lr"]
            for index in (i for i in indices if i not in self._updated):
                self.engine.apply([(s, -lr * a) for s, a in zo_pairs(index)], (index,), scale=1.0 - lr * group["weight_decay"])
        return value
