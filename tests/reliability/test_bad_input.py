"""Bad input against both services: every refusal is a proper gRPC status with a short
message, the servers keep serving, and a bad request never stalls another client's stream.

Oracles: gRPC's status codes; the servers' own answers to a good request right after.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import reliability_util
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper.v1 import tokenizer_pb2 as tpb
from reliability_util import AUTH, TimedStream, rss_mb, wait_until

from kuiper_serve.common.auth import BearerTokenInterceptor

secured_stack = reliability_util.secured_stack  # fixtures
tiny_model = reliability_util.tiny_model

INFERENCE = "kuiper.v1.InferenceService"
TOKENIZER = "kuiper.v1.TokenizerService"
GREEDY = ipb.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def huge_token_ids_request(num_ids: int) -> bytes:
    """A GenerateRequest whose token_ids prompt holds num_ids ids (all 1), built as bytes."""
    return _field(2, _field(1, b"\x01" * num_ids))


def raw_unary_stream(channel, service: str, method: str, payload: bytes, metadata=AUTH):
    call = channel.unary_stream(
        f"/{service}/{method}", request_serializer=None, response_deserializer=None
    )
    return list(call(payload, metadata=metadata, timeout=30))


def raw_unary(channel, service: str, method: str, payload: bytes, metadata=AUTH):
    call = channel.unary_unary(
        f"/{service}/{method}", request_serializer=None, response_deserializer=None
    )
    return call(payload, metadata=metadata, timeout=30)


def status_of(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


@pytest.fixture(scope="module")
def channels(secured_stack):
    inf = grpc.insecure_channel(secured_stack.address)
    tok = grpc.insecure_channel(secured_stack.tokenizer.address)
    yield inf, tok
    inf.close()
    tok.close()


def still_serves(inf_channel) -> None:
    stub = igrpc.InferenceServiceStub(inf_channel)
    msgs = list(stub.Generate(ipb.GenerateRequest(text="still fine", sampling=GREEDY),
                              metadata=AUTH, timeout=30))  # fmt: skip
    assert sum(len(m.token_ids) for m in msgs) == 4


# ---- finding 1: malformed bytes --------------------------------------------------------------
MALFORMED = {
    # GenerateRequest.text (field 1) holding bytes that are not UTF-8
    "generate-invalid-utf8-text": (INFERENCE, "Generate", _field(1, b"\xff\xfe hi")),
    # a stop string (SamplingParams field 8 inside GenerateRequest.sampling, field 3)
    "generate-invalid-utf8-stop": (
        INFERENCE, "Generate", _field(1, b"hi") + _field(3, _field(8, b"\xc3\x28"))),
    # ChatRequest.messages[0].content (ChatMessage field 2)
    "chat-invalid-utf8-content": (
        INFERENCE, "Chat", _field(1, _field(1, b"user") + _field(2, b"\xed\xa0\x80"))),
    # a length prefix promising more bytes than follow
    "generate-truncated": (INFERENCE, "Generate", _field(1, b"hello world")[:-4]),
    "chat-truncated": (INFERENCE, "Chat", _field(1, _field(1, b"user"))[:-1]),
    "model-info-garbage": (INFERENCE, "GetModelInfo", b"\xff\xff\xff\xff"),
    "encode-invalid-utf8": (TOKENIZER, "Encode", _field(1, b"\xff")),
    "chat-template-truncated": (TOKENIZER, "ApplyChatTemplate", b"\x0a\x10\x0a"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bytes_are_invalid_argument_with_one_log_line(secured_stack, channels, case):
    service, method, payload = MALFORMED[case]
    inf, tok = channels
    channel = inf if service == INFERENCE else tok
    server = secured_stack.inference if service == INFERENCE else secured_stack.tokenizer
    log_before = server.log_text()
    if method in ("Generate", "Chat"):
        err = status_of(lambda: raw_unary_stream(channel, service, method, payload))
    else:
        err = status_of(lambda: raw_unary(channel, service, method, payload))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "cannot parse" in err.details() and len(err.details()) < 200
    assert "DecodeError" not in err.details()
    time.sleep(0.2)  # the log line is written after the status goes out
    new_log = server.log_text()[len(log_before) :]
    assert "Traceback" not in new_log
    assert new_log.count("refused an undecodable request") == 1, new_log
    still_serves(inf)


# ---- finding 2: oversized requests -----------------------------------------------------------
def test_receive_limit_follows_the_context_length(secured_stack, channels):
    """The tiny model's context is 2048 ids: 2048 x 5 bytes + 1 MiB is the longest legal
    request. Just above it: INVALID_ARGUMENT before parsing; far above the transport's 4 MiB:
    RESOURCE_EXHAUSTED from gRPC itself."""
    inf, _ = channels
    limit = 2048 * 5 + (1 << 20)
    over = huge_token_ids_request(limit)  # a few bytes above the limit
    err = status_of(lambda: raw_unary_stream(inf, INFERENCE, "Generate", over))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"limit of {limit} bytes" in err.details()
    err = status_of(lambda: raw_unary_stream(inf, INFERENCE, "Generate",
                                             huge_token_ids_request(5 << 20)))  # fmt: skip
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The longest legal prompt itself is parsed and refused for what it is (too long).
    legal = huge_token_ids_request(2048)
    err = status_of(lambda: raw_unary_stream(inf, INFERENCE, "Generate", legal))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length" in err.details()
    still_serves(inf)


def test_huge_prompt_does_not_stall_other_streams(secured_stack, channels):
    """While one client sends 60 MB of token ids (authenticated or not), another client's
    stream keeps getting tokens, and the server's memory does not grow by the payload."""
    inf, _ = channels
    stub = igrpc.InferenceServiceStub(inf)
    long = ipb.SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    stream = TimedStream(stub, ipb.GenerateRequest(text="a long story", sampling=long))
    wait_until(lambda: stream.times or stream.error, what="the first token")
    assert stream.error is None, stream.error
    payload = huge_token_ids_request(60_000_000)
    rss_before = rss_mb(secured_stack.inference.pid)
    start = time.monotonic()
    for metadata in (AUTH, ()):
        err = status_of(lambda md=metadata: raw_unary_stream(inf, INFERENCE, "Generate",
                                                             payload, md))  # fmt: skip
        assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                              grpc.StatusCode.UNAUTHENTICATED), err  # fmt: skip
    end = time.monotonic()
    gap = stream.max_gap(start, end)
    stream.call.cancel()
    stream.join()
    assert gap < 2.0, f"the other stream got no token for {gap:.1f}s"
    # the issue saw 1.8 -> 6.2 GB, kept: the body is refused before it is read whole
    rss_after = rss_mb(secured_stack.inference.pid)
    assert rss_after - rss_before < 64, (rss_before, rss_after)
    still_serves(inf)


