"""Where zotune keeps converted models and fetched data ($ZOTUNE_CACHE, else ~/.cache/zotune), and a file's
checksum."""

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The folder of converted models and fetched data: ``$ZOTUNE_CACHE`` if set and not empty, else
    ``~/.cache/zotune`` (not created here)."""
    return Path(os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune")


def file_digest(path: Path) -> str:
    """A file's SHA-256, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
