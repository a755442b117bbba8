"""A run folder's checkpoints, written atomically, and the newest one for resuming."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomically(state: dict, target: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename: a crash leaves the old file or the new one."""
    partial = target.with_suffix(target.suffix + ".tmp")
    with open(partial, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(target)


class Checkpoints:
    """``checkpoint-NNNNNN.pt`` files in the run folder, the newest ``keep`` kept."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("checkpoint-[0-9]*.pt"))

    def save(self, step: int, state: dict) -> Path:
        target = self.folder / f"checkpoint-{step:06d}.pt"
        save_atomically(state, target)
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return target

    def latest(self) -> dict | None:
        paths = self.paths()
        return torch.load(paths[-1], weights_only=False) if paths else None
