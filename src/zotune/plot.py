"""A run's ``plot.png``: the training loss (each batch's, and its moving mean), and the dev metric against
the step, the forward passes and the seconds run (the axes on which zeroth- and first-order optimizers
compare fairly)."""

from __future__ import annotations

from pathlib import Path


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window`` − 1 before it (fewer at the start)."""
    means, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        means.append(total / min(index + 1, window))
    return means


def dev_points(records: list[dict]) -> list[tuple[int, int, float, float]]:
    """(step, forward passes, seconds, value) of each dev evaluation, the counts of the step record before it."""
    points, last = [], {"forward_passes": 0, "seconds": 0.0}
    for record in records:
        if "loss" in record:
            last = record
        elif record.get("split") == "dev" and record.get("value") is not None:
            points.append((record["step"], last["forward_passes"], last["seconds"], record["value"]))
    return points


def plot(records: list[dict], path: Path, title: str) -> None:
    """Draws a run's ``metrics.jsonl`` records into ``path`` (PNG): the training loss by step, each batch's and
    its moving mean over about 2% of the steps, then the dev metric by step, forward passes and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    dev = dev_points(records)
    name = next((r["metric"] for r in records if r.get("split") == "dev"), "accuracy")
    figure, (loss_axis, *metric_axes) = plt.subplots(1, 4, figsize=(18, 4))
    # A batch's ZO loss is noisy: the moving mean over ~2% of the run is the curve to read.
    window = max(1, len(steps) // 50)
    losses = [r["loss"] for r in steps]
    loss_axis.plot([r["step"] for r in steps], losses, lw=0.6, alpha=0.4, label="batch")
    loss_axis.plot([r["step"] for r in steps], moving_mean(losses, window), lw=1.5, label=f"mean of {window} steps")
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    loss_axis.legend()
    for axis, column, label in zip(metric_axes, range(3), ("step", "forward passes", "seconds")):
        axis.plot([point[column] for point in dev], [point[3] for point in dev], marker="o")
        axis.set(xlabel=label, ylabel=f"dev {name}", title=f"dev {name} by {label}", ylim=(0, 1))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
