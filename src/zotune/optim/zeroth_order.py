"""The parts every zeroth-order optimizer is built from: the parameter groups and their decay rule, the
direction engine over their tensors, the two-point estimator (module, dual or in-place perturbation), and
the seed stream, kept in the optimizer's state so that a resumed run draws the same directions.

MeZO, MeZO-SVRG and Addax each compose these into their own step; AdaMeZO is MeZO with another update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..backends import working
from ..blocks import perturbation_blocks
from ..counter_rng import STREAM_VERSION
from ..directions import GAUSSIAN, Block, DirectionEngine, Pair, derive_seed
from ..errors import CheckpointError, OptionError
from ..estimators import TwoPointEstimator
from ..sparse_masks import MASK_COUNTER, MagnitudeMask, shares_of
from .params import refuse_sharded, trainable_groups
from .protocol import TrainingStep

PERTURBATIONS = ("module", "inplace")


class ZerothOrder(TrainingStep, torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` holding the zeroth-order parts (see the module docstring); its subclass
    writes ``step`` and ``train_step``.

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): the model (module perturbation, MeZO's decay
            rule) or parameters / groups (in place).
        lr: the learning rate (>= 0), in every group.
        eps: the perturbation's scale ε (> 0).
        weight_decay: θ ← θ·(1 − lr·wd) at each update (>= 0).
        distribution: ``gaussian`` or ``rademacher`` directions.
        seed: the base of the seed stream.
        num_threads: threads for CPU parameters (None: torch's).
        dual_forward: θ ± εz in one forward of the batch stacked twice (module perturbation only).
        perturbation: ``module`` (the default given the model) or ``inplace`` (the only one for parameters).
        difference: ``central`` (L(θ+εz) − L(θ−εz))/2ε, or ``forward``, the one-sided (L(θ+εz) − L(θ))/ε.
    """

    # Only loss values enter an estimate, so the closure may return a non-differentiable objective (e.g. minus
    # the batch's accuracy); an optimizer that also runs backward sets this back to True.
    needs_differentiable_loss = False
    takes_seed = True

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        return None  # given the parameters, it perturbs and updates each rank's shard in place

    def __init__(
        self,
        params_or_model,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        distribution: str = GAUSSIAN,
        seed: int = 0,
        num_threads: int | None = None,
        dual_forward: bool = False,
        perturbation: str | None = None,
        difference: str = "central",
    ) -> None:
        if lr < 0:
            raise OptionError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise OptionError(f"weight_decay must be >= 0, got {weight_decay}")
        model, groups = trainable_groups(params_or_model, weight_decay)
        perturbation = perturbation or ("module" if model is not None else "inplace")
        if perturbation not in PERTURBATIONS:
            raise OptionError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {perturbation!r}")
        if perturbation == "module" and model is None:
            raise OptionError(
                "perturbation=module runs each module on perturbed copies of its parameters: pass the model, not its parameters"
            )
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        params = [p for group in self.param_groups for p in group["params"]]
        self.param_list = params  # by engine index
        if perturbation == "module":
            refuse_sharded(params, "module perturbation swaps whole parameter tensors, which FSDP2 owns")
        self.engine = DirectionEngine(params, distribution, num_threads)
        self.estimator = TwoPointEstimator(
            self.engine, eps, model, dual_forward, in_place=perturbation == "inplace", difference=difference
        )
        offsets = [0]
        for group in self.param_groups:
            offsets.append(offsets[-1] + len(group["params"]))
        self.group_indices = [tuple(range(a, b)) for a, b in zip(offsets, offsets[1:])]  # engine indices per group
        # Not a per-parameter entry: torch.optim.Optimizer keeps non-tensor keys of `state` as they are
        # in state_dict()/load_state_dict(), so the seed stream resumes exactly.
        self.state["zo"] = {"seed": int(seed), "step": 0, "stream": STREAM_VERSION}
        self.last_estimates = []

    def sparse_directions(self, sparsity: float, sparse_shares: str, mask_every: int) -> None:
        """Sparse directions from now on (:mod:`zotune.sparse_masks`): each step's z with the ``sparsity`` share of
        its entries zeroed, by a seeded mask (``sparse_shares`` layer or global) or by the weights' magnitudes
        (magnitude), renewed every ``mask_every`` steps (see :meth:`renew_mask`). Sparsity 0: dense directions."""
        if not (isinstance(mask_every, int) and mask_every >= 1):
            raise OptionError(f"mask_every must be a positive integer (steps between new masks), got {mask_every!r}")
        self.mask_every = mask_every
        shares = shares_of(self.param_list, sparsity, sparse_shares, self.state["zo"]["seed"])
        if sparsity:
            if sparse_shares in ("global", "magnitude"):
                refuse_sharded(self.param_list, f"sparse_shares={sparse_shares} measures whole parameters' magnitudes")
            self.engine.mask_directions(shares, magnitude=sparse_shares == "magnitude")
            if sparse_shares == "global":  # measured on the weights as the run begins: a resumed run keeps them
                self.state["zo"]["mask_shares"] = shares

    def block_wise(self, model, level: str | None) -> None:
        """Block-wise perturbation (:mod:`zotune.blocks`) at ``level``, or None for the whole model at once:
        ``self.blocks``, the blocks' sets of engine indices, each perturbed alone with its own estimate."""
        self.blocks = None
        if level is not None:
            if self.estimator.module_perturbation is None or self.estimator.dual_forward:
                raise OptionError(
                    "blocks perturbs one block of modules at a time, in module mode: pass the model, "
                    "with perturbation=module and dual_forward=false"
                )
            self.blocks = perturbation_blocks(model, self.param_list, level)

    def renew_mask(self, step: int) -> None:
        """Step ``step``'s sparse mask, before its estimate: a seeded mask's seed for the step's epoch of
        ``mask_every`` steps; a magnitude mask read off the weights, against limits found at the epoch's first
        step (kept in the state, so that a resumed run reads the same masks). Nothing for dense directions."""
        mask, zo, epoch = self.engine.mask, self.state["zo"], step // self.mask_every
        if isinstance(mask, MagnitudeMask):
            if zo.get("mask_epoch") != epoch:
                zo["mask_limits"], zo["mask_epoch"] = mask.renew(), epoch
            mask.limits = list(zo["mask_limits"])
            mask.read()
        elif mask is not None:
            mask.seed = derive_seed(zo["seed"], epoch, MASK_COUNTER)

    def replay_masks(self, window_masks: Sequence[int], seeds: Sequence[Sequence[int]]) -> list[int]:
        """For an optimizer that replays a window of earlier steps' directions under seeded sparse masks: the
        mask seeds of the window after this step (``window_masks``, the earlier entries', and the current mask's,
        kept to ``len(seeds)`` entries), with each entry's direction ``seeds`` remembered under its own
        (:meth:`zotune.sparse_masks.SparseMask.remember`)."""
        masks = [*window_masks, self.engine.mask.seed][-len(seeds) :]
        self.engine.mask.remember({seed: mask for entry, mask in zip(seeds, masks) for seed in entry})
        return masks

    def step_seed(self, index: int = 0) -> int:
        """The seed of this step's ``index``-th direction."""
        stream = self.state["zo"]
        return derive_seed(stream["seed"], stream["step"], index)

    def advance(self, **changes) -> None:
        """The seed stream moves to the next step (with other entries of the state changed): a new dict, not an
        update in place, so that a state_dict() taken earlier stays a snapshot."""
        stream = self.state["zo"]
        self.state["zo"] = {**stream, "step": stream["step"] + 1, **changes}

    def apply_by_group(
        self,
        pairs_of: Callable[[dict], Sequence[Pair]],
        restore: Sequence[Pair] = (),
        decay: bool = True,
        only: frozenset[int] | None = None,
    ) -> None:
        """θ ← θ·(1 − lr·wd) + Σ a·z(s) in each group, over the group's ``pairs_of(group)``; ``restore``: pairs
        an in-place estimate left pending, folded into the same pass; ``only``: these engine indices alone."""
        for group, indices in zip(self.param_groups, self.group_indices):
            scale = 1.0 - group["lr"] * group["weight_decay"] if decay else 1.0
            chosen = indices if only is None else [i for i in indices if i in only]
            if chosen:
                self.engine.apply(list(pairs_of(group)), chosen, restore=restore, scale=scale)

    def dense_update(
        self, update: Callable[[Block, dict, dict[str, torch.Tensor]], None], names: Sequence[str], restore: Sequence[Pair] = ()
    ) -> None:
        """An update with per-parameter state: on every block of every group, ``restore`` (an in-place estimate's
        pending pairs) is folded in and θ decayed by (1 − lr·wd), then ``update(block, group, state)`` changes
        ``block.work``, ``state[name]`` being this block's part of the parameter's buffer ``name`` (float32, or
        float64 for float64 parameters; written back to the buffer, kept in the parameter's dtype as
        ``torch.optim`` keeps its moments, so that state_dict()/load_state_dict() round-trip them exactly)."""
        for param in self.param_list:
            for name in names:
                if name not in self.state[param]:
                    self.state[param][name] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        for group, indices in zip(self.param_groups, self.group_indices):

            def process(block: Block, group: dict = group) -> None:
                for seed, coef in restore:
                    block.work.add_(block.z(seed), alpha=coef)
                decay = 1.0 - group["lr"] * group["weight_decay"]
                if decay != 1.0:
                    block.work.mul_(decay)
                stop = block.start + block.work.numel()
                stored = {
                    name: self.state[self.param_list[block.param_index]][name].view(-1)[block.start : stop] for name in names
                }
                state = {name: working(value) for name, value in stored.items()}
                update(block, group, state)
                for name, value in state.items():
                    if value is not stored[name]:
                        stored[name].copy_(value)

            self.engine.transform(process, indices)

    def data_parallel(self, group) -> None:
        self.estimator.reduce = group.mean  # the ranks share the seed stream: only the losses are averaged

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim``'s, seed stream (and sparse masks' shares) included, once the state is known to come from
        this direction stream.

        Raises:
            CheckpointError: when the state was saved by a zotune drawing another stream
                (:data:`zotune.counter_rng.STREAM_VERSION`): its seeds would name other directions.
        """
        # States from before the version was recorded lack it: they were written with stream 1.
        saved = state_dict["state"].get("zo", {}).get("stream", 1)
        if saved != STREAM_VERSION:
            raise CheckpointError(
                f"this optimizer state was saved by a zotune whose directions came from stream {saved}, and this one "
                f"draws stream {STREAM_VERSION}: its seeds would name other directions than those it was trained with. "
                "Resume with the zotune version that saved it, or start the run again."
            )
        super().load_state_dict(state_dict)
        if "mask_shares" in self.state["zo"]:  # sparse masks' shares, measured when the run began
            self.engine.mask.reshare(self.state["zo"]["mask_shares"])
