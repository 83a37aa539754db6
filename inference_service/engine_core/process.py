"""The engine-core process: builds the model and backend (so the device context lives here
and nowhere else), runs the Engine's step loop, and talks to its frontend over one pipe.

Three threads: the engine thread steps; this process's main thread reads commands (add,
abort, ...) and hands them to the engine's inbox; a sender thread writes the outputs of every
step to the frontend. The sender takes whatever accumulated since its last write and sends it
as ONE message, so a frontend that reads slowly gets fewer, larger messages and never holds
up a step (the engine thread only appends to a list). When the frontend goes away (the pipe
ends) the core stops.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from inference_service.engine.engine import (
    Engine,
    EngineStoppedError,
    QueueFullError,
    RequestOutput,
    StepStats,
)
from inference_service.engine.sequence import FinishReason
from inference_service.engine_core import protocol as proto
from inference_service.engine_core.build import EngineSpec, build_engine

log = logging.getLogger("kuiper.engine_core")

MAX_PENDING_STATS = 1024  # stats kept while the frontend does not read (newest win)
HEARTBEAT_S = 1.0  # the longest an idle core stays silent


class _Sender:
    """Coalesces step outputs and writes them from its own thread."""

    def __init__(self, conn: Connection, heartbeat: Callable[[], float]):
        self._conn = conn
        self._heartbeat = heartbeat  # the engine thread's last time round its loop
        self._ids: dict[int, int] = {}  # engine request id -> frontend request id
        self._engine_ids: dict[int, int] = {}  # frontend request id -> engine request id
        self._cond = threading.Condition()
        self._batch = proto.StepBatch()
        self._closed = False
        self._encoder = proto.StepEncoder()
        self._thread = threading.Thread(target=self._run, name="kuiper-core-send", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: translate ids and queue; never blocks on the pipe."""
        with self._cond:
            for out in outputs:
                rid = self._ids.get(out.request_id)
                if rid is None:
                    continue
                if out.finished:
                    del self._ids[out.request_id]
                    self._engine_ids.pop(rid, None)
                out.request_id = rid
                self._batch.outputs.append(out)
            self._cond.notify()

    def submit(self, engine: Engine, rid: int, prompt: list[int], params) -> None:
        """Main thread: queue a request in the engine under the frontend's id `rid`."""
        try:
            with self._cond:  # mapped before the engine thread can report on it
                eid = engine.submit(prompt, params)
                self._ids[eid] = rid
                self._engine_ids[rid] = eid
        except (QueueFullError, EngineStoppedError, ValueError) as exc:
            self.send_now([_refused(rid, str(exc))])

    def abort(self, engine: Engine, rid: int) -> None:
        with self._cond:
            eid = self._engine_ids.get(rid)
        if eid is not None:
            engine.abort(eid)

    def on_stats(self, stats: StepStats) -> None:
        with self._cond:
            if len(self._batch.stats) >= MAX_PENDING_STATS:
                del self._batch.stats[0]
            self._batch.stats.append(stats)
            self._cond.notify()

    def send_now(self, outputs: list[RequestOutput]) -> None:
        """Main thread: outputs for requests the engine never took (already frontend ids)."""
        with self._cond:
            self._batch.outputs.extend(outputs)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5.0)

    def _run(self) -> None:
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
                except OSError:  # the frontend is gone; the main thread sees EOF and stops
                    return
            if closed:
                return


def _refused(rid: int, message: str) -> RequestOutput:
    return RequestOutput(rid, [], finish_reason=FinishReason.ERROR, error=message)


def serve_commands(conn: Connection, engine: Engine, sender: _Sender) -> None:
    """Apply the frontend's commands until it says stop or goes away."""
    while True:
        try:
            msg = proto.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == proto.ADD:
            sender.submit(engine, *msg[1:])
        elif kind == proto.ABORT:
            sender.abort(engine, msg[1])
        elif kind == proto.STOP_IDS:
            engine.set_stop_ids(msg[1])
        elif kind == proto.SAMPLE_VOCAB:
            engine.backend.sample_vocab = msg[1]
        elif kind == proto.STOP:
            return


def core_main(conn: Connection, spec: EngineSpec) -> None:
    """Entry point of the engine-core process (multiprocessing, spawn start method)."""
    # The frontend decides when we stop: Ctrl-C in a terminal reaches the whole process
    # group, and the frontend drains its streams before it stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The sender thread waits for the GIL while the engine thread computes (pure Python
    # stretches on the CPU backend; GPU waits release it): hand it over within 1 ms, not 5.
    sys.setswitchinterval(0.001)
    try:
        built = build_engine(spec)
    except BaseException as exc:  # the frontend reports it (one line) and exits
        conn.send_bytes(proto.dumps((proto.FATAL, str(exc) or type(exc).__name__)))
        return
    engine = built.engine
    sender = _Sender(conn, lambda: engine.heartbeat)
    engine.add_output_listener(sender.on_outputs)
    engine.add_stats_listener(sender.on_stats)
    engine.start()
    sender.start()
    backend = engine.backend
    info = proto.CoreInfo(
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
    conn.send_bytes(proto.dumps((proto.READY, info)))
    try:
        serve_commands(conn, engine, sender)
    finally:
        engine.stop()  # its last outputs (cancelled) still go out if the frontend listens
        sender.close()
        conn.close()
