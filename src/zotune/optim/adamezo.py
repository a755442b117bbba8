"""AdaMeZO: Adam-style zeroth-order updates whose moments are never stored (Cai, Chen, Zhu, 2026)."""

from __future__ import annotations

import math

from ..directions import Block, derive_seed
from ..errors import OptionError
from .mezo import MeZO

FORMS = ("code", "paper")
CODE_LR = 1e-7  # the official README's example: OPT-1.3B on SST-2, window 10, β1 0.7, β2 0.9, form "code"
CODE_M_SCALE = 100.0  # the official code's factor on m


class AdaMeZO(MeZO):
    """MeZO's two-point estimate, with an update normalised like Adam's, from moments rebuilt each step.

    The optimizer keeps only the last ``window`` (h) pairs (seed s_k, projected gradient P_k). For every
    parameter block it regenerates the window's directions and forms, k = 0 being the newest pair,

        form="code":   m = Σ_k β1^k · P_k · z(s_k),             v = Σ_k β2^k · P_k² · z(s_k)²
        form="paper":  m = (1 − β1) · Σ_k β1^k · P_k · z(s_k),  v = (1 − β2) · Σ_k β2^k · P_k² · z(s_k)²

        θ ← θ·(1 − lr·wd) − lr · s · m / (√v + δ),   s = ``m_scale`` (100) for "code", 1 for "paper"

    "code" is the official implementation (shawnnn3di/AdaMeZO, ``zo_update`` in MeZO/large_models/trainer.py):
    no (1 − β) factors, m multiplied by 100, δ outside the root, no bias correction, and h + 1 plain MeZO steps
    (θ ← θ·(1 − lr·wd) − lr·P·z) before the first windowed one (its step count starts at 0, and steps whose
    count is at most h are plain). "paper" is the paper's equations: the moments normalised by (1 − β), no
    factor 100, and windowed from the first step, over the pairs the window holds so far (an EMA started from
    zero and truncated at h; no bias correction, as in the code). It has no plain steps because its lr is ~100
    times the code's: a MeZO step at that lr would be far too large. δ is outside the root in both forms, where
    the official code puts it.

    ``beta2 = 0`` means momentum only in both forms, as in the official code (which then divides by ones):
    θ ← θ·(1 − lr·wd) − lr · s · m / (1 + δ). Read literally, β2 = 0 would leave v = P_0²·z_0² (β2^0 = 1): m
    divided by the newest pair's |P·z| alone.

    Learning rates between the forms. With M, V the unnormalised sums, "code" steps lr·100·M/(√V + δ) and
    "paper" lr'·(1 − β1)·M/(√(1 − β2)·√V + δ'). They are the same step when

        lr' = lr · 100 · √(1 − β2) / (1 − β1)   and   δ' = δ · √(1 − β2)

    (β2 = 0: lr' = lr·100/(1 − β1), δ' = δ), so nearly the same at one δ when δ ≪ √v. ``AdaMeZO.paper_lr`` gives lr';
    at the default betas lr' ≈ 105·lr. Weight decay keeps its step lr·wd with wd' = wd·lr/lr'. The code form's
    plain steps have no counterpart in the paper form.

    ``lr=None`` (the default) fits the form: ``CODE_LR`` = 1e-7 for "code", the official example's on OPT-1.3B,
    and ``paper_lr(1e-7, beta1, beta2)`` for "paper" (≈1.05e-5 at the default betas): the same windowed step.
    ``m_scale`` (default None: 100) applies to "code" only; since weight decay is not scaled by it,
    ``m_scale = 100`` with ``lr`` is the same update as ``m_scale = 1`` with ``100·lr`` and ``wd/100``.

    The official code falls back to plain MeZO for h < 2; here ``window = 1`` is the windowed update over one
    pair (≈ lr·s·sign(P·z)): use :class:`MeZO` for plain MeZO. The other defaults (window 10, β1 0.7, β2 0.9,
    δ 1e-5, ε 1e-3) are the official example's.

    m and v live only in two block buffers per thread. Nothing of parameter size is stored, and they are
    accumulated in float32 (float64 for float64 parameters), even for bf16/fp16 parameters: the official code's
    fp16 sums overflow once P² exceeds 65504. The cost is ``window`` generation sweeps per update instead of one.

    Args:
        params_or_model (nn.Module | Iterable[torch.Tensor] | Iterable[dict]): the model or its parameters, as for
            :class:`MeZO`.
        lr: the learning rate; None fits the form (see above): 1e-7 for "code", ``paper_lr(1e-7, beta1, beta2)``
            for "paper".
        eps: ε, the perturbation's scale, > 0; 1e-3 is the official example's.
        weight_decay: wd in θ·(1 − lr·wd), on plain and windowed steps alike and not scaled by ``m_scale``; 0: none.
        window: h, how many of the newest (seed, projected gradient) pairs the moments are rebuilt from, a positive
            integer; 10 is the official example's.
        beta1: β1 in [0, 1), m's decay over the window; 0.7 is the official example's.
        beta2: β2 in [0, 1), v's decay over the window (0: momentum only); 0.9 is the official example's.
        delta: δ > 0, added to √v (outside the root); 1e-5 is the official example's.
        form: ``"code"`` (the official implementation, the default) or ``"paper"`` (the paper's equations).
        m_scale: s, the factor on m, for "code" only (None: the official code's 100); refused with "paper".
        distribution: ``"gaussian"`` or ``"rademacher"``, as for :class:`MeZO`.
        seed: the base of the seed stream, as for :class:`MeZO`.
        num_threads: the threads for CPU parameters, as for :class:`MeZO` (None: ``torch.get_num_threads()``).
        dual_forward: both sides of the estimate in one forward of the doubled batch, as for :class:`MeZO`.
        perturbation: ``"module"`` or ``"inplace"`` (None: module given the model), as for :class:`MeZO`.
        difference: ``"central"`` or ``"forward"`` (one-sided), as for :class:`MeZO`.
        sparsity: the share of z's entries zeroed by a seeded mask, as for :class:`MeZO`; each direction of the
            window is replayed under the mask of its own step.
        sparse_shares: ``"layer"`` or ``"global"``, as for :class:`MeZO` (not ``"magnitude"``, whose masks are
            read off the weights of each step and so cannot be replayed).
        mask_every: the steps between new masks, as for :class:`MeZO`.
        blocks: block-wise perturbation, as for :class:`MeZO`: each block's own projected gradients make the
            moments of its parameters (the window holds one per block and step).
    """

    def __init__(
        self,
        params_or_model,
        lr: float | None = None,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        window: int = 10,
        beta1: float = 0.7,
        beta2: float = 0.9,
        delta: float = 1e-5,
        form: str = "code",
        m_scale: float | None = None,
        distribution: str = "gaussian",
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
        if sparsity and sparse_shares == "magnitude":
            raise OptionError(
                "AdaMeZO replays its window's directions, and a magnitude mask is read off each step's weights, so "
                "the earlier masks are gone: use sparse_shares=layer or global"
            )
        if not (isinstance(window, int) and window >= 1):
            raise OptionError(f"window must be a positive integer, got {window!r} (the paper uses 10)")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise OptionError(f"{name} must be in [0, 1), got {beta}")
        if not delta > 0:
            raise OptionError(f"delta must be positive, got {delta}")
        if form not in FORMS:
            raise OptionError(f"form must be 'code' or 'paper', got {form!r}")
        if form == "paper" and m_scale is not None:
            raise OptionError("m_scale applies to form='code' only (the paper has no factor on m): drop it, or multiply lr by it")
        if lr is None:
            lr = CODE_LR if form == "code" else self.paper_lr(CODE_LR, beta1, beta2)
        super().__init__(
            params_or_model,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            n_directions=1,
            distribution=distribution,
            seed=seed,
            num_threads=num_threads,
            dual_forward=dual_forward,
            perturbation=perturbation,
            difference=difference,
            sparsity=sparsity,
            sparse_shares=sparse_shares,
            mask_every=mask_every,
            blocks=blocks,
        )
        # Block-wise, each parameter's moments come from its own block's projected gradients.
        self.block_of = {i: b for b, block in enumerate(self.blocks or []) for i in block}
        self.window, self.beta1, self.beta2, self.delta, self.form = window, beta1, beta2, delta, form
        if form == "code":
            self.m_scale = CODE_M_SCALE if m_scale is None else m_scale
            self.plain_steps, self.norm1, self.norm2 = window + 1, 1.0, 1.0
        else:
            self.m_scale, self.plain_steps, self.norm1, self.norm2 = 1.0, 0, 1.0 - beta1, 1.0 - beta2
        self.state["zo"] = {**self.state["zo"], "window": []}
        if self.engine.mask is not None:
            self.state["zo"]["window_masks"] = []  # the mask seed of each window entry's step

    def skip_warm_up(self) -> None:
        """Past the plain steps, with the window filled up by pairs of projected gradient 0: they add nothing to
        m or v, so the updates are those of the window so far, at the cost of a full one (what benchmarks time)."""
        stream = self.state["zo"]
        nothing = [0.0] * len(self.blocks) if self.blocks else 0.0
        filler = [[derive_seed(stream["seed"], -1, k), nothing] for k in range(self.window - 1 - len(stream["window"]))]
        self.state["zo"] = {**stream, "step": max(stream["step"], self.plain_steps), "window": [*filler, *stream["window"]]}
        if "window_masks" in stream:
            self.state["zo"]["window_masks"] = [0] * len(filler) + stream["window_masks"]

    @staticmethod
    def paper_lr(code_lr: float, beta1: float, beta2: float) -> float:
        """The form="paper" lr whose windowed steps are form="code"'s at ``code_lr`` and m_scale 100 (with
        δ·√(1 − β2) for δ): lr·100·√(1 − β2)/(1 − β1), or lr·100/(1 − β1) for momentum only (β2 = 0)."""
        return code_lr * CODE_M_SCALE * (math.sqrt(1.0 - beta2) if beta2 > 0 else 1.0) / (1.0 - beta1)

    def _update(self, estimates) -> None:
        estimate = estimates[0]
        stream = self.state["zo"]
        projected = [e.projected_gradient for e in estimates] if self.blocks else estimate.projected_gradient
        history = [*stream["window"], [estimate.seed, projected]][-self.window :]
        self.state["zo"] = {**stream, "window": history}
        if "window_masks" in stream:
            self.state["zo"]["window_masks"] = self.replay_masks(stream["window_masks"], [[seed] for seed, _ in history])
        if stream["step"] <= self.plain_steps:  # the step counter already counts this step
            return super()._update(estimates)
        momentum_only = self.beta2 == 0

        def moment_terms(part: int | None) -> list[tuple[int, float, float]]:
            """(seed, m's and v's coefficients) over the window; ``part``: the block whose projected gradients."""
            # Momentum only: v is not used; add_moments fills both buffers in one pass, so v's coefficients are 0.
            terms = []
            for k, (seed, projected) in enumerate(history[::-1]):
                p = projected if part is None else projected[part]
                terms.append((seed, self.norm1 * self.beta1**k * p, 0.0 if momentum_only else self.norm2 * self.beta2**k * p * p))
            return terms

        terms = {part: moment_terms(part) for part in (range(len(self.blocks)) if self.blocks else [None])}
        restore = estimate.restore
        for group, indices in zip(self.param_groups, self.group_indices):
            lr = group["lr"]

            # lr and decay bound as defaults: the closure keeps this group's values, not the loop's variables.
            def update(block: Block, lr: float = lr, decay: float = 1.0 - lr * group["weight_decay"]) -> None:
                m, v = block.scratch("m").zero_(), block.scratch("v").zero_()
                for seed, _ in restore:  # needed twice: drawn once into a buffer rather than generated twice
                    block.z(seed)
                block.add_moments(m, v, terms[self.block_of.get(block.param_index)])
                for seed, coef in restore:
                    block.work.add_(block.z(seed), alpha=coef)
                if decay != 1.0:
                    block.work.mul_(decay)
                if lr == 0.0:
                    return
                if momentum_only:
                    block.work.add_(m, alpha=-lr * self.m_scale / (1.0 + self.delta))
                else:
                    block.work.addcdiv_(m, v.sqrt_().add_(self.delta), value=-lr * self.m_scale)

            self.engine.transform(update, indices)
