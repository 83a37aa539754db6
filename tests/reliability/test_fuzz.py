"""Hypothesis fuzzing of every field of every RPC of both services, and of raw request bytes:
each call ends with OK or a status that blames the request (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED), never UNKNOWN / INTERNAL / UNAVAILABLE, within its deadline (no stall);
afterwards both services still serve and no KV block is held. `-m long` runs 10x the examples.

Oracle: gRPC status codes; health; the inference service's KV-blocks gauge."""

from __future__ import annotations

import grpc
import pytest
import reliability_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from kuiper.v1 import tokenizer_pb2 as tpb
from kuiper.v1 import tokenizer_pb2_grpc as tgrpc
from reliability_util import AUTH, wait_until

secured_stack = reliability_util.secured_stack  # fixtures
tiny_model = reliability_util.tiny_model

ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
DEADLINE_S = 30.0
U32 = st.integers(0, 2**32 - 1)
SPECIAL = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\ufffd", "\x00"])
TEXT = st.one_of(st.text(max_size=60), st.lists(st.one_of(st.text(max_size=8), SPECIAL),
                                                max_size=6).map("".join))  # fmt: skip
FLOAT = st.floats(width=32)  # NaN, infinities, denormals, -0.0 included


def _examples(config) -> int:
    return 250 if reliability_util.long_mode(config) else 25


def optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def sampling(draw):
    kw = dict(max_new_tokens=draw(st.one_of(st.integers(0, 12), U32)),
              top_k=draw(st.integers(-(2**31), 2**31 - 1)), min_p=draw(FLOAT),
              stop=draw(st.lists(TEXT, max_size=3)),
              stop_token_ids=draw(st.lists(U32, max_size=3)), ignore_eos=draw(st.booleans()))  # fmt: skip
    for name, strategy in (("temperature", FLOAT), ("top_p", FLOAT), ("seed", st.integers(0, 2**64 - 1)),
                           ("repetition_penalty", FLOAT), ("logprobs", U32)):  # fmt: skip
        value = draw(optional(strategy))
        if value is not None:
            kw[name] = value
    return ipb.SamplingParams(**kw)


@st.composite
def generate_requests(draw):
    kw = dict(sampling=draw(sampling()), request_id=draw(st.text(max_size=20)))
    if draw(st.booleans()):
        kw["text"] = draw(TEXT)
    else:
        kw["token_ids"] = tpb.TokenIds(ids=draw(st.lists(U32, max_size=40)))
    for name in ("add_special_tokens", "parse_special_tokens"):
        value = draw(optional(st.booleans()))
        if value is not None:
            kw[name] = value
    return ipb.GenerateRequest(**kw)


ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), st.text(max_size=10))
MESSAGES = st.lists(st.builds(tpb.ChatMessage, role=ROLES, content=TEXT), max_size=4)
CHAT = st.builds(ipb.ChatRequest, messages=MESSAGES, sampling=sampling(),
                 request_id=st.text(max_size=10))  # fmt: skip
ENCODE = st.builds(tpb.EncodeRequest, texts=st.lists(TEXT, max_size=4),
                   add_special_tokens=optional(st.booleans()),
                   split_special_tokens=optional(st.booleans()))  # fmt: skip
DECODE = st.builds(tpb.DecodeRequest, sequences=st.lists(st.builds(
    tpb.TokenIds, ids=st.lists(st.one_of(st.integers(0, 700), U32), max_size=20)), max_size=4),
    skip_special_tokens=st.booleans())  # fmt: skip
SEQUENCE = st.builds(tpb.SequenceIds, sequence_id=st.integers(0, 5),
                     ids=st.lists(st.one_of(st.integers(0, 700), U32), max_size=8),
                     context_ids=st.lists(st.one_of(st.integers(0, 700), U32), max_size=4),
                     skip_special_tokens=st.booleans(), finished=st.booleans())  # fmt: skip
STREAM = st.lists(st.builds(tpb.DecodeStreamRequest, sequences=st.lists(SEQUENCE, max_size=4)),
                  max_size=4)  # fmt: skip
