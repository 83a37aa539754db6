"""The load generator: worker processes (so the client is not the bottleneck: each has its own
interpreter, event loop and gRPC channel), each running its share of the concurrent callers,
reporting every call's timings to the parent in batches.

Pacing (--rps) is global: the call numbered k (over all workers) starts no earlier than
k / rps seconds after the common start, and every call due before the duration's deadline is
made, late or not. A run ends after `total` calls, or at the `duration`
deadline (calls in progress then finish and count), or on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kuiper_serve.cli.bench.calls import Call, RequestData, resolve_call

FLUSH_S = 0.2  # how often a worker hands its results to the parent


@dataclass(frozen=True)
class Plan:
    call: str
    target: str
    data: str = "{}"
    total: int = 200  # 0: no limit (use duration)
    concurrency: int = 50
    rps: float = 0.0  # 0: as fast as the callers go
    duration_s: float = 0.0  # 0: until `total`
    timeout_s: float = 60.0
    workers: int = 1
    metadata: tuple[tuple[str, str], ...] = ()
    tls: bool = False
    tls_ca: str | None = None
    authority: str | None = None


@dataclass(frozen=True)
class CallResult:
    start: float  # seconds after the run's common start
    latency: float  # seconds, start to the final status
    status: str  # grpc.StatusCode name
    error: str = ""
    first: float | None = None  # seconds to the first response (first token, for token streams)
    gaps: tuple[float, ...] = ()  # inter-token latencies, one per token after the first
    tokens: int = 0  # generated tokens received (token streams)


@dataclass
class RunResult:
    results: list[CallResult] = field(default_factory=list)
    wall_s: float = 0.0
    end_reason: str = "normal"  # ghz's: normal | timeout (duration reached) | cancel


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------------------------- worker


def _open_channel(plan: Plan) -> grpc.aio.Channel:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if plan.authority:
        options.append(("grpc.default_authority", plan.authority))
    if plan.tls or plan.tls_ca:
        ca = Path(plan.tls_ca).read_bytes() if plan.tls_ca else None
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.aio.secure_channel(plan.target, creds, options=options)
    return grpc.aio.insecure_channel(plan.target, options=options)


class _Caller:
    """One call of any of the four kinds, timed."""

    def __init__(self, channel: grpc.aio.Channel, call: Call, plan: Plan) -> None:
        self.call = call
        self.plan = plan
        ser, de = call.request_cls.SerializeToString, call.response_cls.FromString
        kind = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(call.client_streaming, call.server_streaming)]
        self.stub = kind(call.path, request_serializer=ser, response_deserializer=de)

    async def __call__(self, messages: list, t0: float) -> CallResult:
        start = time.monotonic()
        first: float | None = None
        gaps: list[float] = []
        tokens = 0
        last = start
        counts_tokens = self.call.counts_tokens
        request = messages[0] if not self.call.client_streaming else _aiter(messages)
        kwargs = {"timeout": self.plan.timeout_s, "metadata": self.plan.metadata}
        try:
            if self.call.server_streaming:
                async for resp in self.stub(request, **kwargs):
                    now = time.monotonic()
                    k = len(resp.token_ids) if counts_tokens else 1
                    if k == 0:
                        continue  # e.g. a final message with only finish_reason and usage
                    if first is None:
                        first = now - start
                        gaps.extend([0.0] * (k - 1))  # came with the first token
                    else:
                        gaps.extend([(now - last) / k] * k)
                    last = now
                    tokens += k if counts_tokens else 0
            else:
                await self.stub(request, **kwargs)
            status, error = "OK", ""
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
            error = f"rpc error: code = {go_code_name(status)} desc = {exc.details()}"
        end = time.monotonic()
        return CallResult(start - t0, end - start, status, error, first, tuple(gaps), tokens)


async def _aiter(messages: list) -> AsyncIterator:
    for m in messages:
        yield m


def go_code_name(name: str) -> str:
    """grpc.StatusCode name → the name ghz (Go's codes.Code) prints: INVALID_ARGUMENT →
    InvalidArgument, CANCELLED → Canceled."""
    if name == "CANCELLED":
        return "Canceled"
    return "".join(p.capitalize() for p in name.split("_")) if name != "OK" else "OK"


async def _worker_main(plan: Plan, wid: int, n: int, c: int, out, go, start_at, stop) -> None:
    call = resolve_call(plan.call)
    data = RequestData(call, plan.data)
    channel = _open_channel(plan)
    caller = _Caller(channel, call, plan)
    with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
        await asyncio.wait_for(channel.channel_ready(), 10.0)
    out.put(("ready", wid, None))
    await asyncio.to_thread(go.wait)
    t0 = start_at.value
    deadline = t0 + plan.duration_s if plan.duration_s > 0 else None
    buffer: list[CallResult] = []
    next_k = 0
    workers = plan.workers

    async def loop() -> None:
        nonlocal next_k
        while not stop.is_set():
            k = next_k
            if n and k >= n:
                return
            next_k += 1
            number = k * workers + wid  # unique over all workers
            if plan.rps > 0:
                # A paced call due before the deadline belongs to the run even when a busy
                # machine starts it late: --rps R -z D makes exactly R * D calls.
                due = t0 + number / plan.rps
                if deadline is not None and due >= deadline:
                    return
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
            elif deadline is not None and time.monotonic() >= deadline:
                return
            buffer.append(await caller(data.messages(number, wid), t0))

    async def flush() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if buffer:
                out.put(("results", wid, buffer[:]))
                buffer.clear()

    flusher = asyncio.create_task(flush())
    await asyncio.gather(*(loop() for _ in range(c)))
    flusher.cancel()
    if buffer:
        out.put(("results", wid, buffer[:]))
    await channel.close()
    out.put(("done", wid, None))


def _worker(plan: Plan, wid: int, n: int, c: int, out, go, start_at, stop) -> None:
    # Ctrl-C reaches the whole process group: the parent sets `stop`, and the calls in
    # progress here finish and are reported instead of being lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_worker_main(plan, wid, n, c, out, go, start_at, stop))
    except KeyboardInterrupt:
        out.put(("done", wid, None))
    except BaseException as exc:  # the parent reports it and stops the run
        out.put(("failed", wid, f"{type(exc).__name__}: {exc}"))


# ---------------------------------------------------------------------------------- parent


def run(plan: Plan, on_results: Callable[[list[CallResult]], None] = lambda r: None) -> RunResult:
    """Run the plan in `plan.workers` processes; `on_results` sees each batch as it arrives
    (for the progress bar). Raises RuntimeError when a worker fails to start."""
    workers = max(1, min(plan.workers, plan.concurrency))
    plan = Plan(**{**plan.__dict__, "workers": workers})
    ctx = mp.get_context("spawn")  # no grpc state is inherited through fork
    out = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    totals = split(plan.total, workers) if plan.duration_s <= 0 else [0] * workers
    conc = split(plan.concurrency, workers)
    procs = [
        ctx.Process(
            target=_worker,
            args=(plan, w, totals[w], conc[w], out, go, start_at, stop),
            daemon=True,
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    result = RunResult()
    try:
        ready = 0
        while ready < workers:
            kind, wid, payload = out.get(timeout=120)
            if kind == "failed":
                raise RuntimeError(f"bench worker {wid}: {payload}")
            ready += kind == "ready"
        start_at.value = time.monotonic() + 0.05
        go.set()
        done = 0
        while done < workers:
            try:
                kind, wid, payload = out.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("bench workers exited without finishing") from None
                continue
            if kind == "results":
                result.results.extend(payload)
                on_results(payload)
            elif kind == "failed":
                raise RuntimeError(f"bench worker {wid}: {payload}")
            done += kind == "done"
        if plan.duration_s > 0:
            result.end_reason = "timeout"
    except KeyboardInterrupt:
        stop.set()
        result.end_reason = "cancel"
        _drain(out, result, procs)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    # The run lasts from the common start to the end of its last call.
    result.wall_s = max((r.start + r.latency for r in result.results), default=0.0)
    return result


def _drain(out, result: RunResult, procs: list) -> None:
    """After Ctrl-C: keep what the workers still send while they finish their calls."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        with contextlib.suppress(queue.Empty, KeyboardInterrupt):
            kind, _, payload = out.get(timeout=0.2)
            if kind == "results":
                result.results.extend(payload)
