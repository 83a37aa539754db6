"""The engine loop: one thread owns the backend (and so the device) and runs scheduler steps.

Other threads talk to it through a thread-safe inbox (`submit`, `abort`) and hear back through
output listeners that the engine thread calls once per step with every request's news of that
step. `AsyncEngine` adapts this to asyncio: it hands each step's outputs to the event loop
with `loop.call_soon_threadsafe`, either to per-request asyncio queues or to one step handler
(the server's, which detokenizes a whole step in one message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from inference_service.backends.base import Backend, BatchItem, can_step_async, check_backend
from inference_service.config import EngineConfig
from inference_service.engine.admission import Admission
from inference_service.engine.block_manager import BlockManager
from inference_service.engine.scheduler import Scheduler, SchedulerOutput
from inference_service.engine.sequence import FinishReason, Sequence
from inference_service.errors import describe_error
from inference_service.sampling.params import SampleOutput, SamplingParams

log = logging.getLogger(__name__)


HEARTBEAT_S = 1.0  # an idle engine thread still beats this often


class EngineStoppedError(Exception):
    """The engine is not running (not started, shutting down, or crashed)."""


@dataclass
class RequestOutput:
    """What one request gained in one engine step."""

    request_id: int
    new_token_ids: list[int]
    new_logprobs: list[SampleOutput] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    queue_time_s: float | None = None  # arrival to first scheduling step
    error: str | None = None
    engine_lost: bool = False  # the engine process died under it (the client may retry)
    queue_full: bool = False  # refused: the waiting queue was full (the client may retry later)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepStats:
    """Snapshot after one step (for metrics)."""

    num_running: int
    num_waiting: int
    batch_size: int  # sequences in the step
    num_batched_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_blocks: int  # cumulative
    prefix_cache_queried_blocks: int  # cumulative
    num_preemptions: int  # cumulative
    step_time_s: float


OutputListener = Callable[[list[RequestOutput]], None]


class StepListeners:
    """Who hears each step's outputs and stats, and the fan-out to them (a failing listener
    is logged and skipped). Shared by the in-process Engine and the engine-core client, which
    offer servers the same face."""

    def __init__(self) -> None:
        self._listeners: list[OutputListener] = []
        self._stats_listeners: list[Callable[[StepStats], None]] = []
        self.last_stats: StepStats | None = None

    def add_output_listener(self, listener: OutputListener) -> None:
        self._listeners.append(listener)

    def remove_output_listener(self, listener: OutputListener) -> None:
        self._listeners.remove(listener)

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._stats_listeners.append(listener)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        for listener in list(self._listeners):
            try:
                listener(outputs)
            except Exception:
                log.exception("output listener failed")

    def _emit_stats(self, stats: StepStats) -> None:
        self.last_stats = stats
        for listener in self._stats_listeners:
            try:
                listener(stats)
            except Exception:
                log.exception("stats listener failed")


class Engine(StepListeners):
    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        stop_ids: Iterable[int] = (),
    ):
        check_backend(backend)
        self.backend = backend
        self.config = config or EngineConfig()
        model_len = backend.max_model_len
        self.max_model_len = min(self.config.max_model_len or model_len, model_len)
        self.block_manager = BlockManager(
            backend.num_blocks, backend.block_size, self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.stop_ids = frozenset(stop_ids) or frozenset(backend.config.eos_token_ids)
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._admission = Admission(self.config.max_waiting)
        self._seqs: dict[int, Sequence] = {}  # engine thread only
        StepListeners.__init__(self)
        self._thread: threading.Thread | None = None
        self._running = False
        # Overlapped steps (config.overlap_steps, backends with step_async): the step running
        # in the backend while the engine thread schedules the next one.
        self.overlap = self.config.overlap_steps and can_step_async(backend)
        if self.config.overlap_steps and not self.overlap:
            log.info("%s has no step_async: steps run synchronously", type(backend).__name__)
        self._inflight: (
            tuple[SchedulerOutput, list[BatchItem], Future[list[SampleOutput | None]]] | None
        ) = None
        # When the engine thread last came round its loop (time.monotonic()): a value that
        # stops moving while the thread lives means a step is stuck (see watchdog.py).
        self.heartbeat = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="kuiper-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cancel everything still queued or running and end the thread."""
        if self._thread is None:
            return
        self._inbox.put(("stop", None))
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._running

    # ---- thread-safe API (the listeners: StepListeners) -----------------------------------
    def set_stop_ids(self, stop_ids: Iterable[int]) -> None:
        """End-of-sequence ids for requests submitted from now on."""
        self.stop_ids = frozenset(stop_ids)

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.block_manager.capacity_tokens

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; return its id. Raises QueueFullError when the waiting queue is
        at its bound, EngineStoppedError when the engine does not run."""
        if not self.alive:
            raise EngineStoppedError("the engine is not running")
        request_id = self._admission.admit(prompt_ids)
        seq = Sequence(
            seq_id=request_id,
            prompt_ids=[int(t) for t in prompt_ids],
            sampling=params,
            max_total_tokens=self.max_model_len,
            stop_ids=self.stop_ids,
        )
        self._inbox.put(("add", seq))
        return request_id

    def abort(self, request_id: int) -> None:
        """Stop a request at the next step (no-op when it already ended)."""
        self._inbox.put(("abort", request_id))

    @property
    def num_waiting_requests(self) -> int:
        return len(self._admission)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, timeout: float | None = None
    ) -> list[list[int]]:
        """Blocking convenience (tests, benchmarks, warm-up): generated ids per prompt."""
        results: dict[int, list[int]] = {}
        done: dict[int, RequestOutput] = {}
        finished = threading.Event()
        ids: set[int] = set()
        lock = threading.Lock()

        def listen(outputs: list[RequestOutput]) -> None:
            with lock:
                for out in outputs:
                    if out.request_id in ids:
                        results[out.request_id].extend(out.new_token_ids)
                        if out.finished:
                            done[out.request_id] = out
                if ids and len(done) == len(ids):
                    finished.set()

        self.add_output_listener(listen)
        try:
            with lock:
                for prompt in prompts:
                    rid = self.submit(prompt, params)
                    ids.add(rid)
                    results[rid] = []
            if not finished.wait(timeout):
                raise TimeoutError("generation did not finish in time")
        finally:
            self.remove_output_listener(listen)
        errors = [o.error for o in done.values() if o.error]
        if errors:
            raise RuntimeError(errors[0])
        return [results[rid] for rid in sorted(ids)]

    # ---- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                self.heartbeat = time.monotonic()
                if not self._drain_inbox(block=not self.scheduler.has_unfinished()):
                    break
                if self.scheduler.has_unfinished():
                    self._step_overlapped() if self.overlap else self._step()
        except Exception:  # a bug here must not leave clients hanging forever
            log.exception("engine loop crashed")
        finally:
            self._running = False
            if self._inflight is not None:  # let the running step end before the KV is freed
                with contextlib.suppress(Exception):
                    self._inflight[2].result()
                self._inflight = None
            self._emit(self._finish_outputs(self.scheduler.abort_all(), "engine stopped"))
            # The backend's per-thread device state (the CUDA context this thread pushed)
            # must be released by this thread, before it ends.
            try:
                self.backend.close()
            except Exception:
                log.exception("closing the backend failed")

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        while True:
            try:
                # An idle engine wakes once a second, so its heartbeat stays fresh.
                kind, arg = self._inbox.get(block=block, timeout=HEARTBEAT_S if block else None)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                assert isinstance(arg, Sequence)
                self._seqs[arg.seq_id] = arg
                self.scheduler.add(arg)
            elif kind == "abort":
                seq = self._seqs.get(arg)  # type: ignore[arg-type]
                if seq is not None:
                    self.scheduler.cancel(seq)

    def _step(self) -> None:
        t0 = time.monotonic()
        out = self.scheduler.schedule()
        outputs = self._finish_outputs(out.finished)
        samples: list[SampleOutput | None] = []
        if out.chunks:
            samples, failures = self._run_isolating(self._batch(out))
            if failures:
                outputs += self._fail_chunks(out, failures)
                samples = [s for i, s in enumerate(samples) if i not in failures]
                out.chunks = [c for i, c in enumerate(out.chunks) if i not in failures]
        if out.chunks:
            sampled = [c.seq for c in out.chunks if c.samples]  # before update grows them
            self.scheduler.update(out, samples)
            outputs += [self._output(seq, [seq.output_ids[-1]]) for seq in sampled]
        self._admission.left(chunk.seq.seq_id for chunk in out.chunks)
        self._emit(outputs)
        self._publish_stats(out, time.monotonic() - t0)

    def _run_isolating(
        self, items: list[BatchItem], error: Exception | None = None
    ) -> tuple[list[SampleOutput | None], dict[int, Exception]]:
        """backend.step over items. When it raises, the halves run again, and so on, until
        every item that makes it raise is alone: (samples by item, None where it failed; the
        error of each failed item by index). The retries are exact for the others: an item
        run again rewrites the same KV positions with the same values, and a seeded draw
        depends on (seed, BatchItem.step) alone, which a retry does not advance. `error`: a
        run of these items already raised it (an overlapped step), so start with the halves."""
        if error is None:
            try:
                return self.backend.step(items), {}
            except Exception as exc:
                error = exc
        if len(items) == 1:
            log.debug("backend step failed on sequence %d", items[0].seq_id, exc_info=error)
            return [None], {0: error}
        mid = len(items) // 2
        head, head_failed = self._run_isolating(items[:mid])
        tail, tail_failed = self._run_isolating(items[mid:])
        head_failed.update({mid + i: e for i, e in tail_failed.items()})
        return head + tail, head_failed

    def _fail_chunks(
        self, out: SchedulerOutput, failures: dict[int, Exception]
    ) -> list[RequestOutput]:
        """End the sequences whose chunks the backend failed on (ERROR, blocks freed): one
        log line for the step, one message per request that says what happened."""
        seqs = [out.chunks[i].seq for i in sorted(failures)]
        errors = {seq.seq_id: failures[i] for i, seq in zip(sorted(failures), seqs, strict=True)}
        first = next(iter(errors.values()))
        log.error(
            "backend step failed on request(s) %s (%s): stopped them; %d other sequence(s) "
            "of the step went on",
            ", ".join(str(s.seq_id) for s in seqs), describe_error(first),
            len(out.chunks) - len(seqs),
        )  # fmt: skip
        outputs = []
        for seq in self.scheduler.fail(seqs):
            outputs += self._finish_outputs(
                [seq],
                f"the model backend failed on this request ({describe_error(errors[seq.seq_id])}); "
                "it was stopped, other requests go on. Sending it again will likely fail "
                "the same way; the inference service's log names the request",
            )
        return outputs

    def _step_overlapped(self) -> None:
        """One step with the next one scheduled while it runs: the step launched last time
        (self._inflight) runs in the backend while this thread schedules and builds the next
        batch from the state it will leave (Scheduler.advance: its tokens computed, placeholders
        for the tokens being sampled); then its results replace the placeholders
        (Scheduler.resolve, which also patches the next batch's token ids: they are views of
        the sequences' id buffers), what they finished leaves the next batch, and it starts."""
        t0 = time.monotonic()
        outputs: list[RequestOutput] = []
        if self._inflight is None:  # nothing running: start the pipeline
            first = self.scheduler.schedule()
            outputs += self._finish_outputs(first.finished)
            self._launch(first)
            if self._inflight is None:
                self._emit(outputs)
                return
        assert self._inflight is not None
        out, items, running = self._inflight
        self.scheduler.advance(out)
        nxt = self.scheduler.schedule()
        outputs += self._finish_outputs(nxt.finished)
        batch = self._batch(nxt)
        try:
            samples = running.result()
        except Exception as exc:  # find the request(s) that make it raise, as _step does
            samples, failures = self._run_isolating(items, exc)
            if failures:
                outputs += self._fail_chunks(out, failures)
        got = self.scheduler.resolve(out, samples)
        outputs += [self._output(seq, [seq.output_ids[-1]]) for seq in got]
        keep = [i for i, c in enumerate(nxt.chunks) if not c.seq.is_finished]
        nxt.chunks = [nxt.chunks[i] for i in keep]
        self._launch(nxt, [batch[i] for i in keep])
        self._emit(outputs)
        self._publish_stats(out, time.monotonic() - t0)

    def _launch(self, out: SchedulerOutput, batch: list[BatchItem] | None = None) -> None:
        """Start the step `out` in the backend (self._inflight), if it has any chunk."""
        self._inflight = None
        if out.chunks:
            items = self._batch(out) if batch is None else batch
            running = self.backend.step_async(items)  # type: ignore[attr-defined]
            self._inflight = (out, items, running)
        self._admission.left(chunk.seq.seq_id for chunk in out.chunks)

    def _batch(self, out: SchedulerOutput) -> list[BatchItem]:
        """The step's items: views of each sequence's id buffer (no per-step copies of ids
        that did not change), its block table as it is."""
        items = []
        no_history = np.zeros(0, np.int32)
        for chunk in out.chunks:
            seq = chunk.seq
            end = chunk.start_pos + chunk.num_tokens
            ids = seq.ids_array()
            sampling = seq.sampling if chunk.samples else None
            penalty = sampling is not None and sampling.repetition_penalty != 1.0
            items.append(
                BatchItem(
                    seq_id=seq.seq_id,
                    token_ids=ids[chunk.start_pos : end],
                    start_pos=chunk.start_pos,
                    block_table=seq.block_table,
                    sampling=sampling,
                    history=ids[:end] if penalty else no_history,
                    # generated tokens before the one sampled (placeholders of overlapped
                    # steps past `end` do not count)
                    step=end - seq.num_prompt_tokens if sampling is not None else 0,
                )
            )
        return items

    def _output(self, seq: Sequence, new_ids: list[int], error: str | None = None) -> RequestOutput:
        queue_time = None
        if seq.first_scheduled_time is not None:
            queue_time = seq.first_scheduled_time - seq.arrival_time
        new_logprobs = seq.logprobs[-len(new_ids) :] if new_ids and seq.logprobs else []
        if seq.is_finished:
            self._seqs.pop(seq.seq_id, None)
        return RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=new_ids,
            new_logprobs=new_logprobs,
            finish_reason=seq.finish_reason if seq.is_finished else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            queue_time_s=queue_time,
            error=error,
        )

    def _finish_outputs(
        self, seqs: list[Sequence], error: str | None = None
    ) -> list[RequestOutput]:
        self._admission.left(seq.seq_id for seq in seqs)
        return [
            self._output(s, [], error if s.finish_reason is not FinishReason.CANCELLED else None)
            for s in seqs
        ]

    def _publish_stats(self, out: SchedulerOutput, step_time: float) -> None:
        bm = self.block_manager
        stats = StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            batch_size=len(out.chunks),
            num_batched_tokens=out.num_tokens,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            prefix_cache_hit_blocks=bm.prefix_cache_hit_blocks,
            prefix_cache_queried_blocks=bm.prefix_cache_queried_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            step_time_s=step_time,
        )
        self._emit_stats(stats)


class RequestStream:
    """Outputs of one request, read on the event loop."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = await self.queue.get()
            yield out
            if out.finished:
                return


class AsyncEngine:
    """asyncio face of an Engine: call from the event loop only."""

    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        on_step: OutputListener | None = None,
    ):
        """on_step, when given, receives every step's outputs on the loop instead of the
        per-request streams."""
        self.engine = engine
        self.loop = loop
        self.on_step = on_step
        self._streams: dict[int, RequestStream] = {}
        engine.add_output_listener(self._from_engine_thread)

    def _from_engine_thread(self, outputs: list[RequestOutput]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            self.loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if self.on_step is not None:
            self.on_step(outputs)
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.queue.put_nowait(out)
                if out.finished:
                    del self._streams[out.request_id]

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        request_id = self.engine.submit(prompt_ids, params)
        stream = RequestStream(request_id)
        if self.on_step is None:
            self._streams[request_id] = stream
        return stream

    def abort(self, request_id: int) -> None:
        self.engine.abort(request_id)