def at_limit(build, limit: int) -> bytes:
    """build(n) for the largest n whose request fits in `limit` bytes."""
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(build(mid)) <= limit else (lo, mid - 1)
    return build(lo)


# Requests of exactly the receive limit (about a million list entries each for the tiny
# model's 2048-token context), each refused for what it holds: (payload, what the refusal says)
def max_size_requests(limit: int) -> list[tuple[bytes, str]]:
    stops = lambda n: _field(1, b"hi") + _field(3, _field(8, b"ab") * n)  # noqa: E731
    stop_ids = lambda n: _field(1, b"hi") + _field(3, _field(9, b"\x01" * n))  # noqa: E731
    return [
        (at_limit(huge_token_ids_request, limit), "context length"),
        (at_limit(stops, limit), "stop strings"),
        (at_limit(stop_ids, limit), "stop_token_ids"),
    ]


class ChainedStreams(TimedStream):
    """Generate streams one after the other on a thread (the tiny model ends a 2000-token
    stream within a second), every message's arrival time in one list: a token flow that
    lasts as long as a test needs. The gap between two streams is one request's latency."""

    def __init__(self, stub) -> None:  # noqa: D107 (no TimedStream.__init__: no call yet)
        self.times: list[float] = []
        self.stub = stub
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # 1000 tokens: the secured stack's KV pool holds 1024
        long = ipb.SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
        request = ipb.GenerateRequest(text="a long story", sampling=long)
        while not self.stopping:
            self.call = self.stub.Generate(request, metadata=AUTH, timeout=60)
            for _ in self.call:
                self.times.append(time.monotonic())
                if self.stopping:
                    self.call.cancel()
                    return

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(30)


