"""Finding 9: a wedged engine thread turns health NOT_SERVING, and back once it recovers.

In process, with the fake backend (tests/fake_backend.py) whose step can be held: the oracle is
what the watchdog reports to its health callback while the step is held and after. Served,
with the engine in its own process (the default): the process frozen with SIGSTOP."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import reliability_util
from fake_backend import FakeBackend
from grpc_health.v1 import health_pb2
from kuiper_client import KuiperClient
from servers import health_status
from serving_stack import INFERENCE_SERVICE, run_stack
from test_engine_process import _engine_pid

from inference_service.engine.engine import Engine
from inference_service.sampling.params import SamplingParams
from inference_service.watchdog import engine_problem, watch_engine

tiny_model = reliability_util.tiny_model  # fixture
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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


def test_a_stopped_engine_process_turns_health_not_serving_and_back(tiny_model):  # noqa: F811
    """The default layout: the engine core in its own process, frozen with SIGSTOP (a wedged
    step, as far as the frontend can tell: no heartbeat comes). Health turns NOT_SERVING within
    the stall limit plus the watchdog's period, and SERVING again after SIGCONT; then a request
    is served. Oracle: grpc.health.v1 answers and the log."""
    stall_s = 2.0
    with run_stack(tiny_model, "--engine-stall-timeout", str(stall_s)) as stack:
        engine_pid = _engine_pid(stack.inference.pid)
        os.kill(engine_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            status = None
            while status != NOT_SERVING and time.monotonic() - stopped < stall_s + 10:
                status = health_status(stack.address, INFERENCE_SERVICE)
                time.sleep(0.1)
            noticed_in = time.monotonic() - stopped
        finally:
            os.kill(engine_pid, signal.SIGCONT)
        assert status == NOT_SERVING, "health stayed SERVING with the engine process stopped"
        assert stall_s <= noticed_in < stall_s + 3
        stack.inference.wait_ready(30, INFERENCE_SERVICE)
        with KuiperClient(stack.address, timeout=60) as client:
            out = client.complete("hello", max_new_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 4
        log = stack.inference.log_text()
        assert "health NOT_SERVING: the engine thread has not come round its loop" in log
        assert "engine recovered: health SERVING again" in log
