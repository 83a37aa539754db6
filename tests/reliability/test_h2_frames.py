"""Malformed gRPC framing and oversized HTTP/2 frames sent with a bare HTTP/2 client (the `h2`
package over a socket): each gets a proper answer (a grpc-status, a stream reset or a GOAWAY),
within the caller's deadline, and the server keeps serving everyone else.

Oracle: what comes back on the wire; a normal client's call right after."""

from __future__ import annotations

import socket
import struct
import time

import grpc
import pytest
import reliability_util
from kuiper.v1 import inference_pb2 as ipb
from kuiper.v1 import inference_pb2_grpc as igrpc
from reliability_util import AUTH, TOKEN

pytest.importorskip("h2", reason="the h2 package (test extra) sends raw HTTP/2")
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402

secured_stack = reliability_util.secured_stack  # fixtures
tiny_model = reliability_util.tiny_model

GENERATE = "/kuiper.v1.InferenceService/Generate"
ENCODE = "/kuiper.v1.TokenizerService/Encode"
# ignore_eos: a sampled EOS (temperature 1 on a random model) would end it at 1 token.
VALID = ipb.GenerateRequest(
    text="hi", sampling=ipb.SamplingParams(max_new_tokens=2, ignore_eos=True)
)


def grpc_frame(payload: bytes, compressed: bool = False, length: int | None = None) -> bytes:
    return struct.pack(">BI", int(compressed), len(payload) if length is None else length) + payload


def exchange(address: str, path: str, body: bytes, raw_after_headers: bytes = b"") -> dict:
    """One HTTP/2 request; returns what came back: headers, trailers, reset, goaway."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", address), ("content-type", "application/grpc"), ("te", "trailers"),
               ("authorization", f"Bearer {TOKEN}"), ("grpc-timeout", "3S")]  # fmt: skip
    conn.send_headers(1, headers, end_stream=not body and not raw_after_headers)
    sock.sendall(conn.data_to_send())
    if raw_after_headers:
        sock.sendall(raw_after_headers)
    elif body:
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
    got: dict = {"headers": {}, "trailers": {}, "reset": None, "goaway": None, "closed": False}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset by the server
            got["closed"] = True
            break
        if not data:
            got["closed"] = True
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                got["headers"] = dict((k.decode(), v.decode()) for k, v in event.headers)
            elif isinstance(event, h2.events.TrailersReceived):
                got["trailers"] = dict((k.decode(), v.decode()) for k, v in event.headers)
            elif isinstance(event, h2.events.StreamReset):
                got["reset"] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                got["goaway"] = event.error_code
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        try:
            sock.sendall(conn.data_to_send())
        except OSError:  # the server closed the connection (after a GOAWAY)
            got["closed"] = True
            break
        if got["trailers"] or got["reset"] is not None or got["goaway"] is not None:
            break
        if "grpc-status" in got["headers"]:  # trailers-only response
            break
    sock.close()
    return got


def status(got: dict) -> str | None:
    return got["trailers"].get("grpc-status") or got["headers"].get("grpc-status")


CASES = {
    # a well-formed call, as a reference that the client itself works
    "valid": (GENERATE, grpc_frame(VALID.SerializeToString()), b""),
    # compressed flag without a grpc-encoding header
    "compressed-flag": (GENERATE, grpc_frame(VALID.SerializeToString(), compressed=True), b""),
    # the length prefix promises 100 MB, 16 bytes follow
    "huge-length-prefix": (GENERATE, grpc_frame(b"\x0a\x02hi" * 4, length=100 << 20), b""),
    # the length prefix promises 50 bytes, 10 follow
    "short-body": (GENERATE, grpc_frame(b"\x0a\x08abcdefgh", length=50), b""),
    # three bytes: not even a whole prefix
    "truncated-prefix": (ENCODE, b"\x00\x00\x00", b""),
    # two messages for a unary call
    "two-messages": (ENCODE, grpc_frame(b"\x0a\x01a") * 2, b""),
    # a raw DATA frame of 1 MB, far above the 16 KiB frame size both sides agreed on
    "oversized-frame": (GENERATE, b"", struct.pack(">I", 1 << 20)[1:] + b"\x00\x01"
                        + struct.pack(">I", 1) + b"\x00" * 64),
}  # fmt: skip


# gRPC's core answers these before any handler of ours runs. A message cut short waits for its
# missing bytes until the caller's deadline (grpc-timeout, 3 s here): DEADLINE_EXCEEDED.
EXPECTED = {
    "valid": {"0"},
    "compressed-flag": {"13"},  # INTERNAL: compressed without a grpc-encoding
    "huge-length-prefix": {"8"},  # RESOURCE_EXHAUSTED: above the receive limit
    "short-body": {"4"},
    "truncated-prefix": {"4"},
    "two-messages": {"0", "13"},  # the first message is answered (or INTERNAL)
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_framing_gets_a_proper_answer(secured_stack, case):
    path, body, raw = CASES[case]
    address = secured_stack.address if "Inference" in path else secured_stack.tokenizer.address
    start = time.monotonic()
    got = exchange(address, path, body, raw)
    took = time.monotonic() - start
    assert took < 9, f"no answer within 9 s: {got}"
    if case == "oversized-frame":  # a connection error: the stream is reset or the connection goes
        assert got["reset"] is not None or got["goaway"] is not None or got["closed"], got
    else:
        assert status(got) in EXPECTED[case], got
    # Everyone else is still served.
    with grpc.insecure_channel(secured_stack.address) as channel:
        msgs = list(igrpc.InferenceServiceStub(channel).Generate(VALID, metadata=AUTH, timeout=30))
        assert sum(len(m.token_ids) for m in msgs) == 2
    assert secured_stack.inference.proc.poll() is None
    assert secured_stack.tokenizer.proc.poll() is None