TEMPLATE = st.builds(tpb.ChatTemplateRequest, messages=MESSAGES,
                     add_generation_prompt=st.booleans())  # fmt: skip


@pytest.fixture(scope="module")
def stubs(secured_stack):
    inf = grpc.insecure_channel(secured_stack.address)
    tok = grpc.insecure_channel(secured_stack.tokenizer.address)
    yield igrpc.InferenceServiceStub(inf), tgrpc.TokenizerServiceStub(tok), inf, tok
    wait_until(lambda: secured_stack.metrics().get("kuiper_inference_kv_blocks_used") == 0, 30,
               "KV blocks back to 0 after fuzzing")  # fmt: skip
    # Both still answer a plain request (ignore_eos: a sampled EOS would end it early).
    msgs = list(igrpc.InferenceServiceStub(inf).Generate(ipb.GenerateRequest(
        text="still here", sampling=ipb.SamplingParams(max_new_tokens=2, ignore_eos=True)), metadata=AUTH,
        timeout=30))  # fmt: skip
    assert sum(len(m.token_ids) for m in msgs) == 2
    inf.close()
    tok.close()


def check(call) -> None:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(result)
    except grpc.RpcError as exc:
        assert exc.code() in ACCEPTABLE, (exc.code(), exc.details())
        assert exc.details(), "a refusal without a message"


def fuzz(strategy, request):
    """@given(strategy) with this suite's settings."""
    config = settings(max_examples=_examples(request.config), deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
    return lambda test: config(given(strategy)(test))


def test_fuzz_generate(stubs, request):
    inf, *_ = stubs

    @fuzz(generate_requests(), request)
    def run(req):
        check(lambda: inf.Generate(req, metadata=AUTH, timeout=DEADLINE_S))

    run()


def test_fuzz_chat(stubs, request):
    inf, *_ = stubs

    @fuzz(CHAT, request)
    def run(req):
        check(lambda: inf.Chat(req, metadata=AUTH, timeout=DEADLINE_S))

    run()


def test_fuzz_tokenizer_unary(stubs, request):
    _, tok, *_ = stubs

    @fuzz(st.one_of(ENCODE, DECODE, TEMPLATE), request)
    def run(req):
        method = {tpb.EncodeRequest: tok.Encode, tpb.DecodeRequest: tok.Decode,
                  tpb.ChatTemplateRequest: tok.ApplyChatTemplate}[type(req)]  # fmt: skip
        check(lambda: method(req, metadata=AUTH, timeout=DEADLINE_S))
        check(lambda: tok.GetTokenizerInfo(tpb.GetTokenizerInfoRequest(), metadata=AUTH,
                                           timeout=DEADLINE_S))  # fmt: skip

    run()


def test_fuzz_decode_stream(stubs, request):
    _, tok, *_ = stubs

    @fuzz(STREAM, request)
    def run(messages):
        check(lambda: tok.DecodeStream(iter(messages), metadata=AUTH, timeout=DEADLINE_S))

    run()


METHODS = [
    ("kuiper.v1.InferenceService", "Generate", True),
    ("kuiper.v1.InferenceService", "Chat", True),
    ("kuiper.v1.InferenceService", "GetModelInfo", False),
    ("kuiper.v1.TokenizerService", "Encode", False),
    ("kuiper.v1.TokenizerService", "Decode", False),
    ("kuiper.v1.TokenizerService", "ApplyChatTemplate", False),
    ("kuiper.v1.TokenizerService", "GetTokenizerInfo", False),
]


def test_fuzz_raw_bytes(stubs, request):
    _, _, inf_ch, tok_ch = stubs

    @fuzz(st.tuples(st.sampled_from(METHODS), st.binary(max_size=200)), request)
    def run(case):
        (service, method, streaming), payload = case
        channel = inf_ch if service.endswith("InferenceService") else tok_ch
        make = channel.unary_stream if streaming else channel.unary_unary
        call = make(f"/{service}/{method}", request_serializer=None, response_deserializer=None)
        check(lambda: call(payload, metadata=AUTH, timeout=DEADLINE_S))

    run()
