"""From engine steps to per-request text deltas.

The engine hands each step's outputs to the event loop; the router sends the new ids of every
live request of that step in ONE DecodeStream message (pipelined: it does not wait for the
previous step's answer), and, as answers come back in order, matches stop strings on the
text (holding back what could start one) and puts a `Delta` on each request's asyncio queue.
So every step reaches the clients as its own message; only when more than MAX_BACKLOG steps
pile up (the loop or the tokenizer fall behind) are they merged into one message.

When the DecodeStream breaks (the tokenizer service restarted), the tokenizer's per-sequence
state is gone. Each open sequence is then reopened on the new stream with, as context, the
last ids whose text its client already has, and the ids whose text never came back are sent
again; so streams pause while the tokenizer is away and continue when it is back (within
REPLAY_TIMEOUT_S, else UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
from kuiper.v1 import tokenizer_pb2 as tpb

from inference_service.engine.engine import RequestOutput
from inference_service.engine.sequence import FinishReason
from inference_service.engine.stop_strings import StopStringMatcher
from inference_service.errors import describe_error, raised_at
from inference_service.sampling.params import SampleOutput
from inference_service.tokenizer_client import (
    DecodeStreamMux,
    TokenizerRequestError,
    TokenizerUnavailableError,
)

log = logging.getLogger(__name__)

CONTEXT_IDS = 16  # prompt ids sent when a sequence opens: enough for leading-space rules
REPLAY_TIMEOUT_S = 30.0  # how long a sequence may wait for the tokenizer service to come back
RETRY_S = 0.1  # how often sequences waiting for it are retried


class RpcError(Exception):
    """Ends an RPC with this status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Delta:
    """What one request's client receives next."""

    token_ids: list[int]
    text: str
    logprobs: list[SampleOutput] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: RpcError | None = None
    output: RequestOutput | None = None  # the last engine output merged into this delta


@dataclass
class _Merged:
    ids: list[int] = field(default_factory=list)
    logprobs: list[SampleOutput] = field(default_factory=list)
    last: RequestOutput | None = None
    order: int = 0  # which _send built it: replayed ids go back in this order

    def extend(self, other: _Merged) -> None:
        self.ids.extend(other.ids)
        self.logprobs.extend(other.logprobs)
        self.last = other.last or self.last


@dataclass
class LiveRequest:
    request_id: int
    context_ids: list[int]  # the last ids whose text the client has (the prompt's at first)
    matcher: StopStringMatcher
    queue: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    opened_epoch: int | None = None  # DecodeStream epoch its detokenizer state lives in
    closed: bool = False  # a finished=True message for it was sent
    done: bool = False  # its last Delta was delivered
    # Ids delivered to the client whose text the tokenizer still holds back (an incomplete
    # character): decoded again when the sequence is reopened.
    unemitted: list[int] = field(default_factory=list)
    in_flight: int = 0  # DecodeStream messages carrying it that are not answered yet
    answered: bool = False  # the tokenizer has answered for it at least once
    # Waiting to be reopened on a new stream: ids whose answers were lost with the old one
    # and ids of later steps (sorted by _Merged.order when sent); since when it waits.
    pending: list[_Merged] = field(default_factory=list)
    waiting_since: float | None = None

    async def next_delta(self) -> Delta:
        """The next Delta, merged with every one queued behind it: a client that reads
        slower than the engine steps gets one message with all its ready tokens."""
        delta = await self.queue.get()
        while delta.error is None and delta.finish_reason is None and not self.queue.empty():
            delta = _merge(delta, self.queue.get_nowait())
        return delta


def _merge(a: Delta, b: Delta) -> Delta:
    if b.error is not None:
        return b
    out = b.output or a.output
    if a.output is not None and out is not None and out.queue_time_s is None:
        out = dataclasses.replace(out, queue_time_s=a.output.queue_time_s)  # sent once
    return Delta(
        a.token_ids + b.token_ids, a.text + b.text, a.logprobs + b.logprobs, b.finish_reason,
        output=out,
    )  # fmt: skip


MAX_SEQUENCES_PER_MESSAGE = 1024  # the tokenizer service's limit per DecodeStream message
MAX_BACKLOG = 16  # pending steps beyond which they are merged: bounds the lag under overload

