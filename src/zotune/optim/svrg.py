"""MeZO-SVRG: zeroth-order SVRG with a periodic large-batch estimate at an anchor (Gautam et al., 2024)."""

from __future__ import annotations

import torch

from ..directions import GAUSSIAN, Pair
from ..config import ConfigError
from ..errors import OptionError
from ..estimators import Closure, mean_over_micro_batches
from ..scoring import by_length
from ..sampling import SVRGBatches
from ..sparse_masks import SparseMask
from .zeroth_order import ZerothOrder
from .params import refuse_sharded
from .protocol import Loss

MEMORY_MODES = ("seeds", "dense")


class MeZOSVRG(ZerothOrder):
    """The paper's algorithm (not its code, whose anchor aliases the live weights so its correction is zero):

        every q-th step (an anchor step):  θ̃ ← θ;  G ← c_G·z_G, a ZO estimate on a large batch at θ̃;  θ ← θ − η1·G
        otherwise:                          θ ← θ − η2·(c(θ)·z − c(θ̃)·z + G)

    where c(θ) and c(θ̃) are two-point estimates on the same minibatch with the same z (four forwards).
    ``lr`` is η2 and ``anchor_lr`` η1 (both in the param groups, so schedulers reach them); ``anchor_every``
    is q. ``step(closure, large_batch_closure)``: ``large_batch_closure`` (e.g. a
    :func:`~zotune.estimators.mean_over_micro_batches` over many examples) is called on anchor steps only;
    ``is_anchor_step`` says whether the next step is one.

    ``memory``:
      - ``dense`` keeps θ̃ and G as two parameter-sized tensors, as the paper does (state: 2× parameters).
      - ``seeds`` keeps G as its pair (seed, c_G) and θ̃ as the path of (seed, coefficient) pairs that led
        from it to θ; evaluating at θ̃ ± εz builds θ − path ± εz, regenerating each path direction: at most
        q pairs, so ``q`` extra generations per block for each of the two forwards at θ̃ (none for q=2 beyond
        one). MeZO's memory. Given the model (module mode) θ is never written during an estimate, so θ̃ is
        reconstructed with one rounding from θ, not from a stored copy: it differs from the dense θ̃ in the
        last bits of float32, not more. Given parameters only (in-place mode), θ is moved there and back.
    No weight decay: the paper has none, and decay would leave θ̃ off the (seed, scalar) path.

    ``anneal`` (off by default) adds the official code's learning-rate schedule, which the paper's algorithm
    does not have (amazon-science/mezo_svrg, ``GLUETransformer.training_step_MeZO_SVRG`` in
    ``models/llm_module.py``). With T = ``anneal_window``, at the start of every step t with t a multiple of
    T and t > 4T (the code waits for more than 4T losses though it compares 3T), before that step's update:
    if the mean of the last T steps' losses exceeds (1 + ``anneal_threshold``) times the mean of the T losses
    two windows earlier (steps t−3T .. t−2T−1), every group's ``lr`` and ``anchor_lr`` are divided by
    ``anneal``, down to ``anneal_min_lr`` and ``anneal_min_anchor_lr``. The code's T is the number of
    minibatches in an epoch (8: 512 examples in batches of 64), so it checks once an epoch; its threshold is
    5%, its floors 1e-6 (η2) and 1e-5 (η1), its scripts' factor 4 or 5 (its command line's default: 1.5).
    Two differences, both free of cost: a step's loss is the one it returns (the two perturbed losses'
    mean, before the update; the large batch's on anchor steps), where the code spends a forward after the
    update on the same batch; and a rate already below its floor is left there (the code's max() would
    raise it to the floor, which its settings, starting at or above the floors, never do). The last 3T
    losses are in ``state_dict()``; losses are reduced across ranks first, so all ranks anneal alike.

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): the model (module perturbation) or its
            parameters (in-place perturbation), as for :class:`MeZO`.
        lr: η2, the rate of the ordinary steps, >= 0; the paper's is 1e-6.
        anchor_lr: η1, the rate of the anchor steps, >= 0; the paper's is 1e-4 (searched over 1e-3, 1e-4, 1e-5).
            A parameter group's own ``anchor_lr`` is kept.
        anchor_every: q, an integer >= 2: the steps whose count is a multiple of q (the first step too) are anchor
            steps; the paper's is 2.
        memory: ``"seeds"`` (the default: MeZO's memory) or ``"dense"`` (θ̃ and G stored, as in the paper; refuses
            FSDP2 shards).
        eps: ε, the perturbation's scale, > 0; 1e-3 is the paper's.
        weight_decay: must be 0 (anything else is refused, see above).
        distribution: ``"gaussian"`` or ``"rademacher"``, as for :class:`MeZO`.
        seed: the base of the seed stream, as for :class:`MeZO`.
        num_threads: the threads for CPU parameters, as for :class:`MeZO` (None: ``torch.get_num_threads()``).
        anneal: the divisor (> 1) of ``lr`` and ``anchor_lr`` when the loss rises (the code's scripts: 4 or 5); None
            (the default): no annealing.
        anneal_window: T, the steps in each loss window, a positive integer; the default 8 is the code's epoch.
        anneal_threshold: the relative rise, >= 0, above which the rates are divided; the code's 0.05.
        anneal_min_lr: the floor, >= 0, that annealing does not take ``lr`` below; the code's 1e-6.
        anneal_min_anchor_lr: the floor, >= 0, for ``anchor_lr``; the code's 1e-5.
        difference: ``"central"`` or ``"forward"`` (one-sided, each estimate with its own loss at the point).
        sparsity: the share of z's entries zeroed, as for :class:`MeZO`; in seeds memory each direction on the
            path from θ̃ (G's among them) is replayed under the mask of its own step.
        sparse_shares: ``"layer"`` or ``"global"``, as for :class:`MeZO`; ``"magnitude"`` with memory=dense only
            (a magnitude mask is read off each step's weights, so the path's earlier masks are gone).
        mask_every: the steps between new masks, as for :class:`MeZO`.
        blocks: block-wise perturbation, as for :class:`MeZO`, with memory=dense: G, c(θ) and c(θ̃) each one
            estimate per block (the whole model at θ̃ for the latter), every parameter updated with its block's.
            In seeds memory the path from θ̃ would need a coefficient per block and seed: not built.
    """

    def __init__(
        self,
        params_or_model,
        lr: float = 1e-6,
        anchor_lr: float = 1e-4,
        anchor_every: int = 2,
        memory: str = "seeds",
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        distribution: str = GAUSSIAN,
        seed: int = 0,
        num_threads: int | None = None,
        anneal: float | None = None,
        anneal_window: int = 8,
        anneal_threshold: float = 0.05,
        anneal_min_lr: float = 1e-6,
        anneal_min_anchor_lr: float = 1e-5,
        difference: str = "central",
        sparsity: float = 0.0,
        sparse_shares: str = "layer",
        mask_every: int = 1,
        blocks: str | None = None,
    ) -> None:
        if blocks is not None and memory == "seeds":
            raise OptionError(
                "MeZO-SVRG takes blocks with memory=dense: in seeds memory the path from the anchor would need a "
                "coefficient per block and seed; set memory=dense, or drop blocks"
            )
        if sparsity and sparse_shares == "magnitude" and memory == "seeds":
            raise OptionError(
                "memory=seeds replays the path from the anchor, and a magnitude mask is read off each step's weights, "
                "so the path's earlier masks are gone: use sparse_shares=layer or global, or memory=dense"
            )
        if anneal is not None and not anneal > 1:
            raise OptionError(
                f"anneal must be > 1 (the divisor of lr and anchor_lr when the loss rises), got {anneal!r}: "
                "set anneal=None to turn annealing off"
            )
        if not (isinstance(anneal_window, int) and anneal_window >= 1):
            raise OptionError(f"anneal_window must be a positive integer (steps per loss window), got {anneal_window!r}")
        if anneal_threshold < 0:
            raise OptionError(f"anneal_threshold must be >= 0 (0.05: anneal on a rise of more than 5%), got {anneal_threshold}")
        if anneal_min_lr < 0 or anneal_min_anchor_lr < 0:
            raise OptionError(
                f"anneal_min_lr and anneal_min_anchor_lr must be >= 0, got {anneal_min_lr} and {anneal_min_anchor_lr}"
            )
        if weight_decay:
            raise OptionError(
                f"MeZO-SVRG takes no weight decay (got {weight_decay}): the paper has none, and decay would "
                "take θ off the (seed, scalar) path from the anchor; set weight_decay=0"
            )
        if memory not in MEMORY_MODES:
            raise OptionError(f"MeZO-SVRG memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if not (isinstance(anchor_every, int) and anchor_every >= 2):
            raise OptionError(
                f"anchor_every (q) must be an integer >= 2, got {anchor_every!r}: q = 1 would be MeZO on the large batch"
            )
        if anchor_lr < 0:
            raise OptionError(f"anchor_lr must be >= 0, got {anchor_lr}")
        super().__init__(
            params_or_model, lr=lr, eps=eps, distribution=distribution, seed=seed, num_threads=num_threads, difference=difference
        )
        for group in self.param_groups:
            group.setdefault("anchor_lr", anchor_lr)
        self.sparse_directions(sparsity, sparse_shares, mask_every)
        self.block_wise(params_or_model, blocks)
        self.anchor_every, self.memory = anchor_every, memory
        if memory == "dense":
            refuse_sharded(
                [p for group in self.param_groups for p in group["params"]],
                "memory=dense swaps whole parameter tensors for the anchor's",
            )
        self.state["zo"] = {**self.state["zo"], "anchor_gradient": None, "path": []}
        self.anneal, self.anneal_window, self.anneal_threshold = anneal, anneal_window, anneal_threshold
        self.anneal_min_lr, self.anneal_min_anchor_lr = anneal_min_lr, anneal_min_anchor_lr
        if anneal is not None:  # only then: with annealing off the state is exactly as before the option existed
            self.state["zo"]["anneal_losses"] = []

    # large_batch: the examples of each anchor estimate (default: the training set), in micro-batches of
    # batch_size with one z.
    data_options = ("large_batch",)
    variants = {"dense": {"memory": "dense"}}
    hf_trainer = False  # a periodic large batch

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        if options.get("memory", "seeds") != "seeds":
            return "memory=dense keeps θ̃ and G as whole tensors; use memory=seeds"
        return None

    @classmethod
    def check_data_options(cls, options, batch_size, size):
        large = options.get("large_batch", size)
        if large is not None and (not isinstance(large, int) or isinstance(large, bool) or not 1 <= large <= (size or large)):
            raise ConfigError(
                f"optimizer_options.large_batch must be a number of training examples from 1 to "
                f"{size or 'the training set'} (the training set), got {large!r}"
            )

    @classmethod
    def data_plan(cls, examples, batch_size, options, seed, measure=None, from_first=int):
        cls.check_data_options(options, batch_size, len(examples))
        return SVRGBatches(len(examples), batch_size, options.get("large_batch", len(examples)), seed)

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        """An anchor step on the ``large batch`` (in micro-batches, one z), or an ordinary step on the
        ``batch`` (four forwards): whichever the step counter says, reading only that batch."""
        if self.is_anchor_step:
            large = [batches["large batch"][i] for i in by_length(batches["large batch"])]  # little padding
            micro = [large[i : i + micro_batch] for i in range(0, len(large), micro_batch)]
            value = self.step(None, mean_over_micro_batches(loss, micro))
            live = self.last_estimates[0]
            forwards = 2 * len(micro) * len(self.last_estimates)
            return dict(loss=value, projected_grad=live.projected_gradient, seed=live.seed, anchor=True, forward_passes=forwards)
        batch = batches["batch"]
        value = self.step(lambda: loss(batch))
        live, anchored = self.last_estimates[0], self.last_estimates[len(self.last_estimates) // 2]
        return dict(
            loss=value,
            projected_grad=live.projected_gradient,
            seed=live.seed,
            anchor=False,
            projected_grad_at_anchor=anchored.projected_gradient,
            forward_passes=2 * len(self.last_estimates),
        )

    @property
    def is_anchor_step(self) -> bool:
        return self.state["zo"]["step"] % self.anchor_every == 0

    @torch.no_grad()
    def step(self, closure: Closure, large_batch_closure: Closure | None = None) -> float:  # type: ignore[override]
        """One MeZO-SVRG step, whichever the step counter says (``is_anchor_step``): an anchor step, G estimated
        on ``large_batch_closure`` at θ̃ ← θ and θ ← θ − η1·G (``closure`` is not called), or an ordinary step,
        the corrected update from four forwards of ``closure``'s minibatch. Both closures return the loss
        without backward. With ``anneal``, the rates are checked before the step. Returns the mean of the two
        losses at θ ± εz (the large batch's on an anchor step).

        Raises:
            TypeError: on an anchor step without ``large_batch_closure``.
            NonFiniteLossError: for a non-finite loss, before any update.
        """
        if self.anneal is None:
            return self._svrg_step(closure, large_batch_closure)
        self._anneal_if_the_loss_rose()
        loss = self._svrg_step(closure, large_batch_closure)
        # A new list (not appended in place), so that a state_dict() taken earlier stays a snapshot.
        losses = [*self.state["zo"].get("anneal_losses", []), loss][-3 * self.anneal_window :]
        self.state["zo"] = {**self.state["zo"], "anneal_losses": losses}
        return loss

    def _anneal_if_the_loss_rose(self) -> None:
        """The official code's rule (see the class docstring), checked before the step's update."""
        stream, window = self.state["zo"], self.anneal_window
        # No losses in a state saved with annealing off: the first check waits for 3T new ones.
        losses = stream.get("anneal_losses", [])
        if stream["step"] % window or stream["step"] <= 4 * window or len(losses) < 3 * window:
            return
        recent, earlier = sum(losses[-window:]) / window, sum(losses[-3 * window : -2 * window]) / window
        if recent <= (1 + self.anneal_threshold) * earlier:
            return
        for group in self.param_groups:
            for key, floor in (("lr", self.anneal_min_lr), ("anchor_lr", self.anneal_min_anchor_lr)):
                group[key] = min(group[key], max(group[key] / self.anneal, floor))

    def _svrg_step(self, closure: Closure, large_batch_closure: Closure | None) -> float:
        stream = self.state["zo"]
        step = stream["step"]
        seed = self.step_seed()
        self.renew_mask(step)
        if isinstance(self.engine.mask, SparseMask):
            # Seeded masks: the path's directions replayed under their own steps' masks (G's seed opens the path).
            kept = {} if self.is_anchor_step else stream.get("path_masks", {})
            stream = {**stream, "path_masks": {**kept, seed: self.engine.mask.seed}}
            self.engine.mask.remember(stream["path_masks"])
        if self.is_anchor_step:
            if large_batch_closure is None:
                raise TypeError(
                    f"step {step} is an anchor step (every {self.anchor_every}): pass large_batch_closure, "
                    "the loss on the large batch"
                )
            estimates = [self.estimator.estimate(large_batch_closure, seed, step, only=only) for only in self.parts]
            gradient = (seed, estimates[0].projected_gradient)
            if self.memory == "dense":
                for e in estimates:
                    for index in e.indices or range(len(self.engine.params)):
                        param = self.engine.params[index]  # new dicts: an earlier state_dict() stays a snapshot
                        self.state[param] = {
                            "anchor": param.detach().clone(),
                            "anchor_gradient": e.projected_gradient * self.engine.direction(index, seed).to(param.dtype),
                        }
            path: list[Pair] = []
            for e in estimates:
                self._apply_by_group(
                    lambda group, e=e: [(seed, -group["anchor_lr"] * e.projected_gradient)],
                    path if self.memory == "seeds" else None,
                    e.indices,
                )
            self.state["zo"] = {**stream, "step": step + 1, "anchor_gradient": list(gradient), "path": path}
            self.last_estimates = estimates
            return sum(e.loss_plus + e.loss_minus for e in estimates) / (2 * len(estimates))
        live = [self.estimator.estimate(closure, seed, step, only=only) for only in self.parts]
        anchored = self._estimate_at_anchor(closure, seed, step)
        anchor_seed, anchor_c = stream["anchor_gradient"]
        path = [tuple(pair) for pair in stream["path"]]
        if self.memory == "dense":
            for here, there in zip(live, anchored):
                difference = here.projected_gradient - there.projected_gradient
                self._apply_by_group(lambda group, d=difference: [(seed, -group["lr"] * d)], None, here.indices)
            for group in self.param_groups:  # the stored G, as the paper
                for param in group["params"]:
                    param.add_(self.state[param]["anchor_gradient"], alpha=-group["lr"])
        else:
            difference = live[0].projected_gradient - anchored[0].projected_gradient
            self._apply_by_group(lambda group: [(seed, -group["lr"] * difference), (anchor_seed, -group["lr"] * anchor_c)], path)
        self.state["zo"] = {**stream, "step": step + 1, "path": path}
        self.last_estimates = [*live, *anchored]
        return sum(e.loss_plus + e.loss_minus for e in live) / (2 * len(live))

    @property
    def parts(self) -> list[frozenset[int] | None]:
        """What each estimate perturbs: every block in turn (block-wise), or the whole model (None)."""
        return self.blocks or [None]

    def _estimate_at_anchor(self, closure: Closure, seed: int, step: int) -> list:
        """The estimates at θ̃ along this step's z, one per part (:attr:`parts`)."""
        if self.memory == "seeds":
            return [self.estimator.estimate(closure, seed, step, base=[(s, -a) for s, a in self.state["zo"]["path"]])]
        live = [param.data for param in self.engine.params]
        for param in self.engine.params:
            param.data = self.state[param]["anchor"]
        try:
            return [self.estimator.estimate(closure, seed, step, only=only) for only in self.parts]
        finally:
            for param, data in zip(self.engine.params, live):
                param.data = data

    def _apply_by_group(self, pairs_of, path: list | None, only: frozenset[int] | None = None) -> None:
        """Apply each group's pairs (to the engine indices ``only``, if given); record them on the ``path`` from
        θ̃ if given (one entry per seed, summed)."""
        if path is not None and len({(g["lr"], g["anchor_lr"]) for g in self.param_groups}) > 1:
            raise OptionError(
                "MeZO-SVRG in seeds mode needs the same lr and anchor_lr in every parameter group (the "
                "path from the anchor is one list of pairs): use memory=dense for per-group rates"
            )
        for group, indices in zip(self.param_groups, self.group_indices):
            chosen = [i for i in indices if only is None or i in only]
            if chosen:
                self.engine.apply(pairs_of(group), chosen)
        for seed, coefficient in pairs_of(self.param_groups[0]) if path is not None else []:
            for i, (known, total) in enumerate(path):
                if known == seed:
                    path[i] = (seed, total + coefficient)
                    break
            else:
                path.append((seed, coefficient))
