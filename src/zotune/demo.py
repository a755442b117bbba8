"""The demo behind ``make demo``: SmolLM2-135M on the offline sentiment task with IP-SGD, MeZO and Addax.

Runs ``configs/demo-sentiment-ipsgd.yaml`` (first-order, in-place SGD), ``configs/demo-sentiment-mezo.yaml``
(zeroth-order) and ``configs/demo-sentiment-addax.yaml`` (both), each from the pretrained model in a process
of its own, so that each run's peak memory is its own; their step counts give them about the same wall
time. Prints accuracy (zero-shot and fine-tuned) and peak memory side by side, writes the table to
``runs/demo.md`` and the dev accuracy of all three against seconds to ``runs/demo.png``. Each run folder
holds its config, metrics, checkpoint and plot. ``key=value`` arguments override every recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see zotune.cli; must precede the torch import

RECIPES = ("configs/demo-sentiment-ipsgd.yaml", "configs/demo-sentiment-mezo.yaml", "configs/demo-sentiment-addax.yaml")


def main(argv: list[str] | None = None) -> None:
    """``make demo``: trains the three recipes one after another (see the module docstring), then writes and
    prints the table and the plot.

    Args:
        argv: ``key=value`` overrides for every recipe; None: ``sys.argv[1:]``.

    Raises:
        TrainingError: when a run's process fails.
    """
    from .config import load_config
    from .errors import TrainingError

    overrides = sys.argv[1:] if argv is None else argv
    rows, curves = [], {}
    for recipe in RECIPES:
        config = load_config(Path(recipe), overrides)  # a bad override fails here, before any run
        finished = subprocess.run([sys.executable, "-m", "zotune.cli", "train", "--config", recipe, *overrides])
        if finished.returncode != 0:
            raise TrainingError(f"the demo's {config.optimizer} run failed (exit status {finished.returncode})")
        run_dir = Path(config.output_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[config.optimizer] = records
        rows.append(
            f"| {config.optimizer} | {config.steps} | {summary['seconds']:.0f} | "
            f"{100 * summary['zero_shot_dev']:.1f}% | {100 * summary['dev']:.1f}% | {100 * summary['test']:.1f}% "
            f"| {summary['peak_memory_mb']:.0f} | {config.output_dir} |"
        )
    table = "\n".join(
        [
            f"{config.model} on {config.task} ({config.num_dev} dev / {config.num_test} test examples); peak memory: "
            "the run's process (resident set on a CPU, allocator on a GPU)",
            "",
            "| optimizer | steps | train seconds | zero-shot dev | fine-tuned dev | fine-tuned test | peak memory (MiB) "
            "| run folder |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    Path("runs").mkdir(exist_ok=True)
    Path("runs/demo.md").write_text(table + "\n")
    plot_together(curves, Path("runs/demo.png"), f"{config.model} on {config.task}")
    print("\n" + table)


def plot_together(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """Each run's dev accuracy against the seconds it had trained, in one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import dev_points

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, records in curves.items():
        points = dev_points(records)
        axis.plot([p[2] for p in points], [p[3] for p in points], marker="o", label=name)
    axis.set(xlabel="training seconds", ylabel="dev accuracy", title=title, ylim=(0, 1))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
