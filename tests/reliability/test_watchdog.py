"""Finding 9: a wedged engine thread turns health NOT_SERVING, and back once it recovers.

In process, with the fake backend (tests/fake_backend.py) whose step can be held: the oracle is
what the watchdog reports to its health callback while the step is held and after."""

from __future__ import annotations

import asyncio
import time

from fake_backend import FakeBackend

from inference_service.engine.engine import Engine
from inference_service.sampling.params import SamplingParams
from inference_service.watchdog import engine_problem, watch_engine


def test_a_wedged_step_turns_health_not_serving_and_back():
    backend = FakeBackend(num_blocks=16, block_size=4, step_delay_s=3600.0)  # held until set
    engine = Engine(backend)
    engine.start()
    seen: list[tuple[float, bool]] = []

    async def record(serving: bool) -> None:
        seen.append((time.monotonic(), serving))

    async def scenario() -> None:
        watch = asyncio.create_task(watch_engine(engine, record, stall_s=1.5, period_s=0.05))
        await asyncio.sleep(2.5)  # idle: the heartbeat keeps beating, no alarm
        assert seen == []
        engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0.0))
        wedged = time.monotonic()
        while not seen and time.monotonic() < wedged + 10:
            await asyncio.sleep(0.05)
        assert [s for _, s in seen] == [False], "the wedged engine was not reported"
        assert seen[0][0] - wedged < 4.0
        backend._event.set()  # the step finishes: the engine recovers
        while len(seen) < 2 and time.monotonic() < wedged + 20:
            await asyncio.sleep(0.05)
        assert [s for _, s in seen] == [False, True]
        watch.cancel()

    try:
        asyncio.run(scenario())
    finally:
        backend.step_delay_s = 0.0
        backend._event.set()
        engine.stop()
    assert engine_problem(engine, stall_s=1.5) == "the engine thread has stopped"