_Target = tuple[LiveRequest, _Merged]


class OutputRouter:
    def __init__(self, engine, decoder: DecodeStreamMux):
        """engine: an Engine or an EngineClient (only abort() is used)."""
        self.engine = engine
        self.decoder = decoder
        self._live: dict[int, LiveRequest] = {}
        self._steps: deque[list[RequestOutput]] = deque()
        self._closes: list[int] = []  # opened sequences to close on the tokenizer side
        self._wake = asyncio.Event()
        self._in_flight: asyncio.Queue[tuple[asyncio.Future, list[_Target]]] = asyncio.Queue()
        self._reopen: dict[int, LiveRequest] = {}  # sequences to reopen on a new stream
        self._order = 0  # counts _send calls
        self._tasks: list[asyncio.Task] = []
        # Ids the tokenizer service can decode (0..vocab_size - 1), once the server knows: it
        # refuses a whole DecodeStream message for one id beyond, failing every stream in it.
        self.vocab_size: int | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_loop(), name="router-write"),
            loop.create_task(self._deliver_loop(), name="router-deliver"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def register(
        self, request_id: int, prompt_ids: list[int], stops: tuple[str, ...]
    ) -> LiveRequest:
        req = LiveRequest(request_id, list(prompt_ids[-CONTEXT_IDS:]), StopStringMatcher(stops))
        self._live[request_id] = req
        return req

    def _close_later(self, req: LiveRequest) -> None:
        """Free req's detokenizer state on the tokenizer side (if it has any there)."""
        opened_here = req.opened_epoch is not None and req.opened_epoch == self.decoder.epoch
        if opened_here and not req.closed:
            req.closed = True
            self._closes.append(req.request_id)
            self._wake.set()

    def release(self, request_id: int) -> None:
        """The RPC ended (finished, cancelled, failed): stop the sequence if it still runs
        and drop its detokenizer state."""
        req = self._live.pop(request_id, None)
        self._reopen.pop(request_id, None)
        if req is None:
            return
        if not req.done:
            self.engine.abort(request_id)
        self._close_later(req)

    def on_step(self, outputs: list[RequestOutput]) -> None:
        """Called on the event loop once per engine step."""
        self._steps.append(outputs)
        self._wake.set()

    # ---- writing: one message per step -----------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            if self._reopen:  # retry them even when no step comes (e.g. all finished)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_S):
                        await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake.clear()
            retry = bool(self._reopen)
            while self._steps or self._closes or retry:
                retry = False
                if len(self._steps) > MAX_BACKLOG:
                    outputs = [o for step in self._steps for o in step]
                    self._steps.clear()
                else:
                    outputs = self._steps.popleft() if self._steps else []
                closes, self._closes = self._closes, []
                try:
                    await self._send(outputs, closes)
                except Exception:  # never let one bad step stop streaming for everyone
                    log.exception("output router: sending a step failed")

    async def _send(self, outputs: list[RequestOutput], closes: list[int]) -> None:
        self._order += 1
        merged: dict[int, _Merged] = {}
        for out in outputs:
            req = self._live.get(out.request_id)
            if req is None or req.done:
                continue
            m = merged.setdefault(out.request_id, _Merged(order=self._order))
            m.ids.extend(out.new_token_ids)
            m.logprobs.extend(out.new_logprobs)
            m.last = out

        items: list[tpb.SequenceIds] = []
        targets: list[_Target] = []
        epoch = self.decoder.epoch
        for rid, m in merged.items():
            req = self._live[rid]
            try:
                seq = self._sequence_ids(req, m, epoch)
            except Exception as exc:  # one request's bug ends that request only
                self._fail_internal(req, exc, "sending its tokens to the tokenizer service")
                continue
            if seq is not None:
                items.append(seq)
                targets.append((req, m))
        self._reopen_ready(items, targets, epoch)
        for rid in closes:
            items.append(tpb.SequenceIds(sequence_id=rid, finished=True))
        # The tokenizer service takes at most 1024 sequences per message.
        for start in range(0, len(items), MAX_SEQUENCES_PER_MESSAGE):
            part = items[start : start + MAX_SEQUENCES_PER_MESSAGE]
            part_targets = targets[start : start + MAX_SEQUENCES_PER_MESSAGE]
            try:
                fut = await self.decoder.send(part)
            except TokenizerUnavailableError as exc:
                for req, m in targets[start:]:
                    self._lose(req, m, exc)
                return
            except TokenizerRequestError as exc:
                self._fail_all(targets[start:], exc)
                return
            if part_targets:
                for req, _ in part_targets:
                    req.in_flight += 1
                self._in_flight.put_nowait((fut, part_targets))
            else:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # closes only

    def _sequence_ids(self, req: LiveRequest, m: _Merged, epoch: int) -> tpb.SequenceIds | None:
        """req's part of this step's DecodeStream message, or None when it sends nothing now
        (failed, held for a reopen, or ended with no ids)."""
        last = m.last
        assert last is not None
        if last.finish_reason is FinishReason.ERROR:
            # a dead engine process is restarted: the client may retry elsewhere or later
            code = grpc.StatusCode.INTERNAL
            if last.engine_lost:
                code = grpc.StatusCode.UNAVAILABLE
            elif last.queue_full:  # the core's bound, shared by every frontend
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self._fail(req, code, last.error or "engine error")
            return None
        stale = req.opened_epoch is not None and req.opened_epoch != epoch
        if stale or req.request_id in self._reopen:
            self._hold(req, m)  # its detokenizer state is gone: reopened below
            return None
        if req.opened_epoch is None and not m.ids:
            if last.finished:  # ended before producing anything (e.g. cancelled while queued)
                self._finish(req, Delta([], "", finish_reason=last.finish_reason, output=last))
            return None
        self._check_ids(m.ids)
        seq = tpb.SequenceIds(sequence_id=req.request_id, ids=m.ids, finished=last.finished)
        if req.opened_epoch is None:
            seq.context_ids.extend(req.context_ids)
            seq.skip_special_tokens = True
            req.opened_epoch = epoch
        req.closed = last.finished
        return seq

    def _check_ids(self, ids: list[int]) -> None:
        if ids and self.vocab_size is not None and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise ValueError(
                f"token ids {bad[:5]} have no text (the tokenizer has {self.vocab_size} ids)"
            )

    # ---- reopening after the DecodeStream broke ---------------------------------------------
    def _wait_for_reopen(self, req: LiveRequest) -> None:
        if req.waiting_since is None:
            req.waiting_since = time.monotonic()
        self._reopen[req.request_id] = req
        self._wake.set()

    def _lose(self, req: LiveRequest, m: _Merged, error: TokenizerUnavailableError) -> None:
        """m's text was lost with the stream (or never sent): send its ids again. A request
        that never had an answer fails at once instead (UNAVAILABLE: clients retry those)."""
        if req.done:
            return
        if not req.answered:
            self._fail(req, grpc.StatusCode.UNAVAILABLE, str(error))
            return
        req.pending.append(m)
        self._wait_for_reopen(req)

    def _hold(self, req: LiveRequest, m: _Merged) -> None:
        """A step for a sequence waiting to be reopened."""
        req.pending.append(m)
        self._wait_for_reopen(req)

    def _reopen_ready(self, items: list[tpb.SequenceIds], targets: list[_Target], epoch: int):
        """Reopen, on the current stream, each waiting sequence whose old messages have all
        been answered or lost: context = ids whose text its client has, ids = the rest."""
        now = time.monotonic()
        for rid, req in list(self._reopen.items()):
            if req.done:
                del self._reopen[rid]
                continue
            if req.in_flight:
                continue  # an old message may still add to what was lost
            if now - (req.waiting_since or now) > REPLAY_TIMEOUT_S:
                del self._reopen[rid]
                self._fail(req, grpc.StatusCode.UNAVAILABLE,
                           "the tokenizer service has been away for "
                           f"{REPLAY_TIMEOUT_S:g}s during this stream; retry the request")  # fmt: skip
                continue
            del self._reopen[rid]
            m = _Merged()
            for part in sorted(req.pending, key=lambda p: p.order):
                m.extend(part)
                m.order = part.order
            req.pending = []
            try:
                self._check_ids(m.ids)
            except ValueError as exc:
                self._fail_internal(req, exc, "sending its tokens to the tokenizer service")
                continue
            finished = m.last is not None and m.last.finished
            items.append(tpb.SequenceIds(
                sequence_id=rid, ids=req.unemitted + m.ids, finished=finished,
                context_ids=req.context_ids, skip_special_tokens=True))  # fmt: skip
            req.opened_epoch = epoch
            req.closed = finished
            targets.append((req, m))

    # ---- delivering: answers in order ----------------------------------------------------
    async def _deliver_loop(self) -> None:
        while True:
            fut, targets = await self._in_flight.get()
            try:
                async with asyncio.timeout(self.decoder.client.timeout_s):
                    texts = await fut
            except (TimeoutError, TokenizerUnavailableError) as exc:
                error = exc
                if isinstance(exc, TimeoutError):
                    error = self.decoder.client.unavailable("DecodeStream: no answer in time")
                    self.decoder.reset(error)
                for req, m in targets:  # the stream broke: reopen on the next one
                    req.in_flight -= 1
                    self._lose(req, m, error)
                continue
            except TokenizerRequestError as exc:
                for req, _ in targets:
                    req.in_flight -= 1
                self._fail_all(targets, exc)
                continue
            for req, _ in targets:
                req.in_flight -= 1
            try:
                self._deliver(targets, texts)
            except Exception:
                log.exception("output router: delivering a step failed")

    def _deliver(self, targets: list[_Target], texts: list[str]) -> None:
        for (req, m), text in zip(targets, texts, strict=False):
            if req.done:
                continue
            if self._live.get(req.request_id) is not req:  # released meanwhile
                req.done = True
                continue
            try:
                self._deliver_one(req, m, text)
            except Exception as exc:  # one request's bug ends that request only
                self._fail_internal(req, exc, "turning its tokens into text")

    def _deliver_one(self, req: LiveRequest, m: _Merged, text: str) -> None:
        """Stop strings, then the Delta on req's queue."""
        last = m.last
        assert last is not None
        # What the tokenizer has turned into text: the context of a reopened sequence.
        if text:
            req.context_ids = (req.context_ids + req.unemitted + m.ids)[-CONTEXT_IDS:]
            req.unemitted = []
        else:
            req.unemitted += m.ids
        req.waiting_since = None
        req.answered = True
        emit, stopped = req.matcher.feed(text)
        if stopped:
            self.engine.abort(req.request_id)
            self._close_later(req)
            self._finish(req, Delta(m.ids, emit, m.logprobs, FinishReason.STOP, output=last))
        elif last.finished:
            emit += req.matcher.flush()
            self._finish(req, Delta(m.ids, emit, m.logprobs, last.finish_reason, output=last))
        else:
            req.queue.put_nowait(Delta(m.ids, emit, m.logprobs, output=last))

    # ---- endings ---------------------------------------------------------------------------
    def _finish(self, req: LiveRequest, delta: Delta) -> None:
        req.done = True
        req.queue.put_nowait(delta)

    def _fail(self, req: LiveRequest, code: grpc.StatusCode, message: str) -> None:
        if not req.done:
            self.engine.abort(req.request_id)
            self._close_later(req)
            self._finish(req, Delta([], "", error=RpcError(code, message)))

    def _fail_internal(self, req: LiveRequest, exc: Exception, doing: str) -> None:
        """A bug hit while serving req alone: INTERNAL for it, one log line (with where it was
        raised), the other requests go on."""
        log.error("request %d: %s failed (%s at %s); ended it with INTERNAL, the others go on",
                  req.request_id, doing, describe_error(exc), raised_at(exc))  # fmt: skip
        self._fail(
            req,
            grpc.StatusCode.INTERNAL,
            f"internal error while {doing} ({describe_error(exc)}); other requests are not "
            "affected; the inference service's log names this request",
        )

    def _fail_all(self, targets: list[_Target], exc: Exception) -> None:
        if isinstance(exc, TokenizerUnavailableError):
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        else:
            code, message = grpc.StatusCode.INTERNAL, f"tokenizer service: {exc}"
        for req, _ in targets:
            self._fail(req, code, message)
