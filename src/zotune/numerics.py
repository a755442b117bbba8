"""Watching a run's numbers: projected gradients far outside their recent range."""

from __future__ import annotations

import statistics


class ProjectedGradientMonitor:
    """Flags a projected gradient c whose size is more than ``factor`` times the median |c| of the last
    ``window`` steps. Such a c is usually a loss spike (a bad batch, an eps too small for the dtype),
    and its update is ``lr·c`` along one random direction, large enough to undo many steps.

    The median, not the mean or the maximum, so that one earlier spike does not hide the next one.
    ``factor = 0`` turns the check off. The recent values are part of the checkpoint, so a resumed run
    flags the same steps as an uninterrupted one.
    """

    def __init__(self, factor: float, window: int = 100, warmup: int = 10) -> None:
        self.factor, self.window, self.warmup = factor, window, warmup
        self.recent: list[float] = []

    def check(self, value: float) -> str | None:
        """Records ``value``; returns a one-line report when it is an outlier, else None."""
        report = None
        if self.factor and len(self.recent) >= self.warmup:
            typical = statistics.median(abs(v) for v in self.recent)
            if typical > 0 and abs(value) > self.factor * typical:
                report = (
                    f"projected gradient {value:.4g} is {abs(value) / typical:.0f}x the median |c| "
                    f"({typical:.3g}) of the last {len(self.recent)} steps"
                )
        self.recent = [*self.recent, value][-self.window :]
        return report

    def state_dict(self) -> dict:
        """The recent values, for checkpoints."""
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a :meth:`state_dict`."""
        self.recent = list(state["recent"])
