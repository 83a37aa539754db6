"""From engine steps to per-request text deltas.

The engine hands each step's outputs to the event loop; the router sends the new ids of every
live request of that step in ONE DecodeStream message (pipelined: it does not wait for the
previous step's answer), and, as answers come back in order, matches stop strings on the
text (holding back what could start one) and puts a `Delta` on each request's asyncio queue.
So every step reaches the clients as its own message; only when more than MAX_BACKLOG steps
pile up (the loop or the tokenizer fall behind) are they merged into one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

import grpc
from kuiper.v1 import tokenizer_pb2 as tpb

from inference_service.engine.engine import Engine, RequestOutput
from inference_service.engine.sequence import FinishReason
from inference_service.engine.stop_strings import StopStringMatcher
from inference_service.sampling.params import SampleOutput
from inference_service.tokenizer_client import (
    DecodeStreamMux,
    TokenizerRequestError,
    TokenizerUnavailableError,
)

log = logging.getLogger(__name__)

CONTEXT_IDS = 16  # prompt ids sent when a sequence opens: enough for leading-space rules


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
class LiveRequest:
    request_id: int
    context_ids: list[int]
    matcher: StopStringMatcher
    queue: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    opened_epoch: int | None = None  # DecodeStream epoch its detokenizer state lives in
    closed: bool = False  # a finished=True message for it was sent
    done: bool = False  # its last Delta was delivered


@dataclass
class _Merged:
    ids: list[int] = field(default_factory=list)
    logprobs: list[SampleOutput] = field(default_factory=list)
    last: RequestOutput | None = None


MAX_SEQUENCES_PER_MESSAGE = 1024  # the tokenizer service's limit per DecodeStream message
MAX_BACKLOG = 16  # pending steps beyond which they are merged: bounds the lag under overload

_Target = tuple[LiveRequest, _Merged]


class OutputRouter:
    def __init__(self, engine: Engine, decoder: DecodeStreamMux):
        self.engine = engine
        self.decoder = decoder
        self._live: dict[int, LiveRequest] = {}
        self._steps: deque[list[RequestOutput]] = deque()
        self._closes: list[int] = []  # opened sequences to close on the tokenizer side
        self._wake = asyncio.Event()
        self._in_flight: asyncio.Queue[tuple[asyncio.Future, list[_Target]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

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
            await self._wake.wait()
            self._wake.clear()
            while self._steps or self._closes:
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
        merged: dict[int, _Merged] = {}
        for out in outputs:
            req = self._live.get(out.request_id)
            if req is None or req.done:
                continue
            m = merged.setdefault(out.request_id, _Merged())
            m.ids.extend(out.new_token_ids)
            m.logprobs.extend(out.new_logprobs)
            m.last = out

        items: list[tpb.SequenceIds] = []
        targets: list[_Target] = []
        epoch = self.decoder.epoch
        for rid, m in merged.items():
            req = self._live[rid]
            last = m.last
            assert last is not None
            if last.finish_reason is FinishReason.ERROR:
                self._fail(req, grpc.StatusCode.INTERNAL, last.error or "engine error")
                continue
            if req.opened_epoch is not None and req.opened_epoch != epoch:
                self._fail(
                    req,
                    grpc.StatusCode.UNAVAILABLE,
                    "the tokenizer service restarted during this stream; retry the request",
                )
                continue
            if req.opened_epoch is None and not m.ids:
                if last.finished:  # ended before producing anything (e.g. cancelled while queued)
                    self._finish(req, Delta([], "", finish_reason=last.finish_reason, output=last))
                continue
            seq = tpb.SequenceIds(sequence_id=rid, ids=m.ids, finished=last.finished)
            if req.opened_epoch is None:
                seq.context_ids.extend(req.context_ids)
                seq.skip_special_tokens = True
                req.opened_epoch = epoch
            req.closed = last.finished
            items.append(seq)
            targets.append((req, m))
        for rid in closes:
            items.append(tpb.SequenceIds(sequence_id=rid, finished=True))
        # The tokenizer service takes at most 1024 sequences per message.
        for start in range(0, len(items), MAX_SEQUENCES_PER_MESSAGE):
            part = items[start : start + MAX_SEQUENCES_PER_MESSAGE]
            part_targets = targets[start : start + MAX_SEQUENCES_PER_MESSAGE]
            try:
                fut = await self.decoder.send(part)
            except (TokenizerUnavailableError, TokenizerRequestError) as exc:
                self._fail_all(targets[start:], exc)
                return
            if part_targets:
                self._in_flight.put_nowait((fut, part_targets))
            else:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # closes only

    # ---- delivering: answers in order ----------------------------------------------------
    async def _deliver_loop(self) -> None:
        while True:
            fut, targets = await self._in_flight.get()
            try:
                async with asyncio.timeout(self.decoder.client.timeout_s):
                    texts = await fut
            except TimeoutError:
                self.decoder.reset()
                self._fail_all(
                    targets, self.decoder.client.unavailable("DecodeStream: no answer in time")
                )
                continue
            except (TokenizerUnavailableError, TokenizerRequestError) as exc:
                self._fail_all(targets, exc)
                continue
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
            last = m.last
            assert last is not None
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

    def _fail_all(self, targets: list[_Target], exc: Exception) -> None:
        if isinstance(exc, TokenizerUnavailableError):
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        else:
            code, message = grpc.StatusCode.INTERNAL, f"tokenizer service: {exc}"
        for req, _ in targets:
            self._fail(req, code, message)
