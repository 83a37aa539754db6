"""The frontend's handle on the engine-core process: the same face the server and router use
on an in-process Engine (submit, abort, output and stats listeners, set_stop_ids, generate,
backend.config / sample_vocab, ...), backed by the core over one pipe.

The *owner* (the first frontend) starts the core as its child and supervises it; other
frontends *attach* to the running core through its `CoreAddress` (their own connection, their
own request ids) and reconnect when it comes back after a restart.

A receiver thread reads one message per batch of engine steps and calls the output listeners
with all of it, as the engine thread does in the single-process server. The frontend keeps
the waiting-queue bound itself (a request counts as waiting until its first output), so
`submit` raises QueueFullError synchronously as Engine.submit does.

When the core process dies, every open request ends at once with an `engine_lost` error
output (the server answers UNAVAILABLE), `on_state(False)` is called (health NOT_SERVING),
and a new core is started with backoff (attached frontends: reconnect); `on_state(True)` once
it is ready again. A core whose engine thread sends no heartbeat for `restart_stalled_s` (a
wedged step, a stopped process) is killed by its owner and restarted the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Client

from inference_service.engine.admission import Admission
from inference_service.engine.engine import (
    Engine,
    EngineStoppedError,
    RequestOutput,
    StepListeners,
)
from inference_service.engine.sequence import FinishReason
from inference_service.engine_core import protocol as proto
from inference_service.engine_core.build import EngineSpec
from inference_service.engine_core.process import CoreAddress, core_main
from inference_service.models.config import ModelConfig
from inference_service.sampling.params import SamplingParams

log = logging.getLogger("kuiper.engine_client")

START_TIMEOUT_S = 900.0  # loading a model (and compiling kernels) on a cold machine
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
RECONNECT_BACKOFF_S = (0.1, 0.2, 0.5, 1.0)  # attached frontends, while the owner restarts it


class EngineStartError(RuntimeError):
    """The engine-core process could not load the model or the backend."""


@dataclass(frozen=True)
class _Limits:
    """Engine settings the server reads (`engine.config.max_batch_size`)."""

    max_batch_size: int
    max_waiting: int


class RemoteBackend:
    """What the frontend knows of the core's backend; setting sample_vocab forwards it."""

    def __init__(self, client: EngineClient, info: proto.CoreInfo):
        self._client = client
        self.config: ModelConfig = info.model_config
        self.device_name = info.device_name
        self.block_size = info.block_size
        self.num_blocks = info.num_blocks
        self._sample_vocab = info.sample_vocab

    @property
    def sample_vocab(self) -> int:
        return self._sample_vocab

    @sample_vocab.setter
    def sample_vocab(self, n: int) -> None:
        self._sample_vocab = int(n)
        self._client._send((proto.SAMPLE_VOCAB, int(n)))


