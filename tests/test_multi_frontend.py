"""`kuiper serve-inference --frontends 2`, end to end over TLS with a bearer token: two gRPC
frontend processes on one port (SO_REUSEPORT) over one engine-core process.

Every call goes over its own TCP connection (a local subchannel pool), so the kernel spreads
them over both frontends; which frontend holds a stream is read from /metrics, where
`kuiper_inference_frontend_streams` has one series per frontend process (label pid), and the
scrape shows the whole server's counters. Oracles: `LLM` in process for the ids, gRPC status
codes, the metrics' KV block count, and the process table for who is alive. The tests share
one stack and run in file order (draining it is the last one).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from servers import health_status, self_signed_cert
from servers import wait_until as wait_until_20s
from serving_stack import (  # noqa: F401  (fixture)
    INFERENCE_SERVICE,
    StackSecurity,
    run_stack,
    start_tokenizer,
    tiny_model,
)

from inference_service.sampling.params import SamplingParams

if not hasattr(os, "sched_getaffinity") or not os.path.exists("/proc/self/status"):
    pytest.skip("several frontends need Linux (SO_REUSEPORT)", allow_module_level=True)

TOKEN = "mf-s3cret"
SERVING = health_pb2.HealthCheckResponse.SERVING
LONG = ipb.SamplingParams(max_new_tokens=1800, ignore_eos=True, temperature=0.0)
BATCH, WAITING = 16, 2
RESTART_S = 4.0  # --engine-restart-timeout (a margin over a loaded machine's pauses)


wait_until = functools.partial(wait_until_20s, timeout=30.0)  # a restart takes longer


@pytest.fixture(scope="module")
def security(tmp_path_factory) -> StackSecurity:
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    return StackSecurity(cert, key, TOKEN)


@pytest.fixture(scope="module")
def stack(tiny_model, security):  # noqa: F811
    with run_stack(
        tiny_model, "--frontends", "2", "--num-kv-blocks", "1024", "--block-size", "8",
        "--max-batch-size", str(BATCH), "--max-waiting", str(WAITING),
        "--engine-stall-timeout", "1", "--engine-restart-timeout", str(RESTART_S),
        security=security,
    ) as s:  # fmt: skip
        # Health answers once frontend 0 serves; frontend 1 binds the port after its warm-up.
        wait_until(lambda: "frontend 1 of 2 SERVING" in s.inference.log_text(), timeout=60,
                   what="frontend 1 to serve")  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def llm(tiny_model):  # noqa: F811
    from inference_service.llm import LLM

    return LLM(tiny_model, device="cpu")


def channel(stack, security, token: str | None = TOKEN) -> grpc.Channel:
    """A channel with its own TCP connection (grpc shares connections between channels of
    one process otherwise)."""
    creds = grpc.ssl_channel_credentials(root_certificates=security.cert.read_bytes())
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(stack.address, creds,
                               options=[("grpc.use_local_subchannel_pool", 1)])  # fmt: skip


def generate(ch: grpc.Channel, text: str, sampling=LONG, timeout: float = 60):
    stub = igrpc.InferenceServiceStub(ch)
    return stub.Generate(ipb.GenerateRequest(text=text, sampling=sampling), timeout=timeout)


def greedy(ch: grpc.Channel, text: str, n: int = 8) -> list[int]:
    sampling = ipb.SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.0)
    return [t for r in generate(ch, text, sampling) for t in r.token_ids]


def streams_by_pid(stack) -> dict[int, float]:
    out = {}
    for key, value in stack.metrics().items():
        m = re.match(r'kuiper_inference_frontend_streams\{pid="(\d+)"\}', key)
        if m:
            out[int(m.group(1))] = value
    return out


def frontend_pids(stack) -> list[int]:
    """Frontend 0 (the server process) and the live frontend 1, from the server's log."""
    started = re.findall(r"frontend 1 started \(pid (\d+)\)", stack.inference.log_text())
    return [stack.inference.pid, int(started[-1])]


def core_pid(stack) -> int:
    pids = re.findall(r"engine process(?: restarted \(pid| ) ?(\d+)\)?",
                      stack.inference.log_text())  # fmt: skip
    return int(pids[-1])


