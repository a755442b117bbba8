"""Learning-rate schedules: a factor of each step, applied to the rates the optimizer was built with."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")
RATE_KEYS = ("lr", "anchor_lr")  # MeZO-SVRG's η1 follows the schedule as η2 does


def lr_factor(schedule: str, step: int, steps: int, warmup_steps: int = 0) -> float:
    """The factor of step ``step`` (1-based) of ``steps``: a linear warm-up from 0 over ``warmup_steps``, then
    constant, linear decay to 0 at the last step, or cosine decay to 0 (as transformers' schedules)."""
    if warmup_steps and step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Schedule:
    """Sets every parameter group's rates to the base rates times :func:`lr_factor` before each step. The base
    rates are the groups' when the optimizer was built (from the config), so a resumed run, whose groups
    are restored mid-schedule, continues the same curve."""

    def __init__(self, optimizer, schedule: str, steps: int, warmup_steps: int) -> None:
        self.optimizer, self.schedule, self.steps, self.warmup_steps = optimizer, schedule, steps, warmup_steps
        self.base = [{key: group[key] for key in RATE_KEYS if key in group} for group in optimizer.param_groups]

    @property
    def active(self) -> bool:
        return self.schedule != "constant" or self.warmup_steps > 0

    def before(self, step: int) -> None:
        """Sets every group's rates for step ``step`` (1-based) to the base rates times :func:`lr_factor`; a
        constant schedule without warm-up leaves them as they are."""
        if not self.active:
            return
        factor = lr_factor(self.schedule, step, self.steps, self.warmup_steps)
        for group, base in zip(self.optimizer.param_groups, self.base):
            for key, rate in base.items():
                group[key] = rate * factor
