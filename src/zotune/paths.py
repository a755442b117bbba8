"""Where zotune keeps converted models and fetched data: $ZOTUNE_CACHE, else ~/.cache/zotune."""

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune")
