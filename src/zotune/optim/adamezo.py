"""AdaMeZO: Adam-style zeroth-order updates whose moments are never stored (Cai, Chen, Zhu, 2026)."""

from __future__ import annotations

from ..directions import Block
from ..errors import OptionError
from .mezo import MeZO


class AdaMeZO(MeZO):
    """MeZO's two-point estimate, with an update normalised like Adam's, from moments rebuilt each step.

    The optimizer keeps only the last ``window`` pairs (seed s_k, projected gradient P_k). For the first
    ``window`` steps it takes plain MeZO steps. After that, for every parameter block, it regenerates
    the window's directions and forms

        m = Σ_k β1^k · P_{t−k} · z(s_{t−k}),    v = Σ_k β2^k · P_{t−k}² · z(s_{t−k})²,    k = 0..window−1

        θ ← θ·(1 − lr·wd) − lr · m_scale · m / (√v + δ)

    m and v live only in two block buffers per thread. Nothing of parameter size is stored, and they are
    accumulated in float32 (float64 for float64 parameters), even for bf16/fp16 parameters: the official code's fp16 sums overflow
    once P² exceeds 65504. The cost is ``window`` generation sweeps per update instead of one.

    ``m_scale``: the official code multiplies m by 100 (the default here). Because weight decay is not
    scaled by it, ``m_scale = 100`` with ``lr`` is the same update as ``m_scale = 1`` with ``100·lr`` and
    ``wd/100``. The defaults (window 10, β1 0.7, β2 0.9, δ 1e-5, ε 1e-3) are the paper's.
    """

    def __init__(self, params_or_model, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 window: int = 10, beta1: float = 0.7, beta2: float = 0.9, delta: float = 1e-5,
                 m_scale: float = 100.0, distribution: str = "gaussian", seed: int = 0,
                 num_threads: int | None = None, dual_forward: bool = False) -> None:
        if not (isinstance(window, int) and window >= 1):
            raise OptionError(f"window must be a positive integer, got {window!r} (the paper uses 10)")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise OptionError(f"{name} must be in [0, 1), got {beta}")
        if not delta > 0:
            raise OptionError(f"delta must be positive, got {delta}")
        super().__init__(params_or_model, lr=lr, eps=eps, weight_decay=weight_decay, n_directions=1,
                         distribution=distribution, seed=seed, num_threads=num_threads,
                         dual_forward=dual_forward)
        self.window, self.beta1, self.beta2, self.delta, self.m_scale = window, beta1, beta2, delta, m_scale
        self.state["zo"] = {**self.state["zo"], "window": []}

    def _update(self, estimates) -> None:
        estimate = estimates[0]
        stream = self.state["zo"]
        history = [*stream["window"], [estimate.seed, estimate.projected_gradient]][-self.window:]
        self.state["zo"] = {**stream, "window": history}
        if stream["step"] <= self.window:  # the step counter already counts this step
            return super()._update(estimates)
        newest_first = history[::-1]
        restore = estimate.restore
        for group, indices in zip(self.param_groups, self._group_indices):
            lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]

            def update(block: Block) -> None:
                m, v = block.scratch("m").zero_(), block.scratch("v").zero_()
                for seed, _ in restore:  # needed twice: drawn once into a buffer rather than generated twice
                    block.z(seed)
                block.add_moments(m, v, [(seed, self.beta1**k * projected, self.beta2**k * projected * projected)
                                         for k, (seed, projected) in enumerate(newest_first)])
                for seed, coef in restore:
                    block.work.add_(block.z(seed), alpha=coef)
                if decay != 1.0:
                    block.work.mul_(decay)
                if lr != 0.0:
                    block.work.addcdiv_(m, v.sqrt_().add_(self.delta), value=-lr * self.m_scale)

            self.engine.transform(update, indices)
