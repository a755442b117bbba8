"""A run folder's checkpoints, written atomically with a checksum, and the newest readable one for resuming."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import TrainingError
from .paths import file_digest


class _Hashing:
    """A file for ``torch.save`` that hashes what is written through it."""

    def __init__(self, file) -> None:
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _fsynced(path: Path, write: Callable) -> None:
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def checksum_path(path: Path) -> Path:
    """Where the SHA-256 of ``path`` is kept: beside it, ``.sha256`` appended to its name."""
    return path.with_suffix(path.suffix + ".sha256")


def save_atomically(state: dict, target: Path) -> None:
    """``torch.save`` of ``state`` to ``target`` beside its SHA-256 in ``target.sha256``. The data goes to a
    temporary file first and is renamed into place last, after the checksum: a crash leaves the old file, or
    a new checksum beside the old file (which then fails its check), never a damaged file that passes."""
    partial, digests = target.with_suffix(target.suffix + ".tmp"), []

    def write(file) -> None:
        hashing = _Hashing(file)
        torch.save(state, hashing)
        digests.append(hashing.digest.hexdigest())

    _fsynced(partial, write)
    checksum, checksum_partial = checksum_path(target), checksum_path(partial)
    _fsynced(checksum_partial, lambda file: file.write(digests[0].encode()))
    checksum_partial.replace(checksum)
    partial.replace(target)


def load_checked(path: Path) -> dict:
    """The state saved in ``path``; ``ValueError`` naming the problem when it fails its checksum or does not
    load (a file written before checksums existed is only loaded)."""
    checksum = checksum_path(path)
    if checksum.is_file() and file_digest(path) != checksum.read_text().strip():
        raise ValueError("its checksum does not match (a truncated or damaged file)")
    try:
        return torch.load(path, weights_only=False)
    except Exception as error:  # torch reports a damaged zip through several error types
        raise ValueError(f"it does not load ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None


class Checkpoints:
    """``checkpoint-NNNNNN.pt`` files in the run folder, the newest ``keep`` kept, each beside a
    ``.sha256`` file with its checksum, so that a truncated or damaged checkpoint is found before it is used."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep

    def paths(self) -> list[Path]:
        """The folder's ``checkpoint-NNNNNN.pt`` files, oldest first (in the order of their names)."""
        return sorted(self.folder.glob("checkpoint-[0-9]*.pt"))

    def save(self, step: int, state: dict) -> Path:
        """Writes the checkpoint of ``step``, then drops the oldest beyond ``keep``. A write that fails (a full
        disk) removes what it left and keeps every older checkpoint, and stops the run with a one-line error."""
        target = self.folder / f"checkpoint-{step:06d}.pt"
        try:
            save_atomically(state, target)
        except OSError as error:
            for left in (target.with_suffix(".pt.tmp"), checksum_path(target.with_suffix(".pt.tmp"))):
                left.unlink(missing_ok=True)
            kept = ", ".join(path.name for path in self.paths() if path != target) or "none"
            raise TrainingError(
                f"cannot save {target.name} in {self.folder}: {error.strerror or error}; the checkpoints "
                f"kept ({kept}) are untouched: free some space and run the same command to resume "
                "from the newest"
            ) from None
        for old in self.paths()[: -self.keep]:
            old.unlink()
            checksum_path(old).unlink(missing_ok=True)
        return target

    def latest(self, warn: Callable[[str], None] = print) -> dict | None:
        """The newest checkpoint that passes its checksum and loads; each one skipped is warned about. None
        without checkpoints; an error naming each failure when none is readable."""
        failures = []
        for path in reversed(self.paths()):
            try:
                return load_checked(path)
            except ValueError as error:
                problem = str(error)
            failures.append(f"{path.name}: {problem}")
            warn(f"warning: {path} is unusable, {problem}: trying the checkpoint before it")
        if failures:
            raise TrainingError(
                f"no readable checkpoint in {self.folder} ({'; '.join(failures)}): move them away "
                "to start the run again, or use a new output_dir"
            )
        return None
