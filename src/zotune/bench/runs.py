"""Training runs for the benchmarks that train (convergence, reproduce): each in its own folder and process,
kept or resumed when asked to, so that a suite stopped at any point continues where it stopped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..config import ConfigError, load_config


def same_run(config, folder: Path) -> bool:
    """Whether ``folder`` holds a run (finished or not) of these settings, as the trainer would resume it
    (``steps``, intervals and the like may differ: a longer budget continues a finished run)."""
    from ..train import DEFINING_KEYS

    saved = folder / "config.yaml"
    if not saved.is_file():
        return False
    saved, current = yaml.safe_load(saved.read_text()), config.to_dict()
    return all(saved.get(key) == current[key] for key in DEFINING_KEYS)


def ended(summary: dict | None, steps: int) -> bool:
    """Whether a run's ``summary`` says it has ended: all ``steps`` trained, or stopped early by its patience
    (a stopped run is not continued by a longer budget)."""
    return summary is not None and (summary.get("steps") == steps or summary.get("early_stopped_at") is not None)


def finished(config, folder: Path) -> bool:
    """Whether ``folder`` holds a run that ended after ``config.steps`` steps (its ``summary.json`` says so)."""
    summary = folder / "summary.json"
    return ended(json.loads(summary.read_text()) if summary.is_file() else None, config.steps)


def train_run(config_path: str, overrides: list[str], folder: Path, resume: bool, label: str) -> dict:
    """Trains ``zotune train --config config_path overrides output_dir=folder`` in a child process (its peak
    memory its own) and returns its resolved config, summary and metric records. With ``resume`` a finished
    run of the same settings is kept and an unfinished one continues from its newest checkpoint; otherwise,
    or for other settings, the folder starts over."""
    overrides = [*overrides, f"output_dir={folder}"]
    resolved = load_config(config_path, overrides)  # a bad override fails here, before the run starts
    if not (resume and same_run(resolved, folder)):
        shutil.rmtree(folder, ignore_errors=True)  # else the trainer would resume an earlier run there
    if not (resume and finished(resolved, folder)):
        done = subprocess.run([sys.executable, "-m", "zotune.cli", "train", "--config", config_path, *overrides])
        if done.returncode != 0:
            raise ConfigError(f"the {label} run failed (exit code {done.returncode}); its output is above")
    return dict(
        config=yaml.safe_load((folder / "config.yaml").read_text()),
        summary=json.loads((folder / "summary.json").read_text()),
        records=[json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()],
    )


def dev_curve(records: list[dict]) -> list[tuple[float, int, float]]:
    """(dev metric, forward passes, seconds) at each dev evaluation, in order."""
    by_step = {r["step"]: r for r in records if "loss" in r}
    return [
        (r["value"], by_step.get(r["step"], {}).get("forward_passes", 0), by_step.get(r["step"], {}).get("seconds", 0.0))
        for r in records
        if r.get("split") == "dev"
    ]
