"""Admission of requests: their ids, and the bound on requests accepted but not yet scheduled
(the waiting queue). The in-process Engine and the engine-core client (a frontend's face of
the engine process) both admit through this, so they refuse alike."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sized


class QueueFullError(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class Admission:
    """Request ids (increasing from 1) and the set of admitted requests still waiting."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._ids = itertools.count(1)
        self._waiting: set[int] = set()
        self._lock = threading.Lock()

    def admit(self, prompt_ids: Sized) -> int:
        """A new request id, counted as waiting. ValueError for an empty prompt,
        QueueFullError when max_waiting requests wait already."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(
                    f"the waiting queue is full ({self.max_waiting} requests); retry later"
                )
            request_id = next(self._ids)
            self._waiting.add(request_id)
        return request_id

    def left(self, request_ids: Iterable[int]) -> None:
        """These requests wait no more (scheduled, finished, or never sent)."""
        with self._lock:
            self._waiting.difference_update(request_ids)

    def clear(self) -> None:
        with self._lock:
            self._waiting.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)
