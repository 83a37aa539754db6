"""Typed Python clients for kuiper-serve: `KuiperClient` (blocking) and `AsyncKuiperClient`.

Both stream Generate/Chat as `GenerateChunk`s, take a deadline per call (`timeout`, seconds),
retry on UNAVAILABLE while no token has arrived yet (the server was starting, draining or
briefly unreachable), and raise `KuiperError` (with the gRPC status code) otherwise.
Encode/Decode go to the tokenizer service (`tokenizer_address`). `tls_ca` / `tls` connect
with TLS, `token` sends the bearer token a server started with --auth-token requires (the
same settings serve both services).
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper.v1 import tokenizer_pb2 as tpb
from kuiper.v1 import tokenizer_pb2_grpc as tgrpc

from kuiper_client.channel import DEFAULT_ADDRESS, DEFAULT_TOKENIZER_ADDRESS, open_channel

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
FINISH_NAMES = {
    ipb.FINISH_REASON_LENGTH: "length",
    ipb.FINISH_REASON_STOP: "stop",
    ipb.FINISH_REASON_EOS: "eos",
    ipb.FINISH_REASON_CANCELLED: "cancelled",
}

Message = Mapping[str, str] | tuple[str, str]


class KuiperError(Exception):
    """A failed call: `code` is the gRPC status code, the message says what to do."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> KuiperError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code, details or code.name)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    queue_time_s: float
    cached_prompt_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed message: ids and text since the previous one; the last one carries
    finish_reason ("length", "stop", "eos", "cancelled") and usage."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    """A whole generation, joined."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    architecture: str
    vocab_size: int
    context_length: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    device: str
    kv_block_size: int
    kv_blocks_total: int
    max_batch_size: int


_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


def _check_range(name: str, value: int, lo: int, hi: int, note: str = "") -> None:
    try:
        ok = not isinstance(value, bool) and lo <= operator.index(value) <= hi
    except TypeError:
        ok = False
    if not ok:
        hint = f"; {note}" if note else ""
        raise KuiperError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name} must be an integer in [{lo}, {hi}]{hint}, got {value!r}",
        )


def sampling_params(
    max_new_tokens: int = 0,
    temperature: float | None = None,
    top_k: int = 0,
    top_p: float | None = None,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
) -> ipb.SamplingParams:
    """The proto SamplingParams; None leaves a field unset (the server default). A value the
    proto field cannot hold raises KuiperError(INVALID_ARGUMENT) naming the field (protobuf
    itself only says "Value out of range")."""
    _check_range("max_new_tokens", max_new_tokens, 0, _UINT32_MAX, "0: server default")
    _check_range("top_k", top_k, -(2**31), _INT32_MAX)  # the server judges negative values
    if seed is not None:
        _check_range("seed", seed, 0, _UINT64_MAX)
    if logprobs is not None:
        _check_range("logprobs", logprobs, 0, _UINT32_MAX)
    for t in stop_token_ids:
        _check_range("stop_token_ids", t, 0, _UINT32_MAX)
    p = ipb.SamplingParams(
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        min_p=min_p,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
    )
    if temperature is not None:
        p.temperature = temperature
    if top_p is not None:
        p.top_p = top_p
    if repetition_penalty is not None:
        p.repetition_penalty = repetition_penalty
    if seed is not None:
        p.seed = seed
    if logprobs is not None:
        p.logprobs = logprobs
    return p


def generate_request(
    prompt: str | Sequence[int],
    add_special_tokens: bool | None = None,
    request_id: str = "",
    **sampling,
) -> ipb.GenerateRequest:
    req = ipb.GenerateRequest(sampling=sampling_params(**sampling), request_id=request_id)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def chat_request(messages: Sequence[Message], request_id: str = "", **sampling) -> ipb.ChatRequest:
    msgs = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        msgs.append(tpb.ChatMessage(role=role, content=content))
    return ipb.ChatRequest(
        messages=msgs, sampling=sampling_params(**sampling), request_id=request_id
    )


