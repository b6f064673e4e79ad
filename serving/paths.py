"""Where mmrag keeps what it generates (the tiny model, the Milvus Lite file), shared by every layer."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MMRAG_CACHE_DIR`` or ``~/.cache/mmrag``."""
    return Path(os.environ.get("MMRAG_CACHE_DIR", Path.home() / ".cache" / "mmrag"))
