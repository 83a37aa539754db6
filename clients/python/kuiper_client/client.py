"""Typed Python clients for kuiper-serve: `KuiperClient` (blocking) and `AsyncKuiperClient`.

They cover every RPC of both services: Generate, Chat and GetModelInfo on the inference
service; Encode, Decode, DecodeStream, ApplyChatTemplate and GetTokenizerInfo on the tokenizer
service (`tokenizer_address`, by default port 50052 on the inference service's host); and
grpc.health.v1 on both. Generate/Chat stream `GenerateChunk`s. Every call takes a deadline
(`timeout`, seconds), retries on UNAVAILABLE while nothing has arrived yet (the server was
starting, draining or briefly unreachable), and raises `KuiperError` (with the gRPC status
code) otherwise. `tls_ca` / `tls` connect with TLS, `token` sends the bearer token a server
started with --auth-token requires (the same settings serve both services).

Only grpcio, protobuf and the kuiper.v1 stubs are imported: this package installs alone
(`pip install ./clients/python`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import grpc
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper.v1 import tokenizer_pb2 as tpb
from kuiper.v1 import tokenizer_pb2_grpc as tgrpc

from kuiper_client import health
from kuiper_client.channel import (
    DEFAULT_ADDRESS,
    DEFAULT_TOKENIZER_ADDRESS,
    TOKENIZER_PORT,
    open_channel,
)
from kuiper_client.decode_stream import AsyncDecodeStream, DecodeStream
from kuiper_client.types import (
    INT32_MAX,
    UINT32_MAX,
    UINT64_MAX,
    ChatTemplate,
    Completion,
    GenerateChunk,
    KuiperError,
    ModelInfo,
    TokenizerInfo,
    TokenLogprob,
    Usage,
    check_ids,
    check_range,
)

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
    check_range("max_new_tokens", max_new_tokens, 0, UINT32_MAX, "0: server default")
    check_range("top_k", top_k, -(2**31), INT32_MAX)  # the server judges negative values
    if seed is not None:
        check_range("seed", seed, 0, UINT64_MAX)
    if logprobs is not None:
        check_range("logprobs", logprobs, 0, UINT32_MAX)
    check_ids(stop_token_ids, "stop_token_ids")
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
        req.token_ids.ids.extend(check_ids(prompt, "prompt"))
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def chat_request(messages: Sequence[Message], request_id: str = "", **sampling) -> ipb.ChatRequest:
    return ipb.ChatRequest(
        messages=_chat_messages(messages),
        sampling=sampling_params(**sampling),
        request_id=request_id,
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


def tokenizer_address_for(address: str) -> str:
    """The tokenizer service's usual address for an inference service at `address`: the same
    host, port 50052 (what `kuiper up` runs). Addresses without a host:port (e.g. unix:...)
    get localhost:50052."""
    m = re.fullmatch(r"((?:dns:(?:///)?|ipv4:|ipv6:)?(?:\[[^\]]*\]|[^:/\[\]]*)):\d+", address)
    return f"{m.group(1) or 'localhost'}:{TOKENIZER_PORT}" if m else DEFAULT_TOKENIZER_ADDRESS


def _encode_request(texts: Sequence[str], add_special_tokens: bool | None) -> tpb.EncodeRequest:
    if not all(isinstance(t, str) for t in texts):
        raise KuiperError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"encode() takes a str or a list of str, got {texts!r}",
        )
    req = tpb.EncodeRequest(texts=list(texts))
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def _is_batch(ids: Sequence[int] | Sequence[Sequence[int]]) -> bool:
    """A list of id lists (a batch) rather than one list of ids."""
    return len(ids) > 0 and all(isinstance(s, Sequence) and not isinstance(s, str) for s in ids)


def _decode_request(
    sequences: Sequence[Sequence[int]], skip_special_tokens: bool
) -> tpb.DecodeRequest:
    return tpb.DecodeRequest(
        sequences=[tpb.TokenIds(ids=check_ids(s, "ids")) for s in sequences],
        skip_special_tokens=skip_special_tokens,
    )


def _chat_messages(messages: Sequence[Message]) -> list[tpb.ChatMessage]:
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        out.append(tpb.ChatMessage(role=role, content=content))
    return out


def _tokenizer_info(r: tpb.TokenizerInfo) -> TokenizerInfo:
    def optional(name: str) -> int | None:
        return getattr(r, name) if r.HasField(name) else None

    return TokenizerInfo(
        vocab_size=r.vocab_size,
        bos_id=optional("bos_id"),
        eos_id=optional("eos_id"),
        pad_id=optional("pad_id"),
        special_tokens=[(t.id, t.content) for t in r.special_tokens],
        has_chat_template=r.has_chat_template,
        backend=r.backend,
        source=r.source,
        stop_ids=list(r.stop_ids),
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
        """`tokenizer_address`: default the same host as `address`, port 50052. `tls_ca`:
        connect with TLS trusting this PEM CA certificate; `tls`: TLS trusting the system's
        CAs; `token`: the servers' bearer token. OSError when `tls_ca` is unreadable."""
        self.address = address
        self.tokenizer_address = tokenizer_address or tokenizer_address_for(address)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._security = {"tls": tls, "ca": tls_ca, "token": token}
        self._channel, self._metadata = self._open(address)
        self._stub = igrpc.InferenceServiceStub(self._channel)
        self._tok_channel: grpc.Channel | grpc.aio.Channel | None = None

    def _open(self, address: str) -> tuple[Any, tuple[tuple[str, str], ...]]:
        return open_channel(address, options=CHANNEL_OPTIONS, aio=self._aio, **self._security)

    def _tokenizer_channel(self) -> Any:
        if self._tok_channel is None:
            self._tok_channel, _ = self._open(self.tokenizer_address)
        return self._tok_channel

    def _tokenizer(self) -> tgrpc.TokenizerServiceStub:
        return tgrpc.TokenizerServiceStub(self._tokenizer_channel())

    def _health_check(self, server: str) -> Any:
        """grpc.health.v1 Check on the 'inference' or the 'tokenizer' server."""
        if server not in ("inference", "tokenizer"):
            raise ValueError(f"server must be 'inference' or 'tokenizer', not {server!r}")
        channel = self._channel if server == "inference" else self._tokenizer_channel()
        return health.check_method(channel)

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

    def _unary(self, method, request, timeout: float | None, retry: bool = True):
        timeout = self._call_timeout(timeout)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if retry and self._retry_unary(exc, attempt):
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

    @overload
    def encode(
        self, texts: str, add_special_tokens: bool | None = None, timeout: float | None = None
    ) -> list[int]: ...
    @overload
    def encode(
        self,
        texts: Sequence[str],
        add_special_tokens: bool | None = None,
        timeout: float | None = None,
    ) -> list[list[int]]: ...
    def encode(self, texts, add_special_tokens=None, timeout=None):
        """Token ids of one text (a list of ids) or of each text of a list (a list of lists).
        `add_special_tokens` unset: as the model's tokenizer does by default (e.g. BOS)."""
        single = isinstance(texts, str)
        req = _encode_request([texts] if single else texts, add_special_tokens)
        ids = [list(r.ids) for r in self._unary(self._tokenizer().Encode, req, timeout).results]
        return ids[0] if single else ids

    @overload
    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = False, timeout: float | None = None
    ) -> str: ...
    @overload
    def decode(
        self,
        ids: Sequence[Sequence[int]],
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> list[str]: ...
    def decode(self, ids, skip_special_tokens=False, timeout=None):
        """Text of one list of ids (a str) or of each list in a list of lists (a list)."""
        batch = _is_batch(ids)
        req = _decode_request(ids if batch else [ids], skip_special_tokens)
        texts = list(self._unary(self._tokenizer().Decode, req, timeout).texts)
        return texts if batch else texts[0]

    def decode_stream(self, timeout: float | None = None) -> DecodeStream:
        """Incremental detokenization over one DecodeStream call (see `DecodeStream`); the
        deadline covers the whole stream. Use as a context manager."""
        method = self._tokenizer().DecodeStream
        return DecodeStream(method, self._call_timeout(timeout), self._metadata)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        timeout: float | None = None,
    ) -> ChatTemplate:
        """`messages` rendered with the model's chat template (no generation)."""
        req = tpb.ChatTemplateRequest(
            messages=_chat_messages(messages), add_generation_prompt=add_generation_prompt
        )
        resp = self._unary(self._tokenizer().ApplyChatTemplate, req, timeout)
        return ChatTemplate(resp.text, list(resp.ids))

    def tokenizer_info(self, timeout: float | None = None) -> TokenizerInfo:
        req = tpb.GetTokenizerInfoRequest()
        return _tokenizer_info(self._unary(self._tokenizer().GetTokenizerInfo, req, timeout))

    def health(self, server: str = "inference", service: str = "", timeout: float = 5.0) -> str:
        """grpc.health.v1 status of the 'inference' or 'tokenizer' server: "SERVING",
        "NOT_SERVING" (loading, draining), ... (KuiperError when it does not answer)."""
        req = health.HealthCheckRequest(service=service)
        resp = self._unary(self._health_check(server), req, timeout, retry=False)
        return health.status_name(resp)

    def wait_until_serving(
        self, timeout: float = 30.0, servers: Sequence[str] = ("inference", "tokenizer")
    ) -> None:
        """Poll health until every server in `servers` says SERVING; KuiperError
        (DEADLINE_EXCEEDED, with the last answer) after `timeout` seconds."""
        end = time.monotonic() + timeout
        for server in servers:
            while True:
                try:
                    last = self.health(server, timeout=max(0.1, min(2.0, end - time.monotonic())))
                except KuiperError as exc:
                    last = str(exc)
                if last == "SERVING":
                    break
                if time.monotonic() >= end:
                    raise KuiperError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{server} server not SERVING after {timeout:g} s: {last}",
                    )
                time.sleep(0.1)


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

    async def _unary(self, method, request, timeout: float | None, retry: bool = True):
        timeout = self._call_timeout(timeout)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if retry and self._retry_unary(exc, attempt):
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

    @overload
    async def encode(
        self, texts: str, add_special_tokens: bool | None = None, timeout: float | None = None
    ) -> list[int]: ...
    @overload
    async def encode(
        self,
        texts: Sequence[str],
        add_special_tokens: bool | None = None,
        timeout: float | None = None,
    ) -> list[list[int]]: ...
    async def encode(self, texts, add_special_tokens=None, timeout=None):
        single = isinstance(texts, str)
        req = _encode_request([texts] if single else texts, add_special_tokens)
        resp = await self._unary(self._tokenizer().Encode, req, timeout)
        ids = [list(r.ids) for r in resp.results]
        return ids[0] if single else ids

    @overload
    async def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = False, timeout: float | None = None
    ) -> str: ...
    @overload
    async def decode(
        self,
        ids: Sequence[Sequence[int]],
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> list[str]: ...
    async def decode(self, ids, skip_special_tokens=False, timeout=None):
        batch = _is_batch(ids)
        req = _decode_request(ids if batch else [ids], skip_special_tokens)
        texts = list((await self._unary(self._tokenizer().Decode, req, timeout)).texts)
        return texts if batch else texts[0]

    def decode_stream(self, timeout: float | None = None) -> AsyncDecodeStream:
        method = self._tokenizer().DecodeStream
        return AsyncDecodeStream(method, self._call_timeout(timeout), self._metadata)

    async def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        timeout: float | None = None,
    ) -> ChatTemplate:
        req = tpb.ChatTemplateRequest(
            messages=_chat_messages(messages), add_generation_prompt=add_generation_prompt
        )
        resp = await self._unary(self._tokenizer().ApplyChatTemplate, req, timeout)
        return ChatTemplate(resp.text, list(resp.ids))

    async def tokenizer_info(self, timeout: float | None = None) -> TokenizerInfo:
        req = tpb.GetTokenizerInfoRequest()
        return _tokenizer_info(await self._unary(self._tokenizer().GetTokenizerInfo, req, timeout))

    async def health(
        self, server: str = "inference", service: str = "", timeout: float = 5.0
    ) -> str:
        req = health.HealthCheckRequest(service=service)
        resp = await self._unary(self._health_check(server), req, timeout, retry=False)
        return health.status_name(resp)

    async def wait_until_serving(
        self, timeout: float = 30.0, servers: Sequence[str] = ("inference", "tokenizer")
    ) -> None:
        end = time.monotonic() + timeout
        for server in servers:
            while True:
                try:
                    last = await self.health(
                        server, timeout=max(0.1, min(2.0, end - time.monotonic()))
                    )
                except KuiperError as exc:
                    last = str(exc)
                if last == "SERVING":
                    break
                if time.monotonic() >= end:
                    raise KuiperError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{server} server not SERVING after {timeout:g} s: {last}",
                    )
                await asyncio.sleep(0.1)
