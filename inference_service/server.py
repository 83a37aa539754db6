"""The inference service: grpc.aio InferenceService over the engine.

The engine runs in its own process by default (`engine_core.client.EngineClient` over `engine_core.process`: the
device, the scheduler and the step loop never share a GIL with gRPC); `single_process` keeps
it as a thread of this process (debugging). The servicer sees the same face either way.

Generate/Chat validate their input (INVALID_ARGUMENT), get prompt ids from the tokenizer
service (UNAVAILABLE when it is down), queue the request in the engine (RESOURCE_EXHAUSTED
when the waiting queue is full) and stream every step's ids and text as soon as the router
hands them over. A client that cancels, disconnects or runs out of deadline stops its
sequence at the next engine step. SIGTERM: health goes NOT_SERVING, new requests get
UNAVAILABLE ("draining"), running streams finish within the grace period, exit 0.

`--frontends N` (inference_service/frontends.py): this process is frontend 0; it starts the
engine core and N-1 more frontend processes that bind the same port (SO_REUSEPORT) and attach
to the core. `serve(cfg, slot)` is what each of those runs; SIGTERM reaches them through
frontend 0, which drains its own streams, waits for theirs, then stops the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc

from inference_service.config import EngineConfig
from inference_service.engine.admission import QueueFullError
from inference_service.engine.engine import (
    AsyncEngine,
    Engine,
    EngineStoppedError,
)
from inference_service.engine.sequence import FinishReason
from inference_service.engine_core.build import EngineSpec, build_engine
from inference_service.engine_core.client import EngineClient
from inference_service.errors import describe_error, raised_at
from inference_service.frontends import (
    FrontendPool,
    FrontendSlot,
    Runtime,
    default_frontends,
    multi_frontend_possible,
    multiprocess_metrics,
    watch_parent,
)
from inference_service.metrics import FINISHED_REASON, InferenceMetrics
from inference_service.router import Delta, OutputRouter, RpcError
from inference_service.sampling.params import (
    DEFAULT_MAX_NEW_TOKENS,
    SampleOutput,
    SamplingParams,
    check_stop_counts,
)
from inference_service.tokenizer_client import (
    TokenizerClient,
    TokenizerRequestError,
    TokenizerUnavailableError,
)
from inference_service.watchdog import DEFAULT_RESTART_S, DEFAULT_STALL_S, watch_engine
from kuiper_serve.common.auth import (
    Security,
    add_port,
    count_rejections,
    server_options,
)
from kuiper_serve.common.defaults import (
    DEFAULT_HOST,
    INFERENCE_GRACE_S,
    INFERENCE_METRICS_PORT,
    INFERENCE_PORT,
)
from kuiper_serve.common.health import ServerHealth
from kuiper_serve.common.model_source import model_name
from kuiper_serve.common.ports import port_in_use
from kuiper_serve.common.request_parsing import Undecodable, lenient_parser

log = logging.getLogger("kuiper.inference")

SERVICE_NAME = ipb.DESCRIPTOR.services_by_name["InferenceService"].full_name
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# The longest legal request: a prompt of context-length ids (a uint32 varint takes at most 5
# bytes) plus a margin for text, stop strings and the other fields. Bigger requests are refused
# before they are parsed; the transport refuses anything above TRANSPORT_MAX_REQUEST_BYTES
# (set when the server starts, before the model and its context length are known).
ID_BYTES = 5
REQUEST_MARGIN_BYTES = 1 << 20
TRANSPORT_MAX_REQUEST_BYTES = 4 << 20


def max_request_bytes(context_length: int) -> int:
    return min(context_length * ID_BYTES + REQUEST_MARGIN_BYTES, TRANSPORT_MAX_REQUEST_BYTES)


DEADLINE_SLACK_S = 0.25

FINISH_TO_PROTO = {
    FinishReason.LENGTH: ipb.FINISH_REASON_LENGTH,
    FinishReason.STOP: ipb.FINISH_REASON_STOP,
    FinishReason.EOS: ipb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: ipb.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True)
class ModelDescription:
    source: str
    dtype: str


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_decodable(request: object) -> None:
    if isinstance(request, Undecodable):
        log.warning("refused an undecodable request: %s", request.reason)
        raise _invalid(request.reason)


def sampling_from_proto(p: ipb.SamplingParams, vocab_size: int) -> SamplingParams:
    """The engine's SamplingParams, max_new_tokens still 0 when the client left it unset.
    Raises RpcError(INVALID_ARGUMENT) with a readable message."""

    def opt(name: str, default: float) -> float:
        return getattr(p, name) if p.HasField(name) else default

    try:
        # O(1) before the lists are converted: a request at the receive limit can carry a
        # million of them, and converting them would hold the event loop
        check_stop_counts(len(p.stop), len(p.stop_token_ids))
        params = SamplingParams(
            max_new_tokens=p.max_new_tokens or 1,  # placeholder; resolved against the prompt
            temperature=opt("temperature", 1.0),
            top_k=p.top_k,
            top_p=opt("top_p", 1.0),
            min_p=p.min_p,
            repetition_penalty=opt("repetition_penalty", 1.0),
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            logprobs=p.logprobs if p.HasField("logprobs") else None,
        )
        params.validate(vocab_size)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    return params


def _logprobs_proto(samples: list[SampleOutput]) -> list[ipb.TokenLogprob]:
    return [
        ipb.TokenLogprob(
            token_id=s.token_id,
            logprob=s.logprob if s.logprob is not None else math.nan,
            top=[ipb.TopLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs],
        )
        for s in samples
    ]


class InferenceServicer(igrpc.InferenceServiceServicer):
    def __init__(
        self,
        engine: Engine | EngineClient,
        tokenizer: TokenizerClient,
        metrics: InferenceMetrics,
        model: ModelDescription,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model = model
        self.draining = False
        self.router = OutputRouter(engine, tokenizer.decoder)
        self.aengine: AsyncEngine | None = None
        self.num_streams = 0

    def start(self) -> None:
        """Call on the serving event loop."""
        loop = asyncio.get_running_loop()
        self.aengine = AsyncEngine(self.engine, loop, on_step=self.router.on_step)
        self.router.start()

    # ---- RPCs ----------------------------------------------------------------------------
    async def Generate(self, request: ipb.GenerateRequest, context) -> AsyncIterator:
        async for resp in self._serve("Generate", context, self._generate_prompt(request)):
            yield resp

    async def Chat(self, request: ipb.ChatRequest, context) -> AsyncIterator:
        async for resp in self._serve("Chat", context, self._chat_prompt(request)):
            yield resp

    async def GetModelInfo(self, request, context) -> ipb.ModelInfo:
        if isinstance(request, Undecodable):
            log.warning("refused an undecodable request: %s", request.reason)
            self.metrics.requests.labels("GetModelInfo", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        c = self.engine.backend.config
        self.metrics.requests.labels("GetModelInfo", "OK").inc()
        return ipb.ModelInfo(
            model=self.model.source,
            architecture=c.architecture,
            vocab_size=c.vocab_size,
            context_length=self.engine.max_model_len,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            dtype=self.model.dtype,
            device=self.engine.backend.device_name,
            kv_block_size=self.engine.backend.block_size,
            kv_blocks_total=self.engine.num_blocks,
            max_batch_size=self.engine.config.max_batch_size,
        )

    # ---- prompts -------------------------------------------------------------------------
    async def _generate_prompt(self, request: ipb.GenerateRequest):
        _check_decodable(request)
        params = sampling_from_proto(request.sampling, self.engine.backend.config.vocab_size)
        which = request.WhichOneof("prompt")
        if which == "text":
            if not request.text:
                raise _invalid("the prompt is empty: set text or token_ids")
            add_special = (
                request.add_special_tokens if request.HasField("add_special_tokens") else True
            )
            # Plain text unless the caller asks for control tokens to be read from it.
            ids = await self.tokenizer.encode(
                request.text, add_special, split_special_tokens=not request.parse_special_tokens
            )
        elif which == "token_ids":
            ids = request.token_ids.ids  # converted once its length is checked
        else:
            raise _invalid("the prompt is empty: set text or token_ids")
        return ids, params, request.sampling.max_new_tokens

    async def _chat_prompt(self, request: ipb.ChatRequest):
        _check_decodable(request)
        params = sampling_from_proto(request.sampling, self.engine.backend.config.vocab_size)
        if not request.messages:
            raise _invalid("messages is empty: send at least one message")
        for i, m in enumerate(request.messages):
            if m.role not in CHAT_ROLES:
                raise _invalid(
                    f"messages[{i}].role {m.role!r} is unknown (use one of {sorted(CHAT_ROLES)})"
                )
        _, ids = await self.tokenizer.apply_chat_template(
            [(m.role, m.content) for m in request.messages]
        )
        return ids, params, request.sampling.max_new_tokens

    def _check_prompt(
        self, ids: Sequence[int], params: SamplingParams, max_new: int
    ) -> tuple[list[int], SamplingParams]:
        """The prompt as a list and the parameters with max_new_tokens resolved, or
        RpcError(INVALID_ARGUMENT). The lengths are checked first, in O(1): a request at the
        receive limit can hold a million ids, and converting or scanning them on the event
        loop stalled every stream (~0.3 s a request on 2 busy cores)."""
        if not ids:
            raise _invalid("the prompt is empty (it encodes to no tokens)")
        ctx = self.engine.max_model_len
        if max_new == 0:
            max_new = min(DEFAULT_MAX_NEW_TOKENS, ctx - len(ids))
            if max_new < 1:
                raise _invalid(
                    f"the prompt ({len(ids)} tokens) fills the context length ({ctx} tokens)"
                )
        elif len(ids) + max_new > ctx:
            raise _invalid(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the "
                f"context length ({ctx} tokens); shorten the prompt or ask for fewer tokens"
            )
        cap = self.engine.capacity_tokens
        if len(ids) + max_new > cap:
            raise _invalid(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the KV cache "
                f"({cap} tokens); ask for fewer tokens or give the server more --kv-memory"
            )
        # the tokenizer's ids once known (sample_vocab): the prompt's tail goes to the shared
        # DecodeStream as context, where an id without text would fail every sequence
        vocab = self.engine.backend.sample_vocab
        ids = list(ids)
        if max(ids) >= vocab:
            bad = [t for t in ids if t >= vocab]
            raise _invalid(
                f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})"
            )
        return ids, dataclasses.replace(params, max_new_tokens=max_new)

    # ---- streaming -----------------------------------------------------------------------
    async def _serve(self, method: str, context, prompt_coro) -> AsyncIterator:
        code = "OK"
        start = time.monotonic()
        try:
            if self.draining:
                prompt_coro.close()
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is draining (shutting down); retry on another replica",
                )
            try:
                ids, params, max_new = await prompt_coro
            except TokenizerUnavailableError as exc:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            except TokenizerRequestError as exc:
                raise RpcError(exc.code, f"tokenizer service: {exc}") from None
            ids, params = self._check_prompt(ids, params, max_new)
            async for resp in self._stream(ids, params, start):
                yield resp
        except RpcError as exc:
            code = exc.code.name
            await context.abort(exc.code, exc.message)
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled while awaiting, or closed while suspended at a yield. A client whose
            # deadline passed cancels the call itself, and that cancellation can arrive a few
            # milliseconds before this server's copy of the deadline: count it as a deadline.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            raise
        except Exception as exc:  # a bug serving this request: INTERNAL for it alone
            code = "INTERNAL"
            log.error("%s failed (%s at %s); ended it with INTERNAL, the other streams go on",
                      method, describe_error(exc), raised_at(exc))  # fmt: skip
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error while serving this request ({describe_error(exc)}); other "
                "requests are not affected; the inference service's log has the details",
            )
        finally:
            self.metrics.requests.labels(method, code).inc()

    async def _stream(self, ids: list[int], params: SamplingParams, start: float) -> AsyncIterator:
        assert self.aengine is not None
        try:
            handle = self.aengine.add_request(ids, params)
        except QueueFullError as exc:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except EngineStoppedError as exc:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        added = time.monotonic()
        rid = handle.request_id
        live = self.router.register(rid, ids, params.stop)
        self.metrics.prompt_tokens.inc(len(ids))
        self.metrics.prompt_length.observe(len(ids))
        self.num_streams += 1
        self.metrics.frontend_streams.inc()
        first: float | None = None
        last_time = start
        completion = 0
        scheduled: float | None = None  # when the engine first scheduled it
        try:
            while True:
                delta: Delta = await live.next_delta()
                if delta.error is not None:
                    raise delta.error
                now = time.monotonic()
                out = delta.output
                if out is not None and out.queue_time_s is not None and scheduled is None:
                    scheduled = added + out.queue_time_s
                    self.metrics.queue_time.observe(out.queue_time_s)
                if delta.token_ids:
                    if first is None:
                        first = now
                        self.metrics.ttft.observe(now - start)
                        if scheduled is not None:
                            self.metrics.prefill_time.observe(max(0.0, now - scheduled))
                        # the first message's other tokens came with the first one
                        self.metrics.observe_token_gap(0.0, len(delta.token_ids) - 1)
                    else:
                        self.metrics.observe_token_gap(now - last_time, len(delta.token_ids))
                    last_time = now
                    completion += len(delta.token_ids)
                    self.metrics.generation_tokens.inc(len(delta.token_ids))
                resp = ipb.GenerateResponse(
                    token_ids=delta.token_ids,
                    text=delta.text,
                    logprobs=_logprobs_proto(delta.logprobs) if params.logprobs is not None else [],
                )
                if delta.finish_reason is not None:
                    resp.finish_reason = FINISH_TO_PROTO[delta.finish_reason]
                    self._observe_finish(delta.finish_reason, start, scheduled, first, completion)
                    resp.usage.CopyFrom(
                        ipb.Usage(
                            prompt_tokens=len(ids),
                            completion_tokens=completion,
                            time_to_first_token_s=(first - start) if first is not None else 0.0,
                            queue_time_s=(out.queue_time_s or 0.0) if out is not None else 0.0,
                            cached_prompt_tokens=out.num_cached_prompt_tokens if out else 0,
                        )
                    )
                    yield resp
                    return
                yield resp
        finally:
            self.num_streams -= 1
            self.metrics.frontend_streams.dec()
            self.router.release(rid)

    def _observe_finish(
        self,
        reason: FinishReason,
        start: float,
        scheduled: float | None,
        first: float | None,
        completion: int,
    ) -> None:
        now = time.monotonic()
        m = self.metrics
        m.request_success.labels(FINISHED_REASON[reason]).inc()
        m.e2e_latency.observe(now - start)
        m.generation_length.observe(completion)
        if first is not None:
            m.decode_time.observe(now - first)
        if scheduled is not None:
            m.inference_time.observe(max(0.0, now - scheduled))


class LoadingServicer(igrpc.InferenceServiceServicer):
    """Registered before the server starts (grpc.aio takes no servicers later), so health
    answers NOT_SERVING while the model loads; calls get UNAVAILABLE until `ready` is set."""

    def __init__(self, max_request_bytes: int = TRANSPORT_MAX_REQUEST_BYTES) -> None:
        self.ready: InferenceServicer | None = None
        self.max_request_bytes = max_request_bytes  # tightened once the model is known

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Like the generated add_InferenceServiceServicer_to_server, with deserializers that
        refuse oversized or malformed requests (INVALID_ARGUMENT) instead of raising."""
        parse = lambda t: lenient_parser(t, lambda: self.max_request_bytes)  # noqa: E731
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate,
                request_deserializer=parse(ipb.GenerateRequest),
                response_serializer=ipb.GenerateResponse.SerializeToString,
            ),
            "Chat": grpc.unary_stream_rpc_method_handler(
                self.Chat,
                request_deserializer=parse(ipb.ChatRequest),
                response_serializer=ipb.GenerateResponse.SerializeToString,
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo,
                request_deserializer=parse(ipb.GetModelInfoRequest),
                response_serializer=ipb.ModelInfo.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )

    async def _loading(self, context) -> None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry in a moment"
        )

    async def Generate(self, request, context) -> AsyncIterator:
        if self.ready is None:
            await self._loading(context)
        async for resp in self.ready.Generate(request, context):
            yield resp

    async def Chat(self, request, context) -> AsyncIterator:
        if self.ready is None:
            await self._loading(context)
        async for resp in self.ready.Chat(request, context):
            yield resp

    async def GetModelInfo(self, request, context) -> ipb.ModelInfo:
        if self.ready is None:
            await self._loading(context)
        return await self.ready.GetModelInfo(request, context)


