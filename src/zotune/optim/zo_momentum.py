"""ZO-SGD-MMT: zeroth-order SGD with momentum (the ZO benchmark's ZO-SGD-MMT), with its buffer stored, or
rebuilt each step from a window of (seed, c) pairs."""

from __future__ import annotations

from ..errors import OptionError
from .mezo import MeZO

BUFFERS = ("dense", "replay")


class ZOSGDMomentum(MeZO):
    """Heavy-ball momentum on MeZO's estimate ĝ_t = (1/n)·Σ_j c_j·z(s_j), as ``torch.optim.SGD(momentum=μ)``
    applies it to a gradient (the benchmark's way: ĝ written into ``.grad``):

        b_t = μ·b_{t−1} + ĝ_t,   θ ← θ·(1 − lr·wd) − lr·b_t

    buffer="dense": b is a parameter-sized tensor per parameter (the benchmark's memory cost: one more copy of
    the trainable weights). buffer="replay": b_t is never stored but rebuilt from the last ``window`` steps'
    pairs, b_t ≈ Σ_{k<h} μ^k·ĝ_{t−k}: the update is a sum of h·n directions, applied in one generation sweep
    (h generations per block instead of one), nothing of parameter size kept. It equals the dense buffer while
    t ≤ h, and drops terms of weight μ^h after (μ = 0.9, h = 50: 0.5%). With seeded sparse directions each
    step's directions are replayed under that step's mask; block-wise, each block's buffer from its own
    estimates.

    Weight decay is MeZO's decoupled θ·(1 − lr·wd), not added to the buffer.

    Args: those of :class:`MeZO`, and
        momentum: μ in [0, 1); 0.9 by default.
        buffer: ``"dense"`` (the default) or ``"replay"``.
        window: h, the steps a replayed buffer holds (a positive integer; replay only).
    """

    def __init__(
        self, params_or_model, lr: float = 1e-6, momentum: float = 0.9, buffer: str = "dense", window: int = 50, **options
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise OptionError(f"momentum must be in [0, 1), got {momentum}")
        if buffer not in BUFFERS:
            raise OptionError(f"buffer must be dense or replay, got {buffer!r}")
        if not (isinstance(window, int) and window >= 1):
            raise OptionError(f"window must be a positive integer, got {window!r}")
        if buffer == "replay" and options.get("sparsity") and options.get("sparse_shares") == "magnitude":
            raise OptionError(
                "buffer=replay replays past steps' directions, and a magnitude mask is read off each step's weights, so "
                "the earlier masks are gone: use sparse_shares=layer or global, or buffer=dense"
            )
        super().__init__(params_or_model, lr=lr, **options)
        self.momentum, self.buffer, self.window = momentum, buffer, window
        if buffer == "replay":
            self.state["zo"] = {**self.state["zo"], "window": []}
            if self.engine.mask is not None:
                self.state["zo"]["window_masks"] = []  # the mask seed of each window entry's step

    variants = {"replay": {"buffer": "replay"}}

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        if options.get("buffer", "dense") == "dense":
            return "its dense momentum buffer is not sharded: use buffer=replay"
        return None

    def _update(self, estimates) -> None:
        if self.buffer == "replay":
            # A window entry: the step's pairs, or block-wise one list of pairs per block.
            parts = [sorted(block) for block in self.blocks] if self.blocks else [None]
            pairs = [[[s, c] for s, c in self.gradient_pairs(estimates, None if p is None else p[0])] for p in parts]
            stream = self.state["zo"]
            history = [*stream["window"], pairs if self.blocks else pairs[0]][-self.window :]
            self.state["zo"] = {**stream, "window": history}
            by_part = history if self.blocks else [[entry] for entry in history]
            if "window_masks" in stream:
                seeds = [[seed for part in entry for seed, _ in part] for entry in by_part]
                self.state["zo"]["window_masks"] = self.replay_masks(stream["window_masks"], seeds)
            for b, part in enumerate(parts):
                replayed = [(seed, self.momentum**k * c) for k, entry in enumerate(by_part[::-1]) for seed, c in entry[b]]
                self.apply_by_group(
                    lambda group, replayed=replayed: [(seed, -group["lr"] * c) for seed, c in replayed],
                    restore=estimates[-1].restore,
                    only=None if part is None else frozenset(part),
                )
            return

        def update(block, group, state) -> None:
            buffer = state["momentum_buffer"].mul_(self.momentum)
            for seed, coef in self.gradient_pairs(estimates, block.param_index):
                buffer.add_(block.z(seed), alpha=coef)
            block.work.add_(buffer, alpha=-group["lr"])

        self.dense_update(update, ("momentum_buffer",), restore=estimates[-1].restore)
