"""The tokenizer service: a grpc.aio server for kuiper.v1.TokenizerService.

Besides the service it serves grpc.health.v1 health (NOT_SERVING while the tokenizer loads and
while draining, SERVING in between), server reflection (so grpcurl and ghz need no .proto
files) and Prometheus metrics over HTTP. SIGTERM or SIGINT: health goes NOT_SERVING, new calls
are refused, in-flight calls get `grace` seconds to finish, then the process exits 0.

Bad input gets INVALID_ARGUMENT with a message that says what to change; it never takes the
server down or touches another call's state.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from kuiper.v1 import tokenizer_pb2 as pb
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kuiper_serve.common.auth import (
    Security,
    add_port,
    count_rejections,
    server_options,
)
from kuiper_serve.common.defaults import (
    DEFAULT_HOST,
    TOKENIZER_GRACE_S,
    TOKENIZER_METRICS_PORT,
    TOKENIZER_PORT,
)
from kuiper_serve.common.health import ServerHealth
from kuiper_serve.common.model_source import model_name
from kuiper_serve.common.request_parsing import Undecodable, lenient_parser
from tokenizer_service.incremental import IncrementalDecoder
from tokenizer_service.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("kuiper.tokenizer")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenizerService"].full_name
# gRPC refuses messages above this itself (RESOURCE_EXHAUSTED); below it, our own limits
# answer with INVALID_ARGUMENT and say which limit was hit.
TRANSPORT_MAX_MESSAGE = 64 << 20
# Requests bigger than this are worth moving off the event loop.
_INLINE_WORK_LIMIT = 32_768


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 << 20  # one request message (16 MiB)
    max_batch: int = 1024  # texts, sequences or chat messages in one request
    max_text_chars: int = 1 << 20  # one text (about a million characters)
    max_ids: int = 1 << 22  # ids in one request, all sequences together
    max_open_sequences: int = 65_536  # open sequences in one DecodeStream


class InvalidRequest(ValueError):
    """The caller sent something we refuse; becomes INVALID_ARGUMENT."""


class _Abort(Exception):
    """Ends a call with a status other than INVALID_ARGUMENT (e.g. UNAVAILABLE)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# 100 µs .. 5 s: 1, 2.5, 5 per decade.
_LATENCY_BUCKETS = tuple(m * 10.0**e for e in range(-4, 1) for m in (1, 2.5, 5))


class Metrics:
    def __init__(self, registry: CollectorRegistry, model_name: str = "") -> None:
        # Info-style series (value 1): dashboards join on model_name as with the inference
        # service's metrics.
        Gauge(
            "kuiper_tokenizer_model_info",
            "The model whose tokenizer this server loads (always 1).",
            ["model_name"],
            registry=registry,
        ).labels(model_name).set(1)
        self.requests = Counter(
            "kuiper_tokenizer_requests",
            "Tokenizer RPCs by method and final status code.",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "kuiper_tokenizer_request_seconds",
            "Tokenizer RPC latency (unary calls; a DecodeStream counts per message).",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "kuiper_tokenizer_tokens",
            "Token ids produced (encode) or consumed (decode, decode_stream).",
            ["direction"],
            registry=registry,
        )
        self.active_streams = Gauge(
            "kuiper_tokenizer_active_streams", "Open DecodeStream calls.", registry=registry
        )
        self.open_sequences = Gauge(
            "kuiper_tokenizer_open_sequences",
            "Sequences with decoder state across all DecodeStream calls.",
            registry=registry,
        )


async def _run(work: Callable[[], Any], size: int) -> Any:
    """Small jobs run inline (a thread hop costs more than they do); big ones in a thread."""
    if size <= _INLINE_WORK_LIMIT:
        return work()
    return await asyncio.to_thread(work)


