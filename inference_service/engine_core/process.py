"""The engine-core process: builds the model and backend (so the device context lives here
and nowhere else), runs the Engine's step loop, and serves one or more frontends (gRPC
server processes).

The frontend that started the core (the *owner*) talks to it over the pipe it was spawned
with; more frontends connect to `CoreAddress` (a Unix socket with an authentication key). The
core multiplexes them: each connection has its own request-id space (a frontend's id is only
meaningful on its connection), its own reader thread (commands: add, abort, ...) and its own
sender thread, so each frontend gets only its own requests' outputs. Every connection gets
the heartbeat; engine step stats go to the owner alone (one set of engine metrics). A
frontend that goes away has its own requests aborted (their KV blocks freed); when the
owner goes away (or says stop) the core stops.

A sender takes whatever accumulated since its last write and sends it as ONE message, so a
frontend that reads slowly gets fewer, larger messages and never holds up a step (the engine
thread only appends to a list).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener

from inference_service.engine.admission import QueueFullError
from inference_service.engine.engine import (
    Engine,
    EngineStoppedError,
    RequestOutput,
    StepStats,
)
from inference_service.engine.sequence import FinishReason
from inference_service.engine_core import protocol as proto
from inference_service.engine_core.build import EngineSpec, build_engine

log = logging.getLogger("kuiper.engine_core")

MAX_PENDING_STATS = 1024  # stats kept while the frontend does not read (newest win)
HEARTBEAT_S = 1.0  # the longest an idle core stays silent


@dataclass(frozen=True)
class CoreAddress:
    """Where more frontends connect to the core (picklable: it crosses to every process)."""

    path: str  # a Unix socket in a private folder
    authkey: bytes


class _Sender:
    """One frontend's outgoing messages: coalesces step outputs, writes from its own thread."""

    def __init__(self, conn: Connection, heartbeat: Callable[[], float], greeting: bytes):
        self._conn = conn
        self._greeting = greeting  # READY: the first message on the pipe
        self._heartbeat = heartbeat  # the engine thread's last time round its loop
        self._cond = threading.Condition()
        self._batch = proto.StepBatch()
        self._closed = False
        self._encoder = proto.StepEncoder()
        self._thread = threading.Thread(target=self._run, name="kuiper-core-send", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def push(self, outputs: list[RequestOutput]) -> None:
        """Outputs already in this frontend's ids; never blocks on the pipe."""
        with self._cond:
            self._batch.outputs.extend(outputs)
            self._cond.notify()

    def push_stats(self, stats: StepStats) -> None:
        with self._cond:
            if len(self._batch.stats) >= MAX_PENDING_STATS:
                del self._batch.stats[0]
            self._batch.stats.append(stats)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self) -> None:
        try:
            self._conn.send_bytes(self._greeting)
        except OSError:
            return
        while True:
            with self._cond:
                # An idle engine still reports its heartbeat (the frontend's watchdog).
                if not (self._batch.outputs or self._batch.stats or self._closed):
                    self._cond.wait(HEARTBEAT_S)
                batch, self._batch = self._batch, proto.StepBatch()
                closed = self._closed
            batch.heartbeat = self._heartbeat()
            if batch.outputs or batch.stats or not closed:
                try:
                    self._conn.send_bytes(self._encoder.encode(batch))
                except OSError:  # the frontend is gone; its reader sees EOF and cleans up
                    return
            if closed:
                return


class _Frontend:
    """One connected frontend: its pipe, its sender, its requests (frontend id -> engine id)."""

    def __init__(
        self, index: int, conn: Connection, heartbeat: Callable[[], float], greeting: bytes
    ):
        self.index = index
        self.conn = conn
        self.sender = _Sender(conn, heartbeat, greeting)
        self.engine_ids: dict[int, int] = {}
        self.gone = False