class Streams:
    """Long streams, one connection each, read by threads; records how each ended."""

    def __init__(self, stack, security):
        self.stack, self.security = stack, security
        self.calls, self.channels, self.threads = [], [], []
        self.tokens: list[int] = []
        self.errors: list[grpc.RpcError | None] = []

    def open(self, n: int, sampling=LONG) -> None:
        for _ in range(n):
            i = len(self.calls)
            ch = channel(self.stack, self.security)
            call = generate(ch, f"story {i}", sampling)
            self.channels.append(ch)
            self.calls.append(call)
            self.tokens.append(0)
            self.errors.append(None)
            t = threading.Thread(target=self._read, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
            # one at a time: the queue holds only WAITING not yet scheduled
            wait_until(lambda i=i: self.tokens[i] or self.errors[i], what="the stream to run")
            assert self.errors[i] is None, self.errors[i]

    def open_on_both(self, at_least: int, most: int = BATCH) -> None:
        """Open streams until both frontends hold one (connections land where the kernel
        hashes them)."""
        self.open(at_least)
        while len([v for v in streams_by_pid(self.stack).values() if v > 0]) < 2:
            assert len(self.calls) < most, streams_by_pid(self.stack)
            self.open(1)

    def _read(self, i: int) -> None:
        try:
            for resp in self.calls[i]:
                self.tokens[i] += len(resp.token_ids)
        except grpc.RpcError as exc:
            self.errors[i] = exc

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self.join(10)
        for ch in self.channels:
            ch.close()


def kv_back_to_zero(stack) -> None:
    wait_until(lambda: stack.metrics().get("kuiper_inference_kv_blocks_used") == 0
               and stack.metrics().get("kuiper_inference_num_requests_running") == 0,
               what="every KV block back")  # fmt: skip


def test_tls_and_token_on_every_frontend(stack, security, llm):
    want = [c.token_id for c in llm.generate("hello world", SamplingParams(
        max_new_tokens=8, temperature=0.0, ignore_eos=True))]  # fmt: skip
    for _ in range(6):
        with channel(stack, security) as ch:
            assert greedy(ch, "hello world") == want
        for token in (None, "wrong"):
            with channel(stack, security, token) as ch, pytest.raises(grpc.RpcError) as err:
                greedy(ch, "hello world")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    m = stack.metrics()
    assert m['kuiper_inference_requests_total{code="OK",method="Generate"}'] == 6
    assert m['kuiper_inference_requests_total{code="UNAUTHENTICATED",method="Generate"}'] == 12


def test_streams_spread_over_both_frontends_then_queue_full_then_cancel(stack, security):
    streams = Streams(stack, security)
    try:
        streams.open(BATCH)  # 16 connections: all on one frontend has odds 2**-15
        by_pid = streams_by_pid(stack)
        assert sorted(by_pid) == sorted(frontend_pids(stack))
        assert all(v > 0 for v in by_pid.values()), by_pid
        assert sum(by_pid.values()) == BATCH
        assert stack.metrics()["kuiper_inference_num_requests_running"] == BATCH
        # the batch is full: WAITING more wait, the next is refused wherever it lands
        waiting = [generate(channel(stack, security), f"wait {i}") for i in range(WAITING)]
        wait_until(lambda: stack.metrics().get("kuiper_inference_num_requests_waiting")
                   == WAITING, what="the queue to fill")  # fmt: skip
        for i in range(4):
            with channel(stack, security) as ch, pytest.raises(grpc.RpcError) as err:
                list(generate(ch, f"refused {i}"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in err.value.details()
        for call in waiting:
            call.cancel()
    finally:
        streams.close()
    kv_back_to_zero(stack)
    key = 'kuiper_inference_requests_total{code="CANCELLED",method="Generate"}'
    wait_until(lambda: stack.metrics().get(key, 0) >= BATCH + WAITING, what="cancels counted")
    assert streams_by_pid(stack)[stack.inference.pid] == 0


def test_deadlines_on_every_frontend(stack, security):
    for i in range(6):
        with channel(stack, security) as ch, pytest.raises(grpc.RpcError) as err:
            grpc.channel_ready_future(ch).result(
                timeout=10
            )  # connected: the deadline is the call's
            # 0.2 s: well short of 1800 tokens (about 0.5 s alone on a quiet machine)
            list(generate(ch, f"deadline {i}", timeout=0.2))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    kv_back_to_zero(stack)


def test_tokenizer_down_then_back(stack, security):
    port = stack.tokenizer.port
    stack.tokenizer.kill()
    for i in range(6):
        with channel(stack, security) as ch, pytest.raises(grpc.RpcError) as err:
            greedy(ch, f"hello {i}")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "tokenizer service" in err.value.details()
    stack.tokenizer = start_tokenizer(stack.model, port, security)
    stack.tokenizer.wait_ready(60)

    def all_succeed() -> bool:
        for i in range(6):
            with channel(stack, security) as ch:
                try:
                    if len(greedy(ch, f"hello {i}", 3)) != 3:
                        return False
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    return False
        return True

    wait_until(all_succeed, timeout=30, what="both frontends to reach the new tokenizer")


def test_killing_one_frontend_leaves_the_other_serving(stack, security):
    streams = Streams(stack, security)
    try:
        streams.open_on_both(4)
        first, child = frontend_pids(stack)
        on_first = int(streams_by_pid(stack)[first])
        os.kill(child, signal.SIGKILL)
        # the killed frontend's streams break; frontend 0's go on
        wait_until(lambda: sum(e is not None for e in streams.errors)
                   == len(streams.calls) - on_first, what="the killed frontend's streams to end")  # fmt: skip
        before = list(streams.tokens)
        for _ in range(6):  # new connections all reach the live frontend
            with channel(stack, security) as ch:
                assert len(greedy(ch, "still there", 3)) == 3
        alive = [i for i, e in enumerate(streams.errors) if e is None]
        assert len(alive) == on_first
        # still streaming, or already done with every token
        assert all(streams.tokens[i] > before[i] or streams.tokens[i] == LONG.max_new_tokens
                   for i in alive), (before, streams.tokens)  # fmt: skip
        assert health_status(stack.address, INFERENCE_SERVICE,
                             credentials=stack.inference.credentials) == SERVING  # fmt: skip
    finally:
        streams.close()
    # the core aborted the dead frontend's requests; frontend 0 starts a new frontend 1
    kv_back_to_zero(stack)
    wait_until(lambda: frontend_pids(stack)[1] != child, what="frontend 1 to be started again")
    wait_until(lambda: len(streams_by_pid(stack)) == 2, what="frontend 1 to serve again")
    assert child not in streams_by_pid(stack)  # its live gauge is dropped


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_engine_core_death_or_wedge_ends_every_stream_and_service_resumes(stack, security, sig):
    with channel(stack, security) as ch:
        before = greedy(ch, "hello there")
    streams = Streams(stack, security)
    try:
        streams.open_on_both(4)
        pid = core_pid(stack)
        os.kill(pid, getattr(signal, sig))
        hit = time.monotonic()
        saw_not_serving = wait_until(
            lambda: (
                health_status(stack.address, INFERENCE_SERVICE, 0.5, stack.inference.credentials)
                != SERVING
            ),  # fmt: skip
            timeout=RESTART_S + 10,
            what="health to leave SERVING",
        )
        assert saw_not_serving
        assert streams.join(RESTART_S + 10), "a stream hung after the engine died"
        took = time.monotonic() - hit
        for err in streams.errors:
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine process" in err.details() and "retry" in err.details()
        if sig == "SIGSTOP":
            assert took >= 1.0  # it waited for the heartbeat to go stale first
            assert any("stopped responding" in e.details() for e in streams.errors)
    finally:
        streams.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # only if the test failed before it was killed
    stack.inference.wait_ready(60, INFERENCE_SERVICE)

    def both_serve() -> bool:
        for _ in range(6):
            with channel(stack, security) as ch:
                try:
                    assert greedy(ch, "hello there") == before
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    return False
        return True

    wait_until(both_serve, timeout=30, what="service to resume on both frontends")
    assert core_pid(stack) != pid
    assert stack.inference.proc.poll() is None


def test_sigterm_drains_every_frontend_then_exits_0(stack, security):
    streams = Streams(stack, security)
    streams.open_on_both(4)  # 1800 tokens each: well inside the grace period (20 s)
    pids = frontend_pids(stack)
    stack.inference.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: (
            health_status(stack.address, INFERENCE_SERVICE, 0.5, stack.inference.credentials)
            != SERVING
        ),  # fmt: skip
        what="health to leave SERVING",
    )
    # Frontend 1 drains once frontend 0 has passed SIGTERM on; a connection can reach it
    # in between (SO_REUSEPORT picks the process), so the late call comes after that.
    wait_until(lambda: re.search(r"frontend1 .*draining", stack.inference.log_text()),
               what="frontend 1 to drain")  # fmt: skip
    late = None
    with channel(stack, security) as ch, contextlib.suppress(grpc.RpcError):
        greedy(ch, "late", 2)
        late = "served"
    assert late is None, "a new request was served while draining"
    assert streams.join(60)
    assert stack.inference.proc.wait(60) == 0
    for err, got in zip(streams.errors, streams.tokens, strict=True):
        assert err is None and got == LONG.max_new_tokens
    wait_until(lambda: not os.path.exists(f"/proc/{pids[1]}"), what="frontend 1 to exit")
    assert re.search(r"frontend1 .*draining", stack.inference.log_text())
