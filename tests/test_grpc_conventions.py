"""Both servers as a third-party gRPC tool sees them (grpcurl, ghz, Postman, Kubernetes probes,
gRPC client-side health checking): no generated stubs, only what server reflection returns.

Oracles: the server reflection protocol (grpc.reflection.v1alpha), the health checking protocol
(grpc.health.v1: Check answers NOT_FOUND for a name the server does not know, Watch sends
SERVICE_UNKNOWN, List lists every name) and the gRPC status codes (a malformed request is the
client's mistake: never UNKNOWN)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import free_port, kuiper_command, start_server
from serving_stack import run_stack, tiny_model  # noqa: F401 - fixture

from kuiper_serve.common.auth import keepalive_options
from kuiper_serve.common.health import ServerHealth

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
OWN = {"tokenizer": "kuiper.v1.TokenizerService", "inference": "kuiper.v1.InferenceService"}

# One request per RPC as proto3 JSON (what grpcurl -d sends); a list: a client stream.
REQUESTS = {
    "kuiper.v1.TokenizerService/Encode": {"texts": ["hello world"]},
    "kuiper.v1.TokenizerService/Decode": {"sequences": [{"ids": [5, 6]}]},
    "kuiper.v1.TokenizerService/DecodeStream": [
        {"sequences": [{"sequenceId": "1", "ids": [5]}]},
        {"sequences": [{"sequenceId": "1", "ids": [6]}]},
    ],
    "kuiper.v1.TokenizerService/ApplyChatTemplate": {
        "messages": [{"role": "user", "content": "Hi"}],
        "addGenerationPrompt": True,
    },
    "kuiper.v1.TokenizerService/GetTokenizerInfo": {},
    "kuiper.v1.InferenceService/Generate": {"text": "hi", "sampling": {"maxNewTokens": 2}},
    "kuiper.v1.InferenceService/Chat": {
        "messages": [{"role": "user", "content": "Hi"}],
        "sampling": {"maxNewTokens": 2},
    },
    "kuiper.v1.InferenceService/GetModelInfo": {},
    "grpc.health.v1.Health/Check": {"service": ""},
    "grpc.health.v1.Health/Watch": {"service": ""},
    "grpc.health.v1.Health/List": {},
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": [{"listServices": ""}],
}


@pytest.fixture(scope="module")
def stack(tiny_model):  # noqa: F811
    with run_stack(tiny_model) as s:
        yield s


def servers(stack) -> dict[str, str]:
    return {"tokenizer": stack.tokenizer.address, "inference": stack.inference.address}


def reflect(channel: grpc.Channel) -> tuple[list[str], descriptor_pool.DescriptorPool]:
    """The listed services and a pool of every file they need, imports resolved by name."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**request) -> reflection_pb2.ServerReflectionResponse:
        stream = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10
        )
        (reply,) = list(stream)
        assert not reply.HasField("error_response"), (request, reply.error_response)
        return reply

    services = [s.name for s in ask(list_services="").list_services_response.service]
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(serialized: list[bytes]) -> None:
        for data in serialized:
            proto = descriptor_pb2.FileDescriptorProto.FromString(data)
            files.setdefault(proto.name, proto)
            for dep in proto.dependency:
                if dep not in files:
                    add(ask(file_by_filename=dep).file_descriptor_response.file_descriptor_proto)

    for service in services:
        add(ask(file_containing_symbol=service).file_descriptor_response.file_descriptor_proto)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def load(name: str) -> None:
        if name not in added:
            for dep in files[name].dependency:
                load(dep)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        load(name)
    return services, pool