class Multiplexer:
    """Routes requests from several frontends into one engine and its outputs back."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._routes: dict[int, tuple[_Frontend, int]] = {}  # engine id -> (frontend, its id)
        self._frontends: list[_Frontend] = []
        self._next_index = 0
        self._owner: _Frontend | None = None
        engine.add_output_listener(self.on_outputs)
        engine.add_stats_listener(self.on_stats)

    def connect(self, conn: Connection, greeting: bytes, owner: bool = False) -> _Frontend:
        """A new frontend; `greeting` (READY) goes out first. The owner's STOP stops the core
        and it alone gets the step stats."""
        with self._lock:
            fe = _Frontend(self._next_index, conn, lambda: self.engine.heartbeat, greeting)
            self._next_index += 1
            self._frontends.append(fe)
            if owner:
                self._owner = fe
        fe.sender.start()
        return fe

    def disconnect(self, fe: _Frontend) -> None:
        """The frontend went away: abort its requests (their KV blocks come back)."""
        with self._lock:
            fe.gone = True
            if fe in self._frontends:
                self._frontends.remove(fe)
            orphans = list(fe.engine_ids.values())
        for eid in orphans:
            self.engine.abort(eid)
        if orphans:
            log.warning("frontend %d went away; aborted its %d request(s)", fe.index, len(orphans))
        fe.sender.close()

    def close(self) -> None:
        """The core stops: flush and end every sender."""
        with self._lock:
            frontends = list(self._frontends)
        for fe in frontends:
            fe.sender.close()

    # ---- engine thread ---------------------------------------------------------------------
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Translate ids and queue per frontend; never blocks on a pipe."""
        per: dict[_Frontend, list[RequestOutput]] = {}
        with self._lock:
            for out in outputs:
                route = self._routes.get(out.request_id)
                if route is None:
                    continue
                fe, rid = route
                if out.finished:
                    del self._routes[out.request_id]
                    fe.engine_ids.pop(rid, None)
                if fe.gone:
                    continue
                out.request_id = rid
                per.setdefault(fe, []).append(out)
        for fe, outs in per.items():
            fe.sender.push(outs)

    def on_stats(self, stats: StepStats) -> None:
        owner = self._owner
        if owner is not None and not owner.gone:
            owner.sender.push_stats(stats)

    # ---- reader threads --------------------------------------------------------------------
    def submit(self, fe: _Frontend, rid: int, prompt: list[int], params) -> None:
        """Queue a request in the engine under the frontend's id `rid`."""
        try:
            with self._lock:  # mapped before the engine thread can report on it
                eid = self.engine.submit(prompt, params)
                self._routes[eid] = (fe, rid)
                fe.engine_ids[rid] = eid
        except QueueFullError as exc:
            fe.sender.push([_refused(rid, str(exc), queue_full=True)])
        except EngineStoppedError as exc:
            fe.sender.push([_refused(rid, str(exc), engine_lost=True)])
        except ValueError as exc:
            fe.sender.push([_refused(rid, str(exc))])

    def abort(self, fe: _Frontend, rid: int) -> None:
        with self._lock:
            eid = fe.engine_ids.get(rid)
        if eid is not None:
            self.engine.abort(eid)

    def serve(self, fe: _Frontend) -> bool:
        """Apply one frontend's commands until it goes away (False) or, the owner only, says
        stop (True)."""
        while True:
            try:
                msg = proto.loads(fe.conn.recv_bytes())
            except (EOFError, OSError):
                return False
            kind = msg[0]
            if kind == proto.ADD:
                self.submit(fe, *msg[1:])
            elif kind == proto.ABORT:
                self.abort(fe, msg[1])
            elif kind == proto.STOP_IDS:
                self.engine.set_stop_ids(msg[1])
            elif kind == proto.SAMPLE_VOCAB:
                self.engine.backend.sample_vocab = msg[1]
            elif kind == proto.STOP:
                return fe is self._owner


def _refused(
    rid: int, message: str, *, queue_full: bool = False, engine_lost: bool = False
) -> RequestOutput:
    return RequestOutput(
        rid, [], finish_reason=FinishReason.ERROR, error=message,
        queue_full=queue_full, engine_lost=engine_lost,
    )  # fmt: skip


def _accept_frontends(listener: Listener, mux: Multiplexer, ready: Callable[[], bytes]) -> None:
    """Listener thread: every frontend that connects gets READY and a reader thread."""
    while True:
        try:
            conn = listener.accept()
        except OSError:  # closed: the core is stopping
            return
        except Exception as exc:  # a wrong key (AuthenticationError), a peer gone mid-handshake
            log.warning("refused a frontend connection: %s", exc)
            continue
        fe = mux.connect(conn, ready())
        log.info("frontend %d connected", fe.index)

        def serve_one(fe: _Frontend = fe) -> None:
            mux.serve(fe)
            mux.disconnect(fe)
            with contextlib.suppress(OSError):
                fe.conn.close()
            log.info("frontend %d disconnected", fe.index)

        threading.Thread(target=serve_one, name="kuiper-core-frontend", daemon=True).start()


def core_main(conn: Connection, spec: EngineSpec, address: CoreAddress | None = None) -> None:
    """Entry point of the engine-core process (multiprocessing, spawn start method). `conn`
    is the owner's pipe; with `address`, more frontends may connect there."""
    # The frontend decides when we stop: Ctrl-C in a terminal reaches the whole process
    # group, and the frontend drains its streams before it stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The sender threads wait for the GIL while the engine thread computes (pure Python
    # stretches on the CPU backend; GPU waits release it): hand it over within 1 ms, not 5.
    sys.setswitchinterval(0.001)
    try:
        built = build_engine(spec)
    except BaseException as exc:  # the frontend reports it (one line) and exits
        conn.send_bytes(proto.dumps((proto.FATAL, str(exc) or type(exc).__name__)))
        return
    engine = built.engine
    mux = Multiplexer(engine)
    engine.start()
    backend = engine.backend

    def ready() -> bytes:  # sample_vocab as the frontends have set it by now
        return proto.dumps((proto.READY, _info()))

    def _info() -> proto.CoreInfo:
        return proto.CoreInfo(
            model_config=backend.config,
            device_name=backend.device_name,
            block_size=backend.block_size,
            num_blocks=engine.num_blocks,
            max_model_len=engine.max_model_len,
            capacity_tokens=engine.capacity_tokens,
            max_batch_size=engine.config.max_batch_size,
            max_waiting=engine.config.max_waiting,
            sample_vocab=backend.sample_vocab,
            source=built.source,
            dtype=built.dtype,
            pid=os.getpid(),
        )

    listener = None
    if address is not None:  # bound before READY: a frontend may connect once it is sent
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)  # a previous core's socket (it was killed)
        listener = Listener(address.path, family="AF_UNIX", authkey=address.authkey)
    owner = mux.connect(conn, ready(), owner=True)  # first: a connecting frontend is never it
    if listener is not None:
        threading.Thread(
            target=_accept_frontends, args=(listener, mux, ready), name="kuiper-core-listen",
            daemon=True,
        ).start()  # fmt: skip
    try:
        mux.serve(owner)
    finally:
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        engine.stop()  # its last outputs (cancelled) still go out if the frontends listen
        mux.close()
        conn.close()
