"""Errors zotune raises on purpose, each with a message that names the problem and the fix."""


class ZotuneError(Exception):
    """Base class of zotune's own errors."""


class NonFiniteLossError(ZotuneError, FloatingPointError):
    """A loss was NaN or infinite; the parameters were left as they were before the step."""

    def __init__(self, step: int, losses: dict[str, float], seed: int | None = None) -> None:
        shown = ", ".join(f"{name}={value}" for name, value in losses.items())
        where = f"step {step}" if seed is None else f"step {step} (direction seed {seed})"
        super().__init__(
            f"non-finite loss at {where}: {shown}. The parameters were not "
            "updated. Lower the learning rate or eps, or check the batch and the model's dtype."
        )
        self.step, self.seed, self.losses = step, seed, losses


class NonFiniteGradientError(ZotuneError, FloatingPointError):
    """A first-order gradient was NaN or infinite while its loss was finite (an overflow in backward)."""

    def __init__(self, step: int, seed: int | None = None, applied: bool = True) -> None:
        where = f"step {step}" if seed is None else f"step {step} (direction seed {seed})"
        consequence = (
            "the update fused into backward has already written it into the weights, so they must not be "
            "saved: resume from the last checkpoint"
            if applied
            else "the parameters were not updated"
        )
        super().__init__(
            f"non-finite gradient at {where} with a finite loss: {consequence}. Lower the learning "
            "rate, or train in fp32 or bf16 rather than fp16."
        )
        self.step, self.seed, self.applied = step, seed, applied


class OptionError(ZotuneError, ValueError):
    """An option (name or value) that cannot work; the message names it and what would."""


class CheckpointError(ZotuneError, ValueError):
    """A checkpoint this version cannot resume faithfully; the message says why and what to do."""


class TrainingError(ZotuneError, RuntimeError):
    """Training stopped; the message names the step and what to change."""