def call_dynamic(channel: grpc.Channel, method, request_json) -> list:
    """Call `method` (a MethodDescriptor) with messages built from the descriptor alone."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    args = (path, lambda m: m.SerializeToString(), response_cls.FromString)
    requests = request_json if isinstance(request_json, list) else [request_json]
    messages = [json_format.Parse(json.dumps(r), request_cls()) for r in requests]
    if method.client_streaming:
        return list(channel.stream_stream(*args)(iter(messages), timeout=20))
    if method.server_streaming:
        call = channel.unary_stream(*args)(messages[0], timeout=20)
        if method.full_name == "grpc.health.v1.Health.Watch":  # never ends by itself
            first = next(call)
            call.cancel()
            return [first]
        return list(call)
    return [channel.unary_unary(*args)(messages[0], timeout=20)]


@pytest.mark.parametrize("server", ["tokenizer", "inference"])
def test_every_rpc_reflection_lists_answers_a_dynamic_client(stack, server):
    """grpcurl/ghz/Postman flow: list, fetch descriptors, build messages, call. Every method of
    every listed service answers OK (Health/List included: reflection advertises it)."""
    with grpc.insecure_channel(servers(stack)[server]) as channel:
        services, pool = reflect(channel)
        assert sorted(services) == sorted([HEALTH, REFLECTION, OWN[server]])
        called = []
        for service in services:
            for method in pool.FindServiceByName(service).methods:
                key = f"{service}/{method.name}"
                replies = call_dynamic(channel, method, REQUESTS[key])
                assert replies, key
                called.append(key)
        assert "grpc.health.v1.Health/List" in called


@pytest.mark.parametrize("server", ["tokenizer", "inference"])
def test_health_names_unknown_and_list(stack, server):
    with grpc.insecure_channel(servers(stack)[server]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", OWN[server]):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == serving
        other = OWN["inference" if server == "tokenizer" else "tokenizer"]
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service=other), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert other in err.value.details()  # a person can tell which name was unknown
        watch = health.Watch(health_pb2.HealthCheckRequest(service=other), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
        listed = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
        assert {k: v.status for k, v in listed.items()} == {"": serving, OWN[server]: serving}


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/List",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
def test_malformed_health_and_reflection_requests_are_invalid_argument(stack, path):
    """Bytes that are no protobuf message: the client's mistake, INVALID_ARGUMENT (grpcio's
    stock servicers answered UNKNOWN with a Python exception's name)."""
    garbage = b"\xff\xff\xff"
    channel = grpc.insecure_channel(stack.tokenizer.address)
    with channel, pytest.raises(grpc.RpcError) as err:
        if "Reflection" in path:
            list(channel.stream_stream(path)(iter([garbage]), timeout=5))
        elif path.endswith("Watch"):
            list(channel.unary_stream(path)(garbage, timeout=5))
        else:
            channel.unary_unary(path)(garbage, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "cannot parse" in err.value.details()


def test_watch_sees_the_drain_and_does_not_hold_it(tiny_model):  # noqa: F811
    """A Watch stream (gRPC client-side health checking keeps one per backend) gets
    NOT_SERVING on SIGTERM and then ends, so an idle server exits at once instead of waiting
    its whole grace period for the watcher."""
    port = free_port()
    args = kuiper_command("serve-tokenizer", "--model", str(tiny_model), "--port", str(port),
                          "--metrics-port", "-1", "--grace", "60")  # fmt: skip
    with start_server(args, port) as server, grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=OWN["tokenizer"]), timeout=90
        )
        seen: list = []

        def read() -> None:
            try:
                seen.extend(reply.status for reply in watch)
            except grpc.RpcError as exc:
                seen.append(exc.code())

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=90) == 0
        took = time.monotonic() - started
        reader.join(10)
    status = health_pb2.HealthCheckResponse
    assert seen == [status.SERVING, status.NOT_SERVING, grpc.StatusCode.UNAVAILABLE]
    assert took < 15, f"exit took {took:.1f}s with --grace 60: the Watch stream held the drain"


async def _idle_watch_survives(server_options: list[tuple[str, int]], idle_s: float) -> str:
    """An in-process server with these options; a client that pings every 0.5 s without
    throttling (as grpc-go does while a call is open) keeps a Watch open and idle for
    `idle_s`. Returns "alive" or what ended the Watch."""
    server = grpc.aio.server(options=server_options)
    health = ServerHealth(server, "test.Service")
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set_serving(True)
    pings = [("grpc.keepalive_time_ms", 500), ("grpc.http2.max_pings_without_data", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=pings) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=idle_s + 10
            )
            await watch.read()
            read = asyncio.ensure_future(watch.read())
            done, _ = await asyncio.wait({read}, timeout=idle_s)
            if not done:
                watch.cancel()
                return "alive"
            try:
                read.result()
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return "a second message"
    finally:
        await server.stop(0)


def test_keepalive_pings_at_the_allowed_interval_keep_calls_alive():
    """gRPC's default server policy answers a client that pings more often than every 5 min
    with GOAWAY too_many_pings, ending its calls; ours allows one ping per
    MIN_PING_INTERVAL_S. Shown at a 0.25 s interval (the policy's function, as the servers
    call it with 10 s) against gRPC's default, side by side."""

    async def both() -> tuple[str, str]:
        return await asyncio.gather(
            _idle_watch_survives(keepalive_options(0.25), 4.0),
            _idle_watch_survives([], 4.0),
        )

    ours, default = asyncio.run(both())
    assert default.startswith("UNAVAILABLE"), default  # the premise: the client pings hard
    assert ours == "alive", ours
    assert ("grpc.http2.min_ping_interval_without_data_ms", 10_000) in keepalive_options()
