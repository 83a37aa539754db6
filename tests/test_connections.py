"""How clients spread over replicas (the Kubernetes setup in deploy/k8s relies on both):

- the inference service's tokenizer channel balances round-robin over every address its target
  resolves to (dns:/// + a headless Service in a cluster; an ipv4: list here), and
- `--max-connection-age` makes a server send GOAWAY to old connections so clients reconnect
  (and re-resolve), while calls in progress on them are not cut.

Two real tokenizer servers on loopback; the counts come from their own Prometheus metrics."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from queue import Queue

import grpc
import pytest
from kuiper.v1 import tokenizer_pb2 as pb
from kuiper.v1 import tokenizer_pb2_grpc
from servers import free_port, kuiper_command, start_server

from inference_service.tokenizer_client import TokenizerClient

AGE_S = 1.0


def encode_ok(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for line in body.decode().splitlines():
        labels = 'method="Encode"' in line and 'code="OK"' in line
        if line.startswith("kuiper_tokenizer_requests_total{") and labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def two_tokenizers(smollm2_gguf):
    """(aged, plain): the same model, one server with --max-connection-age, one without."""
    started = []
    try:
        for age in (AGE_S, 0.0):
            port, metrics_port = free_port(), free_port()
            args = kuiper_command(
                "serve-tokenizer", "--model", str(smollm2_gguf), "--port", str(port),
                "--metrics-port", str(metrics_port), "--max-connection-age", str(age),
            )  # fmt: skip
            started.append((start_server(args, port, wait=False), metrics_port))
        for server, _ in started:
            server.wait_ready(timeout=90)
        yield started
        for server, _ in started:
            assert server.stop() == 0, server.log_text()
    finally:
        for server, _ in started:
            server.kill()


def test_tokenizer_client_takes_turns_over_every_resolved_address(two_tokenizers) -> None:
    (a, a_metrics), (b, b_metrics) = two_tokenizers
    before = encode_ok(a_metrics), encode_ok(b_metrics)
    calls = 40

    async def run() -> None:
        client = TokenizerClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}")
        try:
            for _ in range(calls):
                assert await client.encode("hello world") == await client.encode("hello world")
        finally:
            await client.close()

    asyncio.run(run())
    got = encode_ok(a_metrics) - before[0], encode_ok(b_metrics) - before[1]
    assert sum(got) == 2 * calls, got
    # pick_first (gRPC's default policy) would send all of them to one server.
    assert min(got) >= calls // 2, f"calls per server {got}: not balanced"


def states_seen(address: str, wait_s: float) -> list[grpc.ChannelConnectivity]:
    """Connectivity states of a channel that makes one call, then sits for wait_s."""
    seen: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(address) as channel:
        channel.subscribe(seen.append)
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=10)
        time.sleep(wait_s)
        # and the channel still works afterwards (it reconnects by itself)
        stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=10)
        channel.unsubscribe(seen.append)
    return seen


def test_max_connection_age_makes_idle_clients_reconnect(two_tokenizers) -> None:
    (aged, _), (plain, _) = two_tokenizers
    ready_then_idle = [grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE]

    def went_idle(seen: list[grpc.ChannelConnectivity]) -> bool:
        return any(seen[i : i + 2] == ready_then_idle for i in range(len(seen)))

    # GOAWAY after ~1 s (+-10 % jitter) puts the channel back to IDLE; without the flag the
    # connection stays up (gRPC's client idle timeout is 30 minutes).
    assert went_idle(states_seen(aged.address, 3 * AGE_S))
    assert not went_idle(states_seen(plain.address, 3 * AGE_S))


def test_max_connection_age_never_cuts_a_stream_in_progress(two_tokenizers) -> None:
    (aged, _), _ = two_tokenizers
    with grpc.insecure_channel(aged.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        requests: Queue = Queue()
        replies = stub.DecodeStream(iter(requests.get, None), timeout=30)
        answers: list[str] = []
        reader = threading.Thread(target=lambda: answers.extend(
            r.deltas[0].text for r in replies), daemon=True)  # fmt: skip
        reader.start()
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < 3.5 * AGE_S:  # well past the age
            ids = [30 + sent % 20]
            requests.put(pb.DecodeStreamRequest(sequences=[pb.SequenceIds(sequence_id=1, ids=ids)]))
            sent += 1
            time.sleep(0.1)
        requests.put(None)
        reader.join(timeout=10)
        assert replies.code() == grpc.StatusCode.OK, replies.details()
        assert len(answers) == sent
