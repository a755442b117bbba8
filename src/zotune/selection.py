"""Which weights a run is tested with: the last, or those of its best dev evaluation (MeZO's protocol), and
early stopping after evaluations without improvement (AdaMeZO's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .checkpoints import load_checked, save_atomically
from .errors import TrainingError


class DevSelection:
    """Follows the dev evaluations taken during training (not the zero-shot one, as MeZO's trainer).

    With ``keep_best`` the weights of the best evaluation so far are written to ``best.pt`` in the run folder
    when it is reached, so the best model costs disk, not a second copy in memory. ``patience``: the run stops
    once that many evaluations in a row have not beaten the best (a tie does not count as better)."""

    FILE = "best.pt"

    def __init__(self, folder: Path, keep_best: bool, patience: int | None) -> None:
        self.path, self.keep_best, self.patience = folder / self.FILE, keep_best, patience
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.stale = 0  # evaluations since the best
        self.last_value: float | None = None
        self.stopped_at: int | None = None

    def observe(self, step: int, value: float, weights: Callable[[], dict]) -> bool:
        """Records the dev metric at ``step``; returns whether it is a new best. ``weights()`` gives the state
        dict to keep (called only for a new best with ``keep_best``)."""
        self.last_value = value
        improved = self.best_value is None or value > self.best_value
        if improved:
            self.best_step, self.best_value, self.stale = step, value, 0
            if self.keep_best:
                self._write(step, value, weights())
        else:
            self.stale += 1
        return improved

    @property
    def out_of_patience(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def best_weights(self) -> dict:
        """The model state dict kept in ``best.pt`` (with ``keep_best``).

        Raises:
            TrainingError: when the file is missing, fails its checksum or does not load.
        """
        try:
            return load_checked(self.path)["model"]
        except (OSError, ValueError) as error:
            raise TrainingError(
                f"{self.path}, the best dev weights, cannot be used: {error}; test the last weights with select: last"
            ) from None

    def _write(self, step: int, value: float, weights: dict) -> None:
        if weights:  # empty on a rank that does not save (the first rank alone writes)
            save_atomically(dict(step=step, dev=value, model=weights), self.path)

    def state_dict(self) -> dict:
        """The best step and value, the evaluations since, the last value and the early stop's step, for
        checkpoints (the best weights stay in ``best.pt``)."""
        return dict(
            best_step=self.best_step,
            best_value=self.best_value,
            stale=self.stale,
            last_value=self.last_value,
            stopped_at=self.stopped_at,
        )

    def load_state_dict(self, state: dict) -> None:
        """Continues from a :meth:`state_dict`."""
        self.best_step, self.best_value, self.stale = state["best_step"], state["best_value"], state["stale"]
        self.last_value, self.stopped_at = state["last_value"], state["stopped_at"]
