"""The engine-core process: the step codec between it and the frontend, engine death mid-stream
(every stream ends UNAVAILABLE, health NOT_SERVING, the core restarts, service resumes), and
the single-process mode serving the same ids."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper_client import KuiperClient
from servers import health_status
from serving_stack import INFERENCE_SERVICE, run_stack, tiny_model  # noqa: F401  (fixture)

from inference_service.engine.engine import RequestOutput, StepStats
from inference_service.engine.sequence import FinishReason
from inference_service.engine_core import protocol as proto
from inference_service.sampling.params import SampleOutput

SERVING = health_pb2.HealthCheckResponse.SERVING
LONG = ipb.SamplingParams(max_new_tokens=1800, ignore_eos=True, temperature=0.0)


def _stats(batch: int) -> StepStats:
    return StepStats(batch, 0, batch, batch, 3, 10, 0, 0, 0, 0.001)


def test_step_codec_keeps_every_field_and_the_order_per_request():
    enc = proto.StepEncoder()
    lp = [SampleOutput(7, -0.5, [(7, -0.5), (3, -1.0)])]
    steps = [
        [RequestOutput(1, [5], queue_time_s=0.25, num_prompt_tokens=4),  # first: queue time
         RequestOutput(2, [6], queue_time_s=0.5)],
        [RequestOutput(1, [8], queue_time_s=0.25), RequestOutput(2, [9], queue_time_s=0.5)],
        [RequestOutput(1, [10, 11], queue_time_s=0.25),
         RequestOutput(2, [7], lp, FinishReason.LENGTH, 4, 2, 0.5)],
        [RequestOutput(3, [], finish_reason=FinishReason.ERROR, error="backend error: x")],
    ]  # fmt: skip
    # step 1 alone, then steps 2-4 merged into one message (a frontend that read late)
    first = proto.decode_step(proto.loads(enc.encode(proto.StepBatch(steps[0], [_stats(2)]))))
    later = [o for s in steps[1:] for o in s]
    merged = proto.decode_step(
        proto.loads(enc.encode(proto.StepBatch(later, [_stats(2), _stats(2), _stats(1)])))
    )
    assert [s.batch_size for s in merged.stats] == [2, 2, 1]
    got = first.outputs + merged.outputs
    by_req = {rid: [o for o in got if o.request_id == rid] for rid in (1, 2, 3)}
    assert [o.new_token_ids for o in by_req[1]] == [[5], [8], [10, 11]]
    assert [o.new_token_ids for o in by_req[2]] == [[6], [9], [7]]
    # the queue time travels with the first output and the last one only
    assert [o.queue_time_s for o in by_req[1]] == [0.25, None, None]
    assert by_req[1][0].num_prompt_tokens == 4
    last = by_req[2][-1]
    assert (last.finish_reason, last.new_logprobs, last.queue_time_s) == (
        FinishReason.LENGTH, lp, 0.5)  # fmt: skip
    assert (last.num_prompt_tokens, last.num_cached_prompt_tokens) == (4, 2)
    assert by_req[3][0].error == "backend error: x"


def _children(pid: int) -> list[int]:
    """Child processes of pid, whichever of its threads started them."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.exists():
        pytest.skip("needs Linux /proc to find the engine process")
    out = []
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def _engine_pid(server_pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(server_pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                return child
        time.sleep(0.05)
    raise AssertionError("no engine process under the server")


def _greedy(address: str, prompt: str) -> list[int]:
    with KuiperClient(address, timeout=60) as client:
        return client.complete(
            prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True
        ).token_ids


def test_engine_process_death_mid_stream(tiny_model):  # noqa: F811
    with run_stack(tiny_model) as stack:
        before = _greedy(stack.address, "hello there")
        engine_pid = _engine_pid(stack.inference.pid)
        channel = grpc.insecure_channel(stack.address)
        stub = igrpc.InferenceServiceStub(channel)
        calls = [
            stub.Generate(ipb.GenerateRequest(text=f"story {i}", sampling=LONG), timeout=120)
            for i in range(4)
        ]
        streams = [iter(c) for c in calls]
        for s in streams:
            assert next(s).token_ids  # all four run
        errors: list[grpc.RpcError | None] = [None] * 4

        def drain(i: int) -> None:
            try:
                for _ in streams[i]:
                    pass
            except grpc.RpcError as exc:
                errors[i] = exc

        readers = [threading.Thread(target=drain, args=(i,)) for i in range(4)]
        for r in readers:
            r.start()
        os.kill(engine_pid, signal.SIGKILL)
        killed = time.monotonic()
        saw_not_serving = False
        while time.monotonic() - killed < 10:
            status = health_status(stack.address, INFERENCE_SERVICE)
            if status is not None and status != SERVING:
                saw_not_serving = True
                break
            time.sleep(0.02)
        for r in readers:
            r.join(10)
        ended_in = time.monotonic() - killed
        assert not any(r.is_alive() for r in readers), "a stream hung after the engine died"
        assert ended_in < 10
        for err in errors:
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine process exited" in err.details()
        assert saw_not_serving, "health stayed SERVING while the engine process restarted"
        stack.inference.wait_ready(60, INFERENCE_SERVICE)  # the restarted core serves
        assert _engine_pid(stack.inference.pid) != engine_pid
        assert _greedy(stack.address, "hello there") == before
        assert stack.inference.proc.poll() is None
        assert "engine process restarted" in stack.inference.log_text()
        channel.close()
        assert stack.inference.stop() == 0


def test_single_process_mode_serves_the_same_ids(tiny_model):  # noqa: F811
    with run_stack(tiny_model) as split, run_stack(tiny_model, "--single-process") as single:
        for prompt in ("hello there", "Once upon a time"):
            assert _greedy(single.address, prompt) == _greedy(split.address, prompt)
        assert _children(single.inference.pid) == []  # no engine process
        long = KuiperClient(split.address, timeout=60)
        with long:
            chunks = list(long.generate("hi", max_new_tokens=300, ignore_eos=True))
        # streamed as produced, not in one piece at the end
        assert sum(1 for c in chunks if c.token_ids) > 1
        assert sum(len(c.token_ids) for c in chunks) == 300
