"""Data-parallel throughput: the same training recipe on 1, 2, ... processes under torchrun.

    zotune bench parallel --config configs/demo-sentiment-mezo.yaml --processes 1,2 steps=12

Each process count trains in its own run folder under ``--out``; the machine's cores are split evenly
between the processes (``threads`` = cores / processes), so the comparison is of one machine used two
ways. Throughput is training examples per second over the steps after the first (which includes
warm-up); the bytes each rank all-reduced per step come from the run's ``metrics.jsonl``. Writes
parallel.json, parallel.md and parallel.png, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError, load_config
from .report import write_report

# Small evaluation splits: the benchmark times training, and evaluation runs once at the end anyway.
DEFAULTS = ["eval_every=0", "zero_shot_eval=false", "num_dev=8", "num_test=8"]


def main(argv=None):
    """``zotune bench parallel``: trains the recipe under torchrun once per process count of ``--processes``
    (see the module docstring), then writes and prints the throughput table. ``argv``: the arguments after
    ``parallel`` (None: ``sys.argv[1:]``).

    Raises:
        ConfigError: for a bad override, a run that fails, or fewer than 2 steps.
    """
    parser = argparse.ArgumentParser(prog="zotune bench parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--out", default="results/parallel")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.processes.split(",")]
    cores = os.cpu_count() or 1
    out = Path(args.out)
    results = {}
    for n in counts:
        threads = max(1, cores // n)
        run_dir = out / f"processes-{n}"
        overrides = [*DEFAULTS, *args.overrides, f"threads={threads}", f"output_dir={run_dir}"]
        config = load_config(args.config, overrides)  # a bad override fails here, before any run starts
        shutil.rmtree(run_dir, ignore_errors=True)  # else the trainer would resume an earlier run
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "-m",
            "zotune.cli",
            "train",
            "--config",
            args.config,
            *overrides,
        ]
        finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if finished.returncode != 0:
            raise ConfigError(f"the run on {n} processes failed (exit code {finished.returncode}); its output is above")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        if len(steps) < 2:
            raise ConfigError("the benchmark needs at least 2 steps (the first is warm-up): set steps=")
        timed = steps[-1]["seconds"] - steps[0]["seconds"]
        results[n] = dict(
            threads_per_process=threads,
            batch_size=config.batch_size,
            steps=len(steps),
            examples_per_second=config.batch_size * (len(steps) - 1) / timed,
            seconds_per_step=timed / (len(steps) - 1),
            # between two steps' records: a step's own record is written before its stop-flag all-reduce
            bytes_per_step=(steps[-1].get("communicated_bytes", 0) - steps[0].get("communicated_bytes", 0)) / (len(steps) - 1),
            final_loss=steps[-1]["loss"],
        )
    base = results[counts[0]]["examples_per_second"]
    rows = [
        f"| {n} | {r['threads_per_process']} | {r['seconds_per_step']:.2f} | {r['examples_per_second']:.2f} | "
        f"{r['examples_per_second'] / base:.2f} | {r['bytes_per_step']:.0f} |"
        for n, r in results.items()
    ]
    import torch

    table = "\n".join(
        [
            f"command: zotune bench parallel {shlex.join(sys.argv[1:] if argv is None else argv)}",
            f"machine: {platform.machine()}, {cores} cores; torch {torch.__version__}; "
            f"{config.optimizer} on {config.task}, {config.model}, batch {config.batch_size}",
            "",
            f"| processes | threads each | seconds/step | examples/s | vs {counts[0]} process(es) | bytes all-reduced per step per rank |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_report(
        out,
        "parallel",
        results,
        table,
        (
            [str(n) for n in results],
            [r["examples_per_second"] for r in results.values()],
            dict(xlabel="processes", ylabel="training examples / s"),
        ),
    )
