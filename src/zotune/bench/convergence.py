"""Accuracy and loss against steps, forward passes and wall time, for several optimizers on one recipe.

    zotune bench convergence --config configs/demo-sentiment-mezo.yaml --optimizers mezo@5e-5,adamezo@1e-6,adamezo@1e-5 \\
        steps=60 eval_every=10

Each optimizer trains from the same pretrained model on the same data and seed, in its own run folder
under ``--out`` and in its own process, so that the peak memory reported for it (the process's peak
resident set on CPU, the allocator's peak on CUDA, during training) is its own. Targets shared by all runs: the best dev metric every run reached, and the highest of the
runs' lowest smoothed training losses (a moving mean over ``--smooth`` steps). For each run the table gives
the forward passes and seconds at which it first reached each target. Writes convergence.json,
convergence.md and convergence.png, and prints the table. With ``--resume`` a suite that was stopped
continues where it stopped: a finished run with the same settings is kept, an unfinished one (or one
given more ``steps``) resumes from its newest checkpoint (set ``checkpoint_every``), and only a run with
settings that define another run starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from .runs import dev_curve, train_run


def first_reaching(points, target, lower_is_better):
    """(forward passes, seconds) of the first of ``points`` (value, forward passes, seconds), in order, whose
    value reaches ``target``: at or below it with ``lower_is_better``, else at or above; None if none does."""
    for point in points:
        if (point[0] <= target) if lower_is_better else (point[0] >= target):
            return point[1:]
    return None


def main(argv=None):
    """``zotune bench convergence``: trains every optimizer of ``--optimizers`` (see the module docstring), then
    writes and prints the comparison. ``argv``: the arguments after ``convergence`` (None: ``sys.argv[1:]``).

    Raises:
        ConfigError: for a bad override, or when a run fails.
    """
    parser = argparse.ArgumentParser(prog="zotune bench convergence", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--optimizers",
        required=True,
        help="comma-separated optimizer names, each optionally with @lr and a #label (e.g. mezo@5e-5,adamezo@1e-5,svrg#dense)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTIMIZER:key=value",
        help="an override for one optimizer's run (repeatable)",
    )
    parser.add_argument("--smooth", type=int, default=10)
    parser.add_argument("--out", default="results/convergence")
    parser.add_argument(
        "--resume", action="store_true", help="keep finished runs with the same settings and resume unfinished ones"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = {}
    for name in args.optimizers.split(","):
        # "adamezo@1e-5": that optimizer at that learning rate; "svrg#dense": a label, to run one optimizer twice
        optimizer, _, lr = name.partition("#")[0].partition("@")
        own = [item.split(":", 1)[1] for item in args.set if item.split(":", 1)[0] == name]
        overrides = ["export=false", *args.overrides, f"optimizer={optimizer}", *([f"lr={lr}"] if lr else []), *own]
        run = train_run(args.config, overrides, out / name, args.resume, name)
        config, summary, records = run["config"], run["summary"], run["records"]
        steps = [r for r in records if "loss" in r]
        smoothed = []
        for i, r in enumerate(steps):
            window = steps[max(0, i - args.smooth + 1) : i + 1]
            smoothed.append((sum(w["loss"] for w in window) / len(window), r["forward_passes"], r["seconds"]))
        evals = dev_curve(records)
        runs[name] = dict(config=config, summary=summary, smoothed=smoothed, evals=evals)
    target_metric = min(max(value for value, *_ in run["evals"]) for run in runs.values())
    target_loss = max(min(loss for loss, *_ in run["smoothed"]) for run in runs.values())
    rows = []
    for name, run in runs.items():
        metric_at = first_reaching(run["evals"], target_metric, lower_is_better=False)
        loss_at = first_reaching(run["smoothed"], target_loss, lower_is_better=True)
        run.update(metric_target=target_metric, reached_metric_at=metric_at, loss_target=target_loss, reached_loss_at=loss_at)

        def show(at):
            return "not reached" if at is None else f"{at[0]} passes, {at[1]:.0f} s"

        rows.append(
            f"| {name} | {run['config']['lr']:g} | {run['summary']['zero_shot_dev']:.3f} | {run['summary']['dev']:.3f} "
            f"| {run['summary']['test']:.3f} | {show(metric_at)} | {show(loss_at)} | {run['summary']['seconds']:.0f} "
            f"| {run['summary']['peak_memory_mb']:.0f} |"
        )
    metric = next(iter(runs.values()))["summary"]["metric"]
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
    table = "\n".join(
        [
            f"command: zotune bench convergence {shlex.join(sys.argv[1:] if argv is None else argv)}",
            f"machine: {machine}; torch {torch.__version__}",
            "",
            f"targets: dev {metric} {target_metric:.3f}; training loss (mean of {args.smooth} steps) {target_loss:.4f}",
            "",
            f"| optimizer | lr | zero-shot dev | final dev | final test | dev {metric} target at | loss target at | train seconds "
            "| peak memory (MiB) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(runs, indent=2))
    (out / "convergence.md").write_text(table + "\n")
    _plot(runs, out / "convergence.png", metric)
    print(table)


def _plot(runs, path, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis, time_axis) = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in runs.items():
        loss_axis.plot([p[1] for p in run["smoothed"]], [p[0] for p in run["smoothed"]], label=name)
        metric_axis.plot([p[1] for p in run["evals"]], [p[0] for p in run["evals"]], marker="o", label=name)
        time_axis.plot([p[2] for p in run["evals"]], [p[0] for p in run["evals"]], marker="o", label=name)
    loss_axis.set(xlabel="forward passes", ylabel="training loss (smoothed)")
    metric_axis.set(xlabel="forward passes", ylabel=f"dev {metric}", ylim=(0, 1))
    time_axis.set(xlabel="training seconds", ylabel=f"dev {metric}", ylim=(0, 1))
    for axis in (loss_axis, metric_axis, time_axis):
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