def _gap_under_max_size_requests(inf, payloads) -> tuple[float, float, int]:
    """(longest token gap of a running stream while max-size requests arrive for 1.5 s, its
    longest gap over 1.5 s just before, requests sent)."""
    stream = ChainedStreams(igrpc.InferenceServiceStub(inf))
    wait_until(lambda: len(stream.times) > 5, what="the first tokens")
    # The bound: the worst gap the same streams showed over as long a window just before.
    base_start = time.monotonic()
    time.sleep(1.5)
    start = time.monotonic()
    normal = stream.max_gap(base_start, start)
    sent = 0
    while time.monotonic() - start < 1.5:
        payload, says = payloads[sent % len(payloads)]
        err = status_of(lambda p=payload: raw_unary_stream(inf, INFERENCE, "Generate", p))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert says in err.details(), err.details()
        sent += 1
    end = time.monotonic()
    gap = stream.max_gap(start, end)
    stream.stop()
    print(f"max-size requests: {sent} in {end - start:.2f}s; other stream's longest gap "
          f"{1e3 * gap:.0f} ms (before them: {1e3 * normal:.0f} ms)")  # fmt: skip
    return gap, normal, sent


def test_max_size_legal_request_does_not_stall_other_streams(secured_stack, channels):
    """While requests at the receive limit arrive back to back (legal by size, refused for
    what they hold: a million prompt ids, stop strings or stop ids), another stream's longest
    wait between two tokens stays within a bound set by the same streams' gaps just before.
    Before the fix the server converted and scanned every id of such a prompt on the event
    loop (~0.3 s a request on 2 busy cores). What is left on the loop is protobuf's parse
    (upb holds the GIL, so a worker thread would not free the loop): 5-25 ms a MiB."""
    inf, _ = channels
    limit = 2048 * 5 + (1 << 20)
    payloads = max_size_requests(limit)
    assert all(limit - 4 <= len(p) <= limit for p, _ in payloads)
    # Up to 3 tries: on 2 shared cores the test's own process (it sends the payloads and reads
    # the stream) or a neighbour can pause the reader once; the stall this guards against
    # happened on every try.
    for _ in range(3):
        gap, normal, sent = _gap_under_max_size_requests(inf, payloads)
        if gap <= max(4 * normal, normal + 0.1):
            break
    assert sent >= len(payloads)
    assert gap <= max(4 * normal, normal + 0.1), (gap, normal)
    still_serves(inf)


# ---- finding 4 and the token check before parsing --------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Bearer reliability-s3cret"), ("authorization", "Bearer wrong")],
        [("authorization", "Bearer wrong"), ("authorization", "Bearer reliability-s3cret")],
        [("authorization", "Bearer reliability-s3cret")] * 2,
    ],
    ids=["right-wrong", "wrong-right", "right-right"],
)
def test_more_than_one_authorization_header_is_unauthenticated(channels, headers):
    inf, tok = channels
    stub = igrpc.InferenceServiceStub(inf)
    err = status_of(lambda: list(stub.Generate(ipb.GenerateRequest(text="hi", sampling=GREEDY),
                                               metadata=headers, timeout=30)))  # fmt: skip
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = status_of(lambda: raw_unary(tok, TOKENIZER, "Encode",
                                      tpb.EncodeRequest(texts=["hi"]).SerializeToString(),
                                      headers))  # fmt: skip
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unauthenticated_body_is_never_parsed():
    """The refusal handler's deserializer must not be the service's own: a refused call's
    body costs nothing to parse (and cannot fail to parse)."""
    parsed = []

    def real_parser(data: bytes):
        parsed.append(data)
        raise ValueError("must not be called")

    handler = grpc.unary_stream_rpc_method_handler(
        lambda r, c: iter(()), request_deserializer=real_parser
    )

    async def continuation(details):
        return handler

    class Details(grpc.HandlerCallDetails):
        method = f"/{INFERENCE}/Generate"
        invocation_metadata = (("authorization", "Bearer wrong"),)

    import asyncio

    interceptor = BearerTokenInterceptor("right")
    denied = asyncio.run(interceptor.intercept_service(continuation, Details()))
    assert denied.request_deserializer is not real_parser
    if denied.request_deserializer is not None:
        denied.request_deserializer(b"\xff" * 1000)
    assert parsed == []


def test_unauthenticated_garbage_is_unauthenticated(channels):
    inf, tok = channels
    for channel, service, method in ((inf, INFERENCE, "Generate"), (tok, TOKENIZER, "Encode")):
        call = raw_unary_stream if method == "Generate" else raw_unary
        err = status_of(lambda c=channel, s=service, m=method, f=call:
                        f(c, s, m, b"\xff\xfe" * 1000, ()))  # fmt: skip
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- finding 5: denormal sampling values -----------------------------------------------------
@pytest.mark.parametrize("field,value", [("temperature", 1e-40), ("temperature", 1e-7),
                                         ("repetition_penalty", 1e-38)])  # fmt: skip
