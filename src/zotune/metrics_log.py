"""A run's ``metrics.jsonl``: one record per step, evaluation and note; and the run's peak memory."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


class MetricsLog:
    """Append-only JSONL; on resume, records past the checkpoint's step are dropped (they will be redone), and the
    kept ones are handed to the sinks again, which start afresh."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True, sinks=()) -> None:
        self.path, self.enabled = path, enabled  # disabled on every rank but the first of a distributed run
        self.sinks = list(sinks)  # more writers of each record (zotune.tensorboard_log)
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
            for record in map(json.loads, kept):
                for sink in self.sinks:
                    sink.write(record)

    def write(self, record: dict) -> None:
        """Appends ``record`` as one JSON line and hands it to each sink; nothing when disabled."""
        if not self.enabled:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
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
