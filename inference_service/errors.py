"""How a failure inside the service is told to the client of the request it ended, and logged:
one short line each (the exception's type and message, and where it was raised), never a
traceback per request."""

from __future__ import annotations

import traceback
from pathlib import Path


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """'Type: message', cut to limit characters (a message may quote a whole batch)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def raised_at(exc: BaseException) -> str:
    """'file.py:line' of the frame that raised exc ('' when it has no traceback)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
