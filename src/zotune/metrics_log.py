"""A run's ``metrics.jsonl``: one record per step, evaluation and note; and the run's peak memory."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


class MetricsLog:
    """Append-only JSONL; on resume, the records written after the checkpoint are dropped (they will be redone), and
    the kept ones are handed to the sinks again, which start afresh. ``count``: the records in the file, which a
    checkpoint saves as ``metrics_records``."""

    def __init__(
        self, path: Path, resume_step: int | None, enabled: bool = True, sinks=(), resume_records: int | None = None
    ) -> None:
        """``resume_step``: the step of the checkpoint resumed from (None: a fresh run, whose file starts empty);
        ``resume_records``: how many records had been written when it was saved, those kept. Kept by step, the
        records of its step written after it (the final dev evaluation and the test of a run that ended there)
        would be logged twice, so the step is the rule only for checkpoints written before they held the count."""
        self.path, self.enabled = path, enabled  # disabled on every rank but the first of a distributed run
        self.count = 0
        self.sinks = list(sinks)  # more writers of each record (zotune.tensorboard_log)
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            lines = path.read_text().splitlines()
            if resume_records is None:
                kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
            else:
                kept = lines[:resume_records]
            path.write_text("".join(line + "\n" for line in kept))
            self.count = len(kept)
            for record in map(json.loads, kept):
                for sink in self.sinks:
                    sink.write(record)

    def write(self, record: dict) -> None:
        """Appends ``record`` as one JSON line and hands it to each sink; nothing when disabled."""
        if not self.enabled:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        self.count += 1
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Closes the sinks (their files)."""
        for sink in self.sinks:
            sink.close()

    def records(self) -> list[dict]:
        """Every record in the file, in order: a resumed run's include those kept from before it resumed."""
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def peak_memory_mb(device: torch.device | None = None) -> float:
    """The CUDA allocator's peak on a GPU run, else the process's peak resident set."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