class EngineClient(StepListeners):
    def __init__(
        self,
        spec: EngineSpec,
        on_state: Callable[[bool], None] | None = None,
        *,
        address: CoreAddress | None = None,
        attach: bool = False,
        restart_stalled_s: float = 0.0,
    ):
        """Owner (attach=False): start the core, listening at `address` for more frontends
        when given, and kill + restart it when its heartbeat is older than restart_stalled_s
        (0: never). attach=True: connect to the core running at `address`."""
        if attach and address is None:
            raise ValueError("attaching to an engine core needs its address")
        self.spec = spec
        self.on_state = on_state  # called from the receiver thread: True = serving again
        self.address = address
        self.attached = attach
        self.restart_stalled_s = restart_stalled_s
        self._kill_reason: str | None = None  # why the owner killed its core (a wedge)
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a threaded gRPC process
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._admission = Admission(max_waiting=0)  # the core's bound, once it is READY
        self._open: set[int] = set()  # submitted, not finished
        StepListeners.__init__(self)
        self._stop_ids: tuple[int, ...] | None = None
        self._receiver: threading.Thread | None = None
        self._running = False
        self._stopping = False
        self.restarts = 0
        self.info: proto.CoreInfo | None = None
        self.backend: RemoteBackend | None = None
        self.config: _Limits | None = None
        # The core's engine thread's last time round its loop (time.monotonic is one clock
        # for every process on the machine): the watchdog's view of a wedged core.
        self.heartbeat = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the core and wait until it has loaded the model (blocking: call in a worker
        thread from asyncio). Raises EngineStartError when it cannot."""
        if self._receiver is not None:
            return
        if self.attached:
            self._connect()
        else:
            self._spawn()
        self._receiver = threading.Thread(
            target=self._receive, name="kuiper-core-recv", daemon=True
        )
        self._receiver.start()
        if not self.attached and self.restart_stalled_s > 0:
            threading.Thread(target=self._watch, name="kuiper-core-watch", daemon=True).start()

    def _connect(self) -> None:
        """Attach to the running core (raises EngineStartError when it does not answer)."""
        assert self.address is not None
        try:
            conn = Client(self.address.path, family="AF_UNIX", authkey=self.address.authkey)
        except (OSError, EOFError) as exc:
            raise EngineStartError(f"cannot reach the engine process ({exc})") from None
        try:
            if not conn.poll(START_TIMEOUT_S):
                raise EngineStartError("the engine process did not answer")
            msg = proto.loads(conn.recv_bytes())
        except (EOFError, OSError):
            conn.close()
            raise EngineStartError("the engine process closed the connection") from None
        self._ready(None, conn, msg[1])

    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=core_main, args=(child, self.spec, self.address), name="kuiper-engine-core",
            daemon=True,
        )  # fmt: skip
        proc.start()
        child.close()  # only the core holds its end: its death reads as EOF here
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise EngineStartError(f"the engine process did not start in {START_TIMEOUT_S:g}s")
            msg = proto.loads(parent.recv_bytes())
        except (EOFError, OSError):
            proc.join(5.0)
            raise EngineStartError(
                f"the engine process exited (code {proc.exitcode}) while loading"
            ) from None
        except EngineStartError:
            proc.kill()
            raise
        if msg[0] == proto.FATAL:
            proc.join(10.0)
            raise EngineStartError(msg[1])
        self._ready(proc, parent, msg[1])

    def _ready(self, proc, conn, info: proto.CoreInfo) -> None:
        """A core answered READY on `conn`: use it (tell it what the previous one was told)."""
        self.heartbeat = time.monotonic()
        old_vocab = self.backend.sample_vocab if self.backend is not None else None
        self._proc, self._conn, self.info = proc, conn, info
        self.backend = RemoteBackend(self, info)
        self.config = _Limits(info.max_batch_size, info.max_waiting)
        self._admission.max_waiting = info.max_waiting
        # a restarted core gets what the server told the previous one
        if self._stop_ids is not None:
            self._send((proto.STOP_IDS, self._stop_ids))
        if old_vocab is not None and old_vocab != info.sample_vocab:
            self.backend.sample_vocab = old_vocab
        self._running = True

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the core (it cancels what still runs) and wait for it. Attached: only leave
        it (the core aborts whatever of ours still runs)."""
        self._stopping = True
        if self.attached:
            with self._send_lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            if self._receiver is not None:
                self._receiver.join(timeout)
            self._running = False
            return
        if self._proc is None:
            return
        with contextlib.suppress(EngineStoppedError):
            self._send((proto.STOP,))
        if self._receiver is not None:
            self._receiver.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._running = False

    @property
    def alive(self) -> bool:
        if self.attached:
            return self._running and self._conn is not None
        return self._running and self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        """The core process's id."""
        if self._proc is not None:
            return self._proc.pid
        return self.info.pid if self.info is not None else None

    # ---- the Engine's face -----------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def num_blocks(self) -> int:
        return self.info.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.info.capacity_tokens

    @property
    def num_waiting_requests(self) -> int:
        return len(self._admission)

    def set_stop_ids(self, stop_ids: Iterable[int]) -> None:
        self._stop_ids = tuple(sorted(set(stop_ids)))
        self._send((proto.STOP_IDS, self._stop_ids))

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if not self.alive:
            raise EngineStoppedError("the engine process is not running (restarting?); retry")
        rid = self._admission.admit(prompt_ids)
        with self._lock:
            self._open.add(rid)
        try:
            self._send((proto.ADD, rid, [int(t) for t in prompt_ids], params))
        except EngineStoppedError:
            self._admission.left([rid])
            with self._lock:
                self._open.discard(rid)
            raise
        return rid

    def abort(self, request_id: int) -> None:
        with self._lock:
            if request_id not in self._open:
                return
        with contextlib.suppress(EngineStoppedError):  # a gone core ended it already
            self._send((proto.ABORT, request_id))

    generate = Engine.generate  # the same blocking helper (warm-up, tests) over this face

    # ---- pipe ------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        data = proto.dumps(message)
        with self._send_lock:
            conn = self._conn
            if conn is None:
                raise EngineStoppedError("the engine process is not running")
            try:
                conn.send_bytes(data)
            except OSError as exc:
                raise EngineStoppedError(f"the engine process is gone ({exc})") from None

    def _receive(self) -> None:
        while True:
            conn = self._conn
            try:
                if conn is None:
                    raise OSError("closed")
                msg = proto.loads(conn.recv_bytes())
            except (EOFError, OSError, TypeError):  # TypeError: closed by stop() meanwhile
                if self._stopping:
                    self._end_open("the engine stopped", lost=False)
                    return
                self._on_core_death()
                if self._stopping:
                    return
                continue
            if msg[0] == proto.STEP:
                self._dispatch(proto.decode_step(msg))

    def _dispatch(self, batch: proto.StepBatch) -> None:
        self.heartbeat = max(self.heartbeat, batch.heartbeat)
        if batch.outputs:
            self._admission.left(out.request_id for out in batch.outputs)
            with self._lock:
                self._open.difference_update(o.request_id for o in batch.outputs if o.finished)
            self._emit(batch.outputs)
        for stats in batch.stats:
            self._emit_stats(stats)

    def _end_open(self, message: str, lost: bool) -> None:
        with self._lock:
            ended, self._open = sorted(self._open), set()
        self._admission.clear()
        if ended:
            reason = FinishReason.ERROR if lost else FinishReason.CANCELLED
            self._emit(
                [
                    RequestOutput(r, [], finish_reason=reason, error=message, engine_lost=lost)
                    for r in ended
                ]  # fmt: skip
            )

    def _on_core_death(self) -> None:
        """Fail every open request, report NOT_SERVING, start a new core (with backoff) or,
        attached, reconnect to the one the owner starts."""
        proc = self._proc
        with self._send_lock:
            self._running = False
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        if self.attached:
            log.error("lost the engine process; reconnecting")
            what = "the engine process went away"
        else:
            if proc is not None:
                proc.join(5.0)
            code = proc.exitcode if proc is not None else None
            what = self._kill_reason or f"the engine process exited (code {code})"
            self._kill_reason = None
            log.error("%s; restarting it", what)
        self._end_open(
            f"{what} during this request; it is restarting, retry the request", lost=True
        )
        self._notify(False)
        backoff = RECONNECT_BACKOFF_S if self.attached else RESTART_BACKOFF_S
        for attempt in itertools.count():
            if self._stopping:
                return
            try:
                if self.attached:
                    self._connect()
                else:
                    self._spawn()
                break
            except EngineStartError as exc:
                delay = backoff[min(attempt, len(backoff) - 1)]
                if not self.attached or attempt % 20 == 19:
                    log.error("starting the engine process failed (%s); next try in %gs",
                              exc, delay)  # fmt: skip
                time.sleep(delay)
        self.restarts += 1
        if self.attached:
            log.info("reconnected to the engine process (pid %s)", self.pid)
        else:
            log.info("engine process restarted (pid %s)", self.pid)
        self._notify(True)

    def _watch(self) -> None:
        """Owner: kill a core whose engine thread has not come round its loop for
        restart_stalled_s (the receiver then restarts it as after any death)."""
        period = min(1.0, self.restart_stalled_s / 4)
        while not self._stopping:
            time.sleep(period)
            proc = self._proc
            age = time.monotonic() - self.heartbeat
            if not self._running or proc is None or age <= self.restart_stalled_s:
                continue
            self._kill_reason = (
                f"the engine process stopped responding (no heartbeat for {age:.0f}s, limit "
                f"{self.restart_stalled_s:g}s) and was killed"
            )
            log.error("%s (pid %s)", self._kill_reason, proc.pid)
            proc.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
            proc.join(10.0)

    def _notify(self, serving: bool) -> None:
        if self.on_state is not None:
            try:
                self.on_state(serving)
            except Exception:
                log.exception("engine state listener failed")