@dataclass
class ServerConfig:
    """The inference server's settings: its engine's (model, device, KV pool, batching: one
    EngineConfig) and what only the server uses (listening, tokenizer service, metrics)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = DEFAULT_HOST
    port: int = INFERENCE_PORT
    tokenizer_address: str | None = None
    metrics_port: int = INFERENCE_METRICS_PORT  # 0: a free port (logged); < 0: no endpoint
    # One request message at most, in bytes (None: context length x 5 + 1 MiB, capped at
    # TRANSPORT_MAX_REQUEST_BYTES); the transport refuses anything above it (or above the cap).
    max_request_bytes: int | None = None
    grace_s: float = INFERENCE_GRACE_S
    max_connection_age_s: float = 0.0  # 0: clients keep their connections
    tokenizer_timeout_s: float = 5.0
    # Health turns NOT_SERVING when the engine thread is stuck in one step this long.
    engine_stall_s: float = DEFAULT_STALL_S
    # An engine process that sends no heartbeat this long is killed and restarted (0: never).
    engine_restart_s: float = DEFAULT_RESTART_S
    security: Security = field(default_factory=Security)
    # The connection to the tokenizer service: TLS when tokenizer_tls or tokenizer_tls_ca.
    tokenizer_tls: bool = False
    tokenizer_tls_ca: str | None = None
    tokenizer_auth_token: str | None = None
    single_process: bool = False  # the engine as a thread of the server (debugging)
    # gRPC frontend processes on the port (None: default_frontends for the device)
    frontends: int | None = None
    # frontend 0's private folder (core socket, metrics files): set by the CLI, before
    # prometheus_client is imported, when several frontends may run (frontends.prepare)
    runtime: Runtime | None = None
    # engine.max_batch_size from the backend instead (--max-batch-size not given)
    auto_max_batch_size: bool = False

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(self.engine, self.auto_max_batch_size)


async def _stop_ids_from_tokenizer(
    engine: Engine | EngineClient, tokenizer: TokenizerClient, router: OutputRouter
) -> None:
    """End-of-sequence ids come from the tokenizer (eos plus e.g. <|im_end|>); keep asking
    until it answers, the model's own eos ids serve meanwhile. A tokenizer with fewer ids than
    the model's embedding table (padded tables) also limits sampling to its ids: the others
    have no text, and the tokenizer service refuses to decode them (the router checks each
    request's ids against it, so such an id ends its own stream, not the shared DecodeStream)."""
    while True:
        try:
            info = await tokenizer.info(timeout_s=2.0)
        except (TokenizerUnavailableError, TokenizerRequestError) as exc:
            log.warning("tokenizer info not available yet: %s", exc)
            await asyncio.sleep(1.0)
            continue
        ids = set(info.stop_ids) | set(engine.backend.config.eos_token_ids)
        if info.eos_id is not None:
            ids.add(info.eos_id)
        engine.set_stop_ids(ids)
        if info.vocab_size > 0:
            router.vocab_size = info.vocab_size
        vocab = engine.backend.config.vocab_size
        if 0 < info.vocab_size < vocab:
            log.info("sampling limited to the tokenizer's %d ids (the model has %d)",
                     info.vocab_size, vocab)  # fmt: skip
            engine.backend.sample_vocab = info.vocab_size
        return


async def _start_engine(
    cfg: ServerConfig, on_state, slot: FrontendSlot | None, multi: bool
) -> tuple[Engine | EngineClient, ModelDescription]:
    """The engine, started: in its own process (frontend 0; listening for the other frontends
    when `multi`), attached to that process (frontends 1..N-1), or as a thread here
    (single_process)."""
    spec = cfg.engine_spec()
    if cfg.single_process:
        built = await asyncio.to_thread(build_engine, spec)
        built.engine.start()
        return built.engine, ModelDescription(source=built.source, dtype=built.dtype)
    if slot is not None:
        client = EngineClient(spec, on_state, address=slot.core, attach=True)
    else:
        address = cfg.runtime.core if multi and cfg.runtime is not None else None
        client = EngineClient(spec, on_state, address=address,
                              restart_stalled_s=cfg.engine_restart_s)  # fmt: skip
    await asyncio.to_thread(client.start)
    return client, ModelDescription(source=client.info.source, dtype=client.info.dtype)


def _may_run_several(cfg: ServerConfig) -> bool:
    """Whether frontend 0 binds for several frontends; says why not when asked for them."""
    wanted = cfg.frontends is not None and cfg.frontends > 1
    if not multi_frontend_possible(cfg.frontends, cfg.engine.device, cfg.single_process):
        if wanted and cfg.single_process:
            log.warning("--frontends %d ignored: --single-process runs one frontend", cfg.frontends)
        elif wanted:
            log.warning("--frontends %d needs Linux (SO_REUSEPORT spreads the connections); "
                        "serving with 1 frontend", cfg.frontends)  # fmt: skip
        return False
    if cfg.runtime is None or not multiprocess_metrics():
        if wanted:
            log.warning("--frontends %d needs the multiprocess metrics folder (started "
                        "without the kuiper CLI?); serving with 1 frontend", cfg.frontends)  # fmt: skip
        return False
    return True


async def serve(cfg: ServerConfig, slot: FrontendSlot | None = None) -> int:
    """Raises ValueError (bad TLS files) or OSError (port taken) when it cannot start. `slot`:
    run as frontend slot.index (>= 1) of frontend 0's server."""
    multi = slot is not None or _may_run_several(cfg)
    port = slot.port if slot is not None else cfg.port
    if slot is None and multi and port_in_use(cfg.host, port):
        raise OSError(f"cannot listen on {cfg.host}:{port} (port in use?)")
    me = f"frontend {slot.index}: " if slot is not None else ""
    metrics = InferenceMetrics(model_name=model_name(cfg.engine.model))  # before the slow load
    credentials = cfg.security.credentials()
    # Before the slow model load, so an unreadable CA file fails at once.
    try:
        tokenizer = TokenizerClient(
            cfg.tokenizer_address,
            timeout_s=cfg.tokenizer_timeout_s,
            tls=cfg.tokenizer_tls,
            tls_ca=cfg.tokenizer_tls_ca,
            token=cfg.tokenizer_auth_token,
        )
    except OSError as exc:
        raise ValueError(f"cannot read --tokenizer-tls-ca: {exc}") from None
    transport_limit = cfg.max_request_bytes or TRANSPORT_MAX_REQUEST_BYTES
    server = grpc.aio.server(
        interceptors=cfg.security.interceptors(count_rejections(metrics.requests)),
        options=server_options(
            transport_limit, reuse_port=multi, max_connection_age_s=cfg.max_connection_age_s
        ),
    )
    server_health = ServerHealth(server, SERVICE_NAME)
    await server_health.set_serving(False)

    front = LoadingServicer(transport_limit)
    front.add_to_server(server)

    async def listen() -> int:
        bound = add_port(server, f"{cfg.host}:{port}", credentials)
        if bound == 0:
            raise OSError(f"cannot listen on {cfg.host}:{port} (port in use?)")
        await server.start()
        return bound

    # Frontend 0 listens first: a taken port fails at once, and health says NOT_SERVING while
    # loading. The others join the port once they can serve (no connection lands on one
    # that is still attaching).
    bound = await listen() if slot is None else port
    t0 = time.monotonic()
    if slot is None:
        log.info("loading model %s ...", cfg.engine.model or "(default)")
    loop = asyncio.get_running_loop()
    serving = asyncio.Event()  # set once warmed up; engine restarts toggle health after it
    draining = False

    def on_engine_state(up: bool) -> None:
        """Receiver thread: the engine process died (False) or is back (True)."""

        def apply() -> None:
            if serving.is_set() and not draining:
                loop.create_task(server_health.set_serving(up))

        loop.call_soon_threadsafe(apply)

    try:
        engine, model = await _start_engine(cfg, on_engine_state, slot, multi)
    except BaseException:
        # Stop the listening server here, on its loop: left to the garbage collector it
        # schedules AioServer.shutdown on a closed loop (asyncio noise after the real error).
        await server.stop(0)
        with contextlib.suppress(Exception):
            await tokenizer.close()
        raise
    where = "" if cfg.single_process else f" (engine process {engine.pid})"
    if slot is None:
        log.info("loaded %s in %.1fs%s", model.source, time.monotonic() - t0, where)
    metrics.kv_total.set(engine.num_blocks)
    metrics.block_size = engine.backend.block_size
    engine.add_stats_listener(metrics.on_step)
    servicer = InferenceServicer(engine, tokenizer, metrics, model)
    servicer.start()
    front.max_request_bytes = cfg.max_request_bytes or max_request_bytes(engine.max_model_len)
    front.ready = servicer
    # Same interface as gRPC, and the same rule as the tokenizer: 0 a free port, < 0 none.
    # Frontend 0 serves /metrics: in multiprocess mode every frontend's series, summed.
    metrics_port = None
    if slot is None and cfg.metrics_port >= 0:
        metrics_port = metrics.serve(cfg.metrics_port, cfg.host)

    # Warm up: one tiny generation, so the first client does not pay for lazy setup.
    t0 = time.monotonic()
    warm_prompt = [engine.backend.config.bos_token_id or 0]
    await asyncio.to_thread(
        engine.generate, [warm_prompt], SamplingParams(max_new_tokens=2, temperature=0.0), 600
    )
    log.info("%swarm-up done in %.1fs", me, time.monotonic() - t0)
    stop_ids_task = asyncio.create_task(
        _stop_ids_from_tokenizer(engine, tokenizer, servicer.router)
    )
    # Stop ids and the sampling limit in place before the first request when the tokenizer
    # answers soon; a tokenizer still starting up does not hold up health (retried above).
    await asyncio.wait({stop_ids_task}, timeout=5.0)
    await server_health.set_serving(True)
    if slot is not None:
        await listen()
    watchdog = asyncio.create_task(
        watch_engine(engine, server_health.set_serving, cfg.engine_stall_s)
    )
    serving.set()
    pool: FrontendPool | None = None
    count = slot.count if slot is not None else 1
    if slot is None and multi:
        count = cfg.frontends or default_frontends(engine.backend.device_name)
        if count > 1:
            assert cfg.runtime is not None
            pool = FrontendPool(frontend_main, cfg, count, bound, cfg.runtime.core)
            await asyncio.to_thread(pool.start)
    if slot is not None:
        log.info("frontend %d of %d SERVING (pid %d) on %s:%d", slot.index, slot.count,
                 os.getpid(), cfg.host, bound)  # fmt: skip
    else:
        log.info(
            "SERVING %s on %s, %d KV blocks x %d tokens, batch <= %d; listening on %s:%d (%s)%s, "
            "tokenizer at %s; %d frontend process(es)",
            model.source, engine.backend.device_name, engine.num_blocks,
            engine.backend.block_size, engine.config.max_batch_size, cfg.host, bound,
            cfg.security.describe(),
            f", metrics on http://{cfg.host}:{metrics_port}/metrics" if metrics_port else "",
            tokenizer.address, count,
        )  # fmt: skip

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("%sdraining: finishing %d stream(s) (grace %gs)", me, servicer.num_streams,
             cfg.grace_s)  # fmt: skip
    servicer.draining = draining = True
    if pool is not None:
        pool.terminate()  # the other frontends drain too
    await server_health.enter_graceful_shutdown()
    deadline = time.monotonic() + cfg.grace_s
    while servicer.num_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.stop(max(0.0, deadline - time.monotonic()))
    if pool is not None:  # their streams still need the engine core
        await asyncio.to_thread(pool.join, max(0.0, deadline - time.monotonic()) + 5.0)
    stop_ids_task.cancel()
    watchdog.cancel()
    await servicer.router.stop()
    await asyncio.to_thread(engine.stop)
    with contextlib.suppress(Exception):
        await tokenizer.close()
    log.info("%sinference service stopped", me)
    return 0


def frontend_main(cfg: ServerConfig, slot: FrontendSlot) -> None:
    """Entry point of frontends 1..N-1 (multiprocessing, spawn; started by frontend 0)."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s frontend{slot.index} %(name)s %(levelname)s %(message)s",
    )
    watch_parent()
    try:
        code = asyncio.run(serve(cfg, slot))
    except (ValueError, OSError, RuntimeError) as exc:
        log.error("frontend %d cannot serve: %s", slot.index, exc)
        code = 1
    sys.exit(code)