def test_denormal_sampling_values_are_invalid_argument(channels, field, value):
    inf, _ = channels
    stub = igrpc.InferenceServiceStub(inf)
    sampling = ipb.SamplingParams(max_new_tokens=4, logprobs=3, **{field: value})
    err = status_of(lambda: list(stub.Generate(ipb.GenerateRequest(text="hi", sampling=sampling),
                                               metadata=AUTH, timeout=30)))  # fmt: skip
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details() and "at least" in err.details()


def test_sampling_at_the_floors_is_finite_and_greedy():
    """At the smallest temperature and repetition penalty accepted, logprobs stay finite and the
    draw is the argmax of the penalized logits (computed here by hand)."""
    import numpy as np

    from inference_service.sampling.params import (
        MIN_REPETITION_PENALTY,
        MIN_TEMPERATURE,
        SamplingParams,
    )
    from inference_service.sampling.sampler import sample

    rng = np.random.default_rng(0)
    history = np.array([3, 7, 11], np.int32)
    for _ in range(20):
        logits = (rng.standard_normal(500) * 30).astype(np.float32)
        params = SamplingParams(temperature=MIN_TEMPERATURE, seed=int(rng.integers(1 << 30)),
                                repetition_penalty=MIN_REPETITION_PENALTY, logprobs=5)  # fmt: skip
        params.validate(500)
        out = sample(logits, params, history, step=0)
        penalized = logits.astype(np.float64).copy()
        for t in set(history.tolist()):
            v = penalized[t]
            penalized[t] = v / MIN_REPETITION_PENALTY if v > 0 else v * MIN_REPETITION_PENALTY
        assert out.token_id == int(np.argmax(penalized))
        assert np.isfinite(out.logprob) and len(out.top_logprobs) == 5
        assert all(np.isfinite(lp) for _, lp in out.top_logprobs)


# ---- stop conditions: bounded, since they are matched on every step ---------------------------
@pytest.mark.parametrize("over", [False, True], ids=["at-the-limits", "over"])
@pytest.mark.parametrize("field", ["stop-count", "stop-chars", "stop-ids"])
def test_stop_condition_limits(channels, field, over):
    from inference_service.sampling.params import (
        MAX_STOP_STRING_CHARS,
        MAX_STOP_STRINGS,
        MAX_STOP_TOKEN_IDS,
    )

    inf, _ = channels
    extra = int(over)
    kwargs = {
        "stop-count": dict(stop=[f"never{i}" for i in range(MAX_STOP_STRINGS + extra)]),
        "stop-chars": dict(stop=["z" * (MAX_STOP_STRING_CHARS + extra)]),
        "stop-ids": dict(stop_token_ids=[3] * (MAX_STOP_TOKEN_IDS + extra)),
    }[field]
    sampling = ipb.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True, **kwargs)
    call = lambda: list(  # noqa: E731
        igrpc.InferenceServiceStub(inf).Generate(
            ipb.GenerateRequest(text="hi", sampling=sampling), metadata=AUTH, timeout=30
        )
    )
    if not over:
        assert len(call()) >= 1
        return
    err = status_of(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most" in err.details() and "stop" in err.details(), err.details()


# ---- finding 6: deadlines are counted as such ------------------------------------------------
def test_deadlines_are_counted_as_deadline_exceeded(secured_stack, channels):
    inf, _ = channels
    stub = igrpc.InferenceServiceStub(inf)
    key = 'kuiper_inference_requests_total{code="%s",method="Generate"}'
    before = secured_stack.metrics()
    long = ipb.SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    n = 10
    for i in range(n):
        # well below 1000 tokens' time even with the engine in its own process (the tiny model
        # makes up to ~3000 tok/s there, so 1000 tokens take >= 0.3 s)
        timeout = 0.05 + 0.02 * i
        err = status_of(
            lambda t=timeout: list(
                stub.Generate(
                    ipb.GenerateRequest(text="tell me more", sampling=long),
                    metadata=AUTH,
                    timeout=t,
                )
            )
        )
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def counted() -> bool:
        now = secured_stack.metrics()
        done = now.get(key % "DEADLINE_EXCEEDED", 0) - before.get(key % "DEADLINE_EXCEEDED", 0)
        return done >= n

    wait_until(counted, 10, "the server to count the deadlines")
    after = secured_stack.metrics()
    assert after.get(key % "CANCELLED", 0) == before.get(key % "CANCELLED", 0)
    assert after[key % "DEADLINE_EXCEEDED"] - before.get(key % "DEADLINE_EXCEEDED", 0) == n
