"""A run's ``plot.png``: the training loss and the dev metric against the step."""

from __future__ import annotations

from pathlib import Path


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    dev = [r for r in records if r.get("split") == "dev"]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    loss_axis.set(xlabel="step", ylabel="training loss (batch)", title="loss")
    name = dev[0]["metric"] if dev else "accuracy"
    metric_axis.plot([r["step"] for r in dev], [r["value"] for r in dev], marker="o")
    metric_axis.set(xlabel="step", ylabel=f"dev {name}", title=name, ylim=(0, 1))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
