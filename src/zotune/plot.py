"""A run's ``plot.png``: the training loss (each batch's, and its moving mean) and the dev metric against
the step."""

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


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    dev = [r for r in records if r.get("split") == "dev"]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    # A batch's ZO loss is noisy: the moving mean over ~2% of the run is the curve to read.
    window = max(1, len(steps) // 50)
    losses = [r["loss"] for r in steps]
    loss_axis.plot([r["step"] for r in steps], losses, lw=0.6, alpha=0.4, label="batch")
    loss_axis.plot([r["step"] for r in steps], moving_mean(losses, window), lw=1.5, label=f"mean of {window} steps")
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    loss_axis.legend()
    name = dev[0]["metric"] if dev else "accuracy"
    metric_axis.plot([r["step"] for r in dev], [r["value"] for r in dev], marker="o")
    metric_axis.set(xlabel="step", ylabel=f"dev {name}", title=name, ylim=(0, 1))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
