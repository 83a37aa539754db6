"""The inference service's side of the tokenizer service: gRPC only.

Unary calls (Encode, ApplyChatTemplate, GetTokenizerInfo) carry deadlines and retry on
UNAVAILABLE with backoff. Incremental text comes from one long-lived, multiplexed DecodeStream
per process (`DecodeStreamMux`): one request message per engine step carries the new ids of
every running sequence. When the tokenizer goes away, calls raise TokenizerUnavailableError
(the server answers UNAVAILABLE); the channel reconnects by itself once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from kuiper.v1 import tokenizer_pb2 as tpb
from kuiper.v1 import tokenizer_pb2_grpc as tgrpc
from kuiper_client.channel import open_channel

from kuiper_serve.common.defaults import TOKENIZER_ADDRESS, TOKENIZER_ADDRESS_ENV

# Reconnect quickly after the tokenizer restarts (gRPC's default backoff grows to minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Every address the target resolves to gets a connection and calls take turns: with
    # dns:/// and a headless Service, that is every tokenizer pod (one address: as before).
    ("grpc.lb_policy_name", "round_robin"),
]


def default_address() -> str:
    return os.environ.get(TOKENIZER_ADDRESS_ENV) or TOKENIZER_ADDRESS


class TokenizerUnavailableError(Exception):
    """The tokenizer service cannot be reached (down, restarting, or too slow)."""


class TokenizerRequestError(Exception):
    """The tokenizer service rejected a request (e.g. INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: tuple[int, ...]
    has_chat_template: bool


class TokenizerClient:
    def __init__(
        self,
        address: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        *,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        token: str | None = None,
    ):
        """TLS when `tls` or `tls_ca` (trusting `tls_ca`, else the system roots); `token`: the
        tokenizer service's bearer token. Raises OSError when `tls_ca` cannot be read."""
        self.address = address or default_address()
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.channel, self.metadata = open_channel(
            self.address, tls=tls, ca=tls_ca, token=token, options=CHANNEL_OPTIONS, aio=True
        )
        self.stub = tgrpc.TokenizerServiceStub(self.channel)
        self.decoder = DecodeStreamMux(self)

    def unavailable(self, detail: str) -> TokenizerUnavailableError:
        return TokenizerUnavailableError(
            f"tokenizer service at {self.address} is unavailable ({detail}); "
            "start it with `kuiper serve-tokenizer` or check --tokenizer-address"
        )

    async def _call(self, method, request, timeout_s: float | None = None):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return await method(
                    request, timeout=timeout_s or self.timeout_s, metadata=self.metadata
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise self.unavailable(f"{code.name}: {exc.details()}") from None
                raise TokenizerRequestError(code, exc.details() or code.name) from None
        raise AssertionError("unreachable")

    async def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> Sequence[int]:
        """The ids of text (the response's repeated field: a caller that may refuse a long
        prompt checks its length before converting it)."""
        req = tpb.EncodeRequest(
            texts=[text],
            add_special_tokens=add_special_tokens,
            split_special_tokens=split_special_tokens,
        )
        resp = await self._call(self.stub.Encode, req)
        return resp.results[0].ids

    async def apply_chat_template(
        self, messages: Sequence[tuple[str, str]]
    ) -> tuple[str, Sequence[int]]:
        """The prompt's text and ids (a repeated field, as encode's)."""
        req = tpb.ChatTemplateRequest(
            messages=[tpb.ChatMessage(role=r, content=c) for r, c in messages],
            add_generation_prompt=True,
        )
        resp = await self._call(self.stub.ApplyChatTemplate, req)
        return resp.text, resp.ids

    async def info(self, timeout_s: float | None = None) -> TokenizerInfo:
        resp = await self._call(
            self.stub.GetTokenizerInfo, tpb.GetTokenizerInfoRequest(), timeout_s
        )
        return TokenizerInfo(
            vocab_size=resp.vocab_size,
            bos_id=resp.bos_id if resp.HasField("bos_id") else None,
            eos_id=resp.eos_id if resp.HasField("eos_id") else None,
            stop_ids=tuple(resp.stop_ids),
            has_chat_template=resp.has_chat_template,
        )

    async def close(self) -> None:
        await self.decoder.close()
        await self.channel.close()


class DecodeStreamMux:
    """One DecodeStream shared by every sequence of this process, pipelined: `send` writes one
    message and returns a future for its response (responses come back in order), so the
    next engine step's message need not wait for the previous answer. A failed stream is
    dropped (the tokenizer's per-sequence state went with it), every pending future fails
    with TokenizerUnavailableError, and a new stream opens on the next send; `epoch` counts
    the replacements so callers know which sequences lost their state."""

    def __init__(self, client: TokenizerClient):
        self.client = client
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._waiters: deque[tuple[asyncio.Future, int]] = deque()
        self._lock = asyncio.Lock()
        self.epoch = 0  # bumped whenever the stream is replaced

    def _error(self, exc: BaseException) -> Exception:
        if isinstance(exc, grpc.aio.AioRpcError):
            return self._status_error(exc.code(), exc.details())
        if isinstance(exc, TokenizerUnavailableError | TokenizerRequestError):
            return exc
        return self.client.unavailable(f"DecodeStream: {type(exc).__name__} {exc}".strip())

    def _status_error(self, code: grpc.StatusCode, details: str | None) -> Exception:
        # grpc's own "Internal error from Core" (not the server's INTERNAL): the connection
        # broke under a write, e.g. the tokenizer process was killed.
        broken = code == grpc.StatusCode.INTERNAL and details == "Internal error from Core"
        if broken or code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return self.client.unavailable(f"DecodeStream: {details}")
        return TokenizerRequestError(code, details or code.name)

    async def _write_error(self, call: grpc.aio.StreamStreamCall, exc: BaseException) -> Exception:
        """The error for a failed write. A write into a stream the tokenizer service has just
        ended fails with a bare "Internal error from Core"; the call's own status says why
        (e.g. INVALID_ARGUMENT naming the id it could not decode)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            with contextlib.suppress(Exception):  # no status within a second: the write's error
                async with asyncio.timeout(1.0):
                    code, details = await call.code(), await call.details()
                if code != grpc.StatusCode.OK:
                    return self._status_error(code, details)
            # No status of its own: the connection went (e.g. the tokenizer was killed).
            return self.client.unavailable(f"DecodeStream write failed: {exc.details()}")
        return self._error(exc)

    def reset(self, error: Exception | None = None) -> None:
        """Drop the stream; fail every response still awaited."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
            self.epoch += 1
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        error = error or self.client.unavailable("DecodeStream was reset")
        waiters, self._waiters = self._waiters, deque()
        for fut, _ in waiters:
            if not fut.done():
                fut.set_exception(error)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise self.client.unavailable("DecodeStream closed by the tokenizer service")
                fut, n = self._waiters.popleft()
                if len(resp.deltas) != n:
                    raise TokenizerRequestError(
                        grpc.StatusCode.INTERNAL,
                        f"DecodeStream answered {len(resp.deltas)} deltas for {n} sequences",
                    )
                if not fut.done():
                    fut.set_result([d.text for d in resp.deltas])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: everyone waiting learns why
            if call is self._call:
                self.reset(self._error(exc))

    async def send(self, sequences: list[tpb.SequenceIds]) -> asyncio.Future:
        """Write one message with these sequences' new ids; the returned future resolves to
        their text deltas (in order) or fails with TokenizerUnavailableError."""
        async with self._lock:
            if self._call is None:
                self._call = self.client.stub.DecodeStream(metadata=self.client.metadata)
                self._reader = asyncio.get_running_loop().create_task(self._read(self._call))
            call = self._call
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((fut, len(sequences)))
            try:
                async with asyncio.timeout(self.client.timeout_s):
                    await call.write(tpb.DecodeStreamRequest(sequences=sequences))
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as exc:
                error = await self._write_error(call, exc)
                if call is self._call:
                    self.reset(error)
                if not fut.done():
                    fut.set_exception(error)
                fut.exception()  # retrieved: the caller gets the raise below instead
                raise error from None
            return fut

    async def decode(self, sequences: list[tpb.SequenceIds]) -> list[str]:
        """send(), then wait (with the client's deadline) for the answer."""
        if not sequences:
            return []
        fut = await self.send(sequences)
        try:
            async with asyncio.timeout(self.client.timeout_s):
                return await fut
        except TimeoutError:
            self.reset()
            raise self.client.unavailable("DecodeStream: no answer in time") from None

    async def close(self) -> None:
        async with self._lock:
            if self._call is not None:
                with contextlib.suppress(Exception):  # a broken stream has nothing to close
                    await self._call.done_writing()
            self.reset()