def _chunk(resp: ipb.GenerateResponse) -> GenerateChunk:
    usage = None
    if resp.HasField("usage"):
        u = resp.usage
        usage = Usage(
            u.prompt_tokens,
            u.completion_tokens,
            u.time_to_first_token_s,
            u.queue_time_s,
            u.cached_prompt_tokens,
        )
    return GenerateChunk(
        token_ids=list(resp.token_ids),
        text=resp.text,
        finish_reason=FINISH_NAMES.get(resp.finish_reason),
        usage=usage,
        logprobs=[
            TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
            for lp in resp.logprobs
        ],
    )


def join_chunks(chunks: Sequence[GenerateChunk]) -> Completion:
    ids = [t for c in chunks for t in c.token_ids]
    last = chunks[-1] if chunks else None
    return Completion(
        ids,
        "".join(c.text for c in chunks),
        last.finish_reason if last else None,
        last.usage if last else None,
    )


def _model_info(m: ipb.ModelInfo) -> ModelInfo:
    return ModelInfo(**{f: getattr(m, f) for f in ModelInfo.__dataclass_fields__})


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _encode_request(texts: Sequence[str], add_special_tokens: bool | None) -> tpb.EncodeRequest:
    req = tpb.EncodeRequest(texts=list(texts))
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def _decode_request(
    sequences: Sequence[Sequence[int]], skip_special_tokens: bool
) -> tpb.DecodeRequest:
    return tpb.DecodeRequest(
        sequences=[tpb.TokenIds(ids=list(s)) for s in sequences],
        skip_special_tokens=skip_special_tokens,
    )


class _ClientBase:
    """What the blocking and asyncio clients share: settings, channels and when to retry.
    Subclasses differ only in how they wait (blocking vs await)."""

    _aio: bool  # grpc.aio channels (AsyncKuiperClient) or blocking ones

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        tokenizer_address: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.2,
        *,
        tls_ca: str | Path | None = None,
        tls: bool = False,
        token: str | None = None,
    ):
        """`tls_ca`: connect with TLS trusting this PEM CA certificate; `tls`: TLS trusting the
        system's CAs; `token`: the servers' bearer token. OSError when `tls_ca` is unreadable."""
        self.address = address
        self.tokenizer_address = tokenizer_address or DEFAULT_TOKENIZER_ADDRESS
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._security = {"tls": tls, "ca": tls_ca, "token": token}
        self._channel, self._metadata = self._open(address)
        self._stub = igrpc.InferenceServiceStub(self._channel)
        self._tok_channel: grpc.Channel | grpc.aio.Channel | None = None

    def _open(self, address: str) -> tuple[Any, tuple[tuple[str, str], ...]]:
        return open_channel(address, options=CHANNEL_OPTIONS, aio=self._aio, **self._security)

    def _tokenizer(self) -> tgrpc.TokenizerServiceStub:
        if self._tok_channel is None:
            self._tok_channel, _ = self._open(self.tokenizer_address)
        return tgrpc.TokenizerServiceStub(self._tok_channel)

    def _call_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _retry_stream(
        self,
        exc: grpc.RpcError,
        received: bool,
        attempt: int,
        deadline: float | None,
        delay: float,
    ) -> bool:
        """Retry only while nothing has arrived (a retry would repeat tokens otherwise)."""
        return (
            exc.code() == grpc.StatusCode.UNAVAILABLE
            and not received
            and attempt < self.retries
            and (deadline is None or time.monotonic() + delay < deadline)
        )

    def _retry_unary(self, exc: grpc.RpcError, attempt: int) -> bool:
        return exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries


