"""``logger: tensorboard``: the run's records as TensorBoard scalars, in ``tensorboard/`` of the run folder.

Steps give ``train/<field>`` (loss, the losses at θ ± εz, the projected gradient, lr, peak memory, forward
passes, seconds) against the step; evaluations give ``<split>/<metric>`` against the step, and again against
the forward passes and the seconds run so far (``..._by_forward_passes``, ``..._by_seconds``), the axes on
which zeroth-order and first-order optimizers compare fairly. Each run writes the folder's event files afresh,
a resumed one starting with the records ``metrics.jsonl`` kept (up to its checkpoint, with the resume's wall
times), so each series holds each record once; TensorBoard's purge by step number would also cut the
forward-pass and seconds series at that number.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .config import ConfigError

STEP_FIELDS = (
    "loss",
    "loss_plus",
    "loss_minus",
    "projected_grad",
    "projected_grad_at_anchor",
    "lr",
    "peak_memory_mb",
    "forward_passes",
    "seconds",
)


class TensorBoardLog:
    """A sink of :class:`zotune.metrics_log.MetricsLog` that writes each record as TensorBoard scalars into
    ``folder``, replacing the event files there (see the module docstring).

    Raises:
        ConfigError: when the tensorboard package is not installed.
    """

    def __init__(self, folder: Path) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "logger=tensorboard needs the tensorboard package: pip install tensorboard, or set "
                "logger=none (metrics.jsonl and plot.png are written either way)"
            )
        from torch.utils.tensorboard import SummaryWriter

        for stale in Path(folder).glob("events.out.tfevents.*"):  # an earlier run's; a resumed one hands over what it kept
            stale.unlink()
        self.writer = SummaryWriter(str(folder))
        self.last_step: dict = {}

    def write(self, record: dict) -> None:
        """A step record's numeric fields as ``train/<field>``; an evaluation's value as ``<split>/<metric>``
        by step, forward passes and seconds (those of the last step record written); other records (notes)
        are skipped."""
        step = record["step"]
        if "loss" in record:
            for field in STEP_FIELDS:
                if isinstance(record.get(field), (int, float)):
                    self.writer.add_scalar(f"train/{field}", record[field], step)
            self.last_step = record
        elif "split" in record and record.get("value") is not None:
            tag = f"{record['split']}/{record['metric']}"
            self.writer.add_scalar(tag, record["value"], step)
            self.writer.add_scalar(f"{tag}_by_forward_passes", record["value"], self.last_step.get("forward_passes", 0))
            self.writer.add_scalar(f"{tag}_by_seconds", record["value"], round(self.last_step.get("seconds", 0)))
        else:
            return
        self.writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self.writer.close()
