"""Liveness from the engine's heartbeat: a wedged engine thread turns health NOT_SERVING.

Once SERVING, health used to stay SERVING whatever the engine did. The engine thread stamps
`Engine.heartbeat` every time round its loop (at least once a second when idle); a stamp older
than `stall_s`, or a dead thread, means no request will make progress. The watchdog then sets
health NOT_SERVING (Kubernetes' liveness probe restarts the pod) and says so in the log; if
the engine recovers (a step that was only slow), health goes back to SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger("kuiper.inference")

DEFAULT_STALL_S = 60.0  # longer than any legitimate step (a long prefill chunk, graph capture)
# An engine process this long without a heartbeat is killed and restarted by the frontend
# that started it (engine_core/client.py); the single-process engine cannot be.
DEFAULT_RESTART_S = 120.0


class _Beating(Protocol):
    heartbeat: float

    @property
    def alive(self) -> bool: ...


def engine_problem(engine: _Beating, stall_s: float, now: float | None = None) -> str | None:
    """Why the engine cannot serve (dead thread, stale heartbeat), or None when it can."""
    if not engine.alive:
        return "the engine thread has stopped"
    age = (time.monotonic() if now is None else now) - engine.heartbeat
    if age > stall_s:
        return f"the engine thread has not come round its loop for {age:.0f}s (limit {stall_s:g}s)"
    return None


async def watch_engine(
    engine: _Beating,
    set_serving: Callable[[bool], Awaitable[None]],
    stall_s: float = DEFAULT_STALL_S,
    period_s: float = 1.0,
) -> None:
    """Run until cancelled: health follows engine_problem()."""
    healthy = True
    while True:
        await asyncio.sleep(period_s)
        problem = engine_problem(engine, stall_s)
        if problem is not None and healthy:
            log.error("health NOT_SERVING: %s", problem)
            await set_serving(False)
        elif problem is None and not healthy:
            log.warning("engine recovered: health SERVING again")
            await set_serving(True)
        healthy = problem is None