class KuiperClient(_ClientBase):
    """Blocking client. Use as a context manager, or call close()."""

    _aio = False

    def __enter__(self) -> KuiperClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        if self._tok_channel is not None:
            self._tok_channel.close()

    def _stream(self, method, request, timeout: float | None) -> Iterator[GenerateChunk]:
        timeout = self._call_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self.backoff
        for attempt in range(self.retries + 1):
            call = method(request, timeout=_remaining(deadline), metadata=self._metadata)
            received = False
            try:
                for resp in call:
                    received = True
                    yield _chunk(resp)
                return
            except grpc.RpcError as exc:
                if not self._retry_stream(exc, received, attempt, deadline, delay):
                    raise KuiperError.from_rpc(exc) from None
                time.sleep(delay)
                delay *= 2
            finally:
                call.cancel()  # no-op when done; stops the server's work when we stop early

    def _unary(self, method, request, timeout: float | None):
        timeout = self._call_timeout(timeout)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if self._retry_unary(exc, attempt):
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise KuiperError.from_rpc(exc) from None
        raise AssertionError("unreachable")

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        add_special_tokens: bool | None = None,
        request_id: str = "",
        **sampling,
    ) -> Iterator[GenerateChunk]:
        """Stream a continuation of `prompt` (text, or token ids). Sampling keywords:
        max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
        stop_token_ids, ignore_eos, logprobs."""
        req = generate_request(prompt, add_special_tokens, request_id, **sampling)
        return self._stream(self._stub.Generate, req, timeout)

    def chat(
        self, messages: Sequence[Message], *, timeout: float | None = None, **sampling
    ) -> Iterator[GenerateChunk]:
        """Stream the assistant's answer to `messages` ({"role", "content"} or (role, content))."""
        return self._stream(self._stub.Chat, chat_request(messages, **sampling), timeout)

    def complete(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        """generate(), joined into one Completion."""
        return join_chunks(list(self.generate(prompt, **kwargs)))

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        return _model_info(self._unary(self._stub.GetModelInfo, ipb.GetModelInfoRequest(), timeout))

    def encode(
        self,
        texts: Sequence[str],
        add_special_tokens: bool | None = None,
        timeout: float | None = None,
    ) -> list[list[int]]:
        req = _encode_request(texts, add_special_tokens)
        resp = self._unary(self._tokenizer().Encode, req, timeout)
        return [list(r.ids) for r in resp.results]

    def decode(
        self,
        sequences: Sequence[Sequence[int]],
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        req = _decode_request(sequences, skip_special_tokens)
        return list(self._unary(self._tokenizer().Decode, req, timeout).texts)


class AsyncKuiperClient(_ClientBase):
    """asyncio client (grpc.aio). Use `async with`, or await close()."""

    _aio = True

    async def __aenter__(self) -> AsyncKuiperClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()
        if self._tok_channel is not None:
            await self._tok_channel.close()

    async def _stream(self, method, request, timeout: float | None) -> AsyncIterator[GenerateChunk]:
        timeout = self._call_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self.backoff
        for attempt in range(self.retries + 1):
            call = method(request, timeout=_remaining(deadline), metadata=self._metadata)
            received = False
            try:
                async for resp in call:
                    received = True
                    yield _chunk(resp)
                return
            except grpc.RpcError as exc:
                if not self._retry_stream(exc, received, attempt, deadline, delay):
                    raise KuiperError.from_rpc(exc) from None
                await asyncio.sleep(delay)
                delay *= 2
            finally:
                call.cancel()

    async def _unary(self, method, request, timeout: float | None):
        timeout = self._call_timeout(timeout)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if self._retry_unary(exc, attempt):
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                raise KuiperError.from_rpc(exc) from None
        raise AssertionError("unreachable")

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        add_special_tokens: bool | None = None,
        request_id: str = "",
        **sampling,
    ) -> AsyncIterator[GenerateChunk]:
        req = generate_request(prompt, add_special_tokens, request_id, **sampling)
        return self._stream(self._stub.Generate, req, timeout)

    def chat(
        self, messages: Sequence[Message], *, timeout: float | None = None, **sampling
    ) -> AsyncIterator[GenerateChunk]:
        return self._stream(self._stub.Chat, chat_request(messages, **sampling), timeout)

    async def complete(self, prompt: str | Sequence[int], **kwargs) -> Completion:
        return join_chunks([c async for c in self.generate(prompt, **kwargs)])

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        resp = await self._unary(self._stub.GetModelInfo, ipb.GetModelInfoRequest(), timeout)
        return _model_info(resp)

    async def encode(
        self,
        texts: Sequence[str],
        add_special_tokens: bool | None = None,
        timeout: float | None = None,
    ) -> list[list[int]]:
        req = _encode_request(texts, add_special_tokens)
        resp = await self._unary(self._tokenizer().Encode, req, timeout)
        return [list(r.ids) for r in resp.results]

    async def decode(
        self,
        sequences: Sequence[Sequence[int]],
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        req = _decode_request(sequences, skip_special_tokens)
        return list((await self._unary(self._tokenizer().Decode, req, timeout)).texts)
