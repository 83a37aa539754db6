"""Model files are read through one read-only mmap (shared by the safetensors and GGUF readers)."""

from __future__ import annotations

import mmap
from pathlib import Path

from inference_service.models.config import ModelLoadError


def map_readonly(path: Path) -> mmap.mmap:
    """The whole file, mapped read-only. ModelLoadError when it cannot be opened or mapped
    (missing, unreadable, empty)."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot open: {exc}") from None
