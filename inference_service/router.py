"""From engine steps to per-request text deltas.

The engine hands each step's outputs to the event loop; the router batches the new ids of
every live request into ONE DecodeStream message, matches stop strings on the returned text
(holding back what could start one), and puts a `Delta` on each request's asyncio queue.
If the loop falls behind, steps that piled up are merged into one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
from kuiper.v1 import tokenizer_pb2 as tpb

from inference_service.engine.engine import Engine, RequestOutput
from inference_service.engine.sampling_params import SampleOutput
from inference_service.engine.sequence import FinishReason
from inference_service.engine.stop_strings import StopStringMatcher
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
    done: bool = False


@dataclass
class _Merged:
    ids: list[int] = field(default_factory=list)
    logprobs: list[SampleOutput] = field(default_factory=list)
    last: RequestOutput | None = None


class OutputRouter:
    def __init__(self, engine: Engine, decoder: DecodeStreamMux):
        self.engine = engine
        self.decoder = decoder
        self._live: dict[int, LiveRequest] = {}
        self._pending: list[RequestOutput] = []
        self._closes: list[int] = []  # opened sequences to close on the tokenizer side
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="output-router")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def num_live(self) -> int:
        return len(self._live)

    def register(
        self, request_id: int, prompt_ids: list[int], stops: tuple[str, ...]
    ) -> LiveRequest:
        req = LiveRequest(request_id, list(prompt_ids[-CONTEXT_IDS:]), StopStringMatcher(stops))
        self._live[request_id] = req
        return req

    def release(self, request_id: int) -> None:
        """The RPC ended (finished, cancelled, failed): stop the sequence if it still runs
        and drop its detokenizer state."""
        req = self._live.pop(request_id, None)
        if req is None:
            return
        if not req.done:
            self.engine.abort(request_id)
        if req.opened_epoch is not None and req.opened_epoch == self.decoder.epoch and not req.done:
            self._closes.append(request_id)
            self._wake.set()

    def on_step(self, outputs: list[RequestOutput]) -> None:
        """Called on the event loop once per engine step."""
        self._pending.extend(outputs)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            outputs, self._pending = self._pending, []
            closes, self._closes = self._closes, []
            try:
                await self._process(outputs, closes)
            except Exception:  # never let one bad step kill streaming for everyone
                log.exception("output router step failed")

    def _finish(self, req: LiveRequest, delta: Delta) -> None:
        req.done = True
        req.queue.put_nowait(delta)

    def _fail(self, req: LiveRequest, code: grpc.StatusCode, message: str) -> None:
        if not req.done:
            self.engine.abort(req.request_id)
            if req.opened_epoch is not None and req.opened_epoch == self.decoder.epoch:
                self._closes.append(req.request_id)  # free its detokenizer state
                self._wake.set()
            self._finish(req, Delta([], "", error=RpcError(code, message)))

    async def _process(self, outputs: list[RequestOutput], closes: list[int]) -> None:
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
        targets: list[tuple[LiveRequest, _Merged, bool]] = []
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
            finishing = last.finished
            if req.opened_epoch is None and not m.ids:
                if finishing:  # ended before producing anything (e.g. cancelled while queued)
                    self._finish(req, Delta([], "", finish_reason=last.finish_reason, output=last))
                continue
            seq = tpb.SequenceIds(sequence_id=rid, ids=m.ids, finished=finishing)
            opening = req.opened_epoch is None
            if opening:
                seq.context_ids.extend(req.context_ids)
                seq.skip_special_tokens = True
            items.append(seq)
            targets.append((req, m, opening))
        for rid in closes:
            items.append(tpb.SequenceIds(sequence_id=rid, finished=True))
        if not items:
            return

        try:
            texts = await self.decoder.decode(items)
        except TokenizerUnavailableError as exc:
            for req, _, _ in targets:
                self._fail(req, grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        except TokenizerRequestError as exc:
            for req, _, _ in targets:
                self._fail(req, grpc.StatusCode.INTERNAL, f"tokenizer service: {exc}")
            return

        for (req, m, opening), text in zip(targets, texts, strict=False):
            if opening:
                req.opened_epoch = self.decoder.epoch
                if self._live.get(req.request_id) is not req and not m.last.finished:
                    # released while its opening message was in flight: close it now
                    self._closes.append(req.request_id)
                    self._wake.set()
            if req.done or self._live.get(req.request_id) is not req:
                continue
            last = m.last
            assert last is not None
            emit, stopped = req.matcher.feed(text)
            if stopped:
                self.engine.abort(req.request_id)
                if not last.finished:  # free the tokenizer's state for it
                    self._closes.append(req.request_id)
                    self._wake.set()
                self._finish(req, Delta(m.ids, emit, m.logprobs, FinishReason.STOP, output=last))
            elif last.finished:
                emit += req.matcher.flush()
                self._finish(req, Delta(m.ids, emit, m.logprobs, last.finish_reason, output=last))
            else:
                req.queue.put_nowait(Delta(m.ids, emit, m.logprobs, output=last))