class TokenizerServicer:
    """The RPC handlers. `tokenizer` is None while loading: calls then get UNAVAILABLE."""

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.tokenizer: Tokenizer | None = None
        self.limits = limits
        self.metrics = metrics
        self._stream_tokens = metrics.tokens.labels("decode_stream")

    # ---- plumbing ------------------------------------------------------------------------
    def _unary(
        self, method: str, body: Callable[[Tokenizer, Any], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                tok = self._ready(request)
                return await body(tok, request)
            except _Abort as exc:
                code = exc.code
                await context.abort(exc.code, exc.message)
            except ValueError as exc:  # InvalidRequest, out-of-range ids, template errors
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(code, str(exc))
            except asyncio.CancelledError:  # the client went away or the server is stopping
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                await context.abort(code, f"internal error in {method}; see the server log")
            finally:
                self.metrics.requests.labels(method, code.name).inc()
                self.metrics.latency.labels(method).observe(time.perf_counter() - start)

        return handler

    def _ready(self, request: Any) -> Tokenizer:
        if isinstance(request, Undecodable):
            log.warning("refused an undecodable request: %s", request.reason)
            raise InvalidRequest(request.reason)
        if self.tokenizer is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the tokenizer is still loading; retry")
        return self.tokenizer

    def _check_batch(self, count: int, what: str) -> None:
        if count == 0:
            raise InvalidRequest(f"{what} is empty: send at least one")
        if count > self.limits.max_batch:
            raise InvalidRequest(
                f"{count} {what} in one request; the limit is {self.limits.max_batch}, "
                "split the batch"
            )

    def _check_text(self, text: str, what: str) -> None:
        if len(text) > self.limits.max_text_chars:
            raise InvalidRequest(
                f"{what} has {len(text)} characters; the limit is {self.limits.max_text_chars}"
            )

    def _check_ids(self, tok: Tokenizer, ids: Any, what: str) -> None:
        try:
            tok.validate_ids(ids)
        except ValueError as exc:
            raise InvalidRequest(f"{what}: {exc}") from None

    # ---- unary RPCs ------------------------------------------------------------------------
    async def _encode(self, tok: Tokenizer, request: pb.EncodeRequest) -> pb.EncodeResponse:
        texts = list(request.texts)
        self._check_batch(len(texts), "texts")
        for i, text in enumerate(texts):
            self._check_text(text, f"text {i}")
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        split = request.split_special_tokens
        size = sum(map(len, texts))
        results = await _run(lambda: tok.encode_batch(texts, add, split), size)
        self.metrics.tokens.labels("encode").inc(sum(map(len, results)))
        return pb.EncodeResponse(results=[pb.TokenIds(ids=ids) for ids in results])

    async def _decode(self, tok: Tokenizer, request: pb.DecodeRequest) -> pb.DecodeResponse:
        sequences = [list(s.ids) for s in request.sequences]
        self._check_batch(len(sequences), "sequences")
        total = sum(map(len, sequences))
        if total > self.limits.max_ids:
            raise InvalidRequest(
                f"{total} ids in one request; the limit is {self.limits.max_ids}, split the batch"
            )
        for i, ids in enumerate(sequences):
            self._check_ids(tok, ids, f"sequence {i}")
        skip = request.skip_special_tokens
        texts = await _run(lambda: [tok.decode_unchecked(ids, skip) for ids in sequences], total)
        self.metrics.tokens.labels("decode").inc(total)
        return pb.DecodeResponse(texts=texts)

    async def _chat(self, tok: Tokenizer, request: pb.ChatTemplateRequest) -> Any:
        self._check_batch(len(request.messages), "messages")
        messages = []
        for i, m in enumerate(request.messages):
            self._check_text(m.content, f"message {i}")
            messages.append({"role": m.role, "content": m.content})
        # Only the template's markup yields control tokens; contents are plain text.
        size = sum(len(m["content"]) for m in messages)
        text, ids = await _run(
            lambda: tok.encode_chat(messages, request.add_generation_prompt), size
        )
        return pb.ChatTemplateResponse(text=text, ids=ids)

    async def _info(self, tok: Tokenizer, request: pb.GetTokenizerInfoRequest) -> Any:
        return pb.TokenizerInfo(
            vocab_size=tok.vocab_size,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            special_tokens=[
                pb.SpecialToken(id=i, content=c) for i, c in sorted(tok.special_tokens.items())
            ],
            has_chat_template=tok.chat_template is not None,
            backend=tok.backend,
            source=tok.source,
            stop_ids=tok.stop_ids,
        )

    # ---- DecodeStream ----------------------------------------------------------------------
    async def decode_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeStreamResponse]:
        code = grpc.StatusCode.OK
        decoders: dict[int, IncrementalDecoder] = {}
        self.metrics.active_streams.inc()
        try:
            async for request in requests:
                start = time.perf_counter()
                tok = self._ready(request)
                yield self._stream_step(tok, request, decoders)
                self.metrics.latency.labels("DecodeStream").observe(time.perf_counter() - start)
        except _Abort as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        except ValueError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("DecodeStream failed")
            await context.abort(code, "internal error in DecodeStream; see the server log")
        finally:
            self.metrics.active_streams.dec()
            self.metrics.open_sequences.dec(len(decoders))
            self.metrics.requests.labels("DecodeStream", code.name).inc()

    def _stream_step(
        self,
        tok: Tokenizer,
        request: pb.DecodeStreamRequest,
        decoders: dict[int, IncrementalDecoder],
    ) -> pb.DecodeStreamResponse:
        sequences = request.sequences
        if len(sequences) > self.limits.max_batch:
            raise InvalidRequest(
                f"{len(sequences)} sequences in one message; the limit is {self.limits.max_batch}"
            )
        # Validate the whole message before touching any state.
        vocab_size = tok.vocab_size
        items = []
        opening = total = 0
        for s in sequences:
            sid, ids = s.sequence_id, list(s.ids)
            if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                self._check_ids(tok, ids, f"sequence_id {sid}")
            if sid not in decoders:
                self._check_ids(tok, s.context_ids, f"sequence_id {sid} context_ids")
                opening += 1
            items.append((sid, ids, s))
            total += len(ids)
        if len(decoders) + opening > self.limits.max_open_sequences:
            raise InvalidRequest(
                f"more than {self.limits.max_open_sequences} open sequences in one stream; "
                "finish sequences (finished=true) to free them"
            )
        response = pb.DecodeStreamResponse()
        deltas = response.deltas
        opened = closed = 0
        for sid, ids, s in items:
            decoder = decoders.get(sid)
            if decoder is None:
                decoder = IncrementalDecoder(tok, s.context_ids, s.skip_special_tokens)
                decoders[sid] = decoder
                opened += 1
            text = decoder.push_unchecked(ids)
            if s.finished:
                text += decoder.flush()
                del decoders[sid]
                closed += 1
            deltas.add(sequence_id=sid, text=text)
        self._stream_tokens.inc(total)
        if opened != closed:
            self.metrics.open_sequences.inc(opened - closed)
        return response

    # ---- registration ----------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        parse = lambda t: lenient_parser(t, lambda: self.limits.max_request_bytes)  # noqa: E731
        handlers = {
            "Encode": grpc.unary_unary_rpc_method_handler(
                self._unary("Encode", self._encode),
                request_deserializer=parse(pb.EncodeRequest),
                response_serializer=pb.EncodeResponse.SerializeToString,
            ),
            "Decode": grpc.unary_unary_rpc_method_handler(
                self._unary("Decode", self._decode),
                request_deserializer=parse(pb.DecodeRequest),
                response_serializer=pb.DecodeResponse.SerializeToString,
            ),
            "DecodeStream": grpc.stream_stream_rpc_method_handler(
                self.decode_stream,
                request_deserializer=parse(pb.DecodeStreamRequest),
                response_serializer=pb.DecodeStreamResponse.SerializeToString,
            ),
            "ApplyChatTemplate": grpc.unary_unary_rpc_method_handler(
                self._unary("ApplyChatTemplate", self._chat),
                request_deserializer=parse(pb.ChatTemplateRequest),
                response_serializer=pb.ChatTemplateResponse.SerializeToString,
            ),
            "GetTokenizerInfo": grpc.unary_unary_rpc_method_handler(
                self._unary("GetTokenizerInfo", self._info),
                request_deserializer=parse(pb.GetTokenizerInfoRequest),
                response_serializer=pb.TokenizerInfo.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )


# ---- running -------------------------------------------------------------------------------


class ServeError(RuntimeError):
    """The server could not start (port taken, model unreadable); the message says why."""


async def _load(model_path: str | Path | None) -> Tokenizer:
    from kuiper_serve.common.model_source import resolve_model

    def work() -> Tokenizer:
        path = resolve_model(model_path)
        log.info("loading tokenizer from %s", path)
        start = time.perf_counter()
        tok = load_tokenizer(path)
        log.info(
            "loaded %s tokenizer (%d ids) in %.2fs",
            tok.backend,
            tok.vocab_size,
            time.perf_counter() - start,
        )
        return tok

    return await asyncio.to_thread(work)


async def serve_async(
    model_path: str | Path | None,
    host: str = DEFAULT_HOST,
    port: int = TOKENIZER_PORT,
    metrics_port: int | None = TOKENIZER_METRICS_PORT,
    grace: float = TOKENIZER_GRACE_S,
    limits: Limits | None = None,
    security: Security | None = None,
    max_connection_age_s: float = 0.0,
) -> None:
    """Run until SIGTERM/SIGINT, then drain. Raises ServeError when it cannot start."""
    limits = limits or Limits()
    security = security or Security()
    registry = CollectorRegistry()
    metrics = Metrics(registry, model_name(model_path))
    servicer = TokenizerServicer(limits, metrics)
    interceptors = security.interceptors(count_rejections(metrics.requests))
    try:
        credentials = security.credentials()
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            *server_options(
                TRANSPORT_MAX_MESSAGE, reuse_port=False, max_connection_age_s=max_connection_age_s
            ),
            ("grpc.max_send_message_length", -1),
        ],
    )
    server_health = ServerHealth(server, SERVICE_NAME)
    servicer.add_to_server(server)
    await server_health.set_serving(False)

    address = f"{host}:{port}"
    bound = add_port(server, address, credentials)
    if bound == 0:
        raise ServeError(f"cannot listen on {address} (is the port in use?)")
    metrics_http = None
    if metrics_port is not None:
        try:
            metrics_http, _ = start_http_server(metrics_port, addr=host, registry=registry)
        except OSError as exc:
            raise ServeError(f"cannot serve metrics on {host}:{metrics_port}: {exc}") from None
        log.info("metrics on http://%s:%d/metrics", host, metrics_http.server_port)
    await server.start()
    log.info(
        "gRPC listening on %s:%d (%s; health NOT_SERVING until loaded)",
        host,
        bound,
        security.describe(),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def on_signal() -> None:
        if stop.is_set():  # a second signal: skip the rest of the grace period
            log.info("second stop signal: cancelling in-flight calls now")
            asyncio.ensure_future(server.stop(0))
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        loading = asyncio.ensure_future(_load(model_path))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            try:
                servicer.tokenizer = loading.result()
            except Exception as exc:  # any load failure ends the server with one clear line
                raise ServeError(f"cannot load the tokenizer: {exc}") from None
            await server_health.set_serving(True)
            log.info("SERVING %s", SERVICE_NAME)
            await stopping
        log.info("stop requested: NOT_SERVING, draining in-flight calls (grace %.1fs)", grace)
    finally:
        await server_health.enter_graceful_shutdown()
        await server.stop(grace)
        if metrics_http is not None:
            metrics_http.shutdown()
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])
    log.info("stopped")


def serve(
    model_path: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = TOKENIZER_PORT,
    metrics_port: int | None = TOKENIZER_METRICS_PORT,
    grace: float = TOKENIZER_GRACE_S,
    security: Security | None = None,
    max_connection_age_s: float = 0.0,
) -> int:
    """Run the tokenizer service in this process; returns the exit code (0 after a drain)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # This process ends when serving ends: a stop signal that arrives after the drain (while
    # the interpreter shuts down) must not turn exit code 0 into death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        asyncio.run(
            serve_async(
                model_path,
                host,
                port,
                metrics_port,
                grace,
                security=security,
                max_connection_age_s=max_connection_age_s,
            )
        )
    except ServeError as exc:
        log.error("%s", exc)
        return 1
    return 0
