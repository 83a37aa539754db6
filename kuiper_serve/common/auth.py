"""Optional transport security of the kuiper gRPC servers: TLS and a shared bearer token.

Both services use it. Health and reflection stay open so that Kubernetes probes and
`grpcurl list` work without the token; every other method needs the metadata
`authorization: Bearer <token>` or gets UNAUTHENTICATED. The client side (opening a channel
with TLS and the token) is kuiper_client.channel.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kuiper_serve.common.request_parsing import discard

# Methods reachable without the token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def server_credentials(cert: str | Path, key: str | Path) -> grpc.ServerCredentials:
    """TLS credentials from a PEM certificate (chain) and its private key."""
    try:
        chain = Path(cert).read_bytes()
        private = Path(key).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([(private, chain)])


@dataclass(frozen=True)
class Security:
    """A server's optional TLS (PEM certificate chain + key) and the bearer token every call
    must carry."""

    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials, or None for plaintext. ValueError says what is missing."""
        if not (self.tls_cert or self.tls_key):
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        return server_credentials(self.tls_cert, self.tls_key)

    def interceptors(
        self, on_reject: Callable[[str], None] | None = None
    ) -> list[grpc.aio.ServerInterceptor]:
        """The token check (empty without a token); `on_reject(method)` counts refusals."""
        if not self.auth_token:
            return []
        return [BearerTokenInterceptor(self.auth_token, on_reject)]

    def describe(self) -> str:
        """For the startup log line, e.g. "TLS, bearer token required"."""
        mode = "TLS" if self.tls_cert else "plaintext"
        return mode + (", bearer token required" if self.auth_token else "")


def count_rejections(requests: Any) -> Callable[[str], None]:
    """An `on_reject` that counts a refused call in a Prometheus counter labelled
    (method, code), as the servers count every other final status."""
    return lambda method: requests.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()


def add_port(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Listen on `address` (TLS when `credentials`); returns the bound port, 0 on failure."""
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc raises instead of returning 0 for some bind failures
        return 0


def connection_age_options(max_connection_age_s: float) -> list[tuple[str, int]]:
    """Server options that send clients a GOAWAY once a connection is this old (gRPC adds
    +-10 % jitter), so long-lived clients reconnect and re-resolve, and replicas added by an
    autoscaler get connections too. The grace after it stays gRPC's default (unbounded):
    calls in progress on the old connection finish, none is cut. 0 or less: never."""
    if max_connection_age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", max(1, round(max_connection_age_s * 1000)))]


# The shortest keepalive time grpc-go and grpc-java clients accept (they raise lower settings
# to it). gRPC's default server policy allows one ping per 5 minutes without data and none
# without calls: a client pinging more often (e.g. every 30 s to keep an idle Watch or a queued
# Generate alive through a load balancer) got GOAWAY too_many_pings, which ends every call on
# that connection with UNAVAILABLE.
MIN_PING_INTERVAL_S = 10.0


def keepalive_options(min_ping_interval_s: float = MIN_PING_INTERVAL_S) -> list[tuple[str, int]]:
    """Server options that accept client keepalive pings every `min_ping_interval_s` seconds or
    more, with or without calls in progress; more frequent pings still earn GOAWAY
    too_many_pings (after gRPC's two strikes)."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", max(1, round(min_ping_interval_s * 1000))),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(
    max_receive_bytes: int, reuse_port: bool, max_connection_age_s: float
) -> list[tuple[str, int]]:
    """The transport options both services start with: the receive limit, whether the port
    is shared (SO_REUSEPORT: only several inference frontends; otherwise a taken port is an
    error, not a silent second server), connection age and the keepalive policy."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *connection_age_options(max_connection_age_s),
        *keepalive_options(),
    ]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without exactly one `authorization: Bearer <token>` header (health and
    reflection excepted). Runs when a call starts, from its headers alone: before its body is
    read or parsed."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_PREFIXES):
            return True
        # Exactly one header: with two, a proxy and this server could each read a different one.
        values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if len(values) != 1:
            return False
        got = values[0].encode() if isinstance(values[0], str) else values[0]
        return hmac.compare_digest(got, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self._allowed(handler_call_details):
            return handler
        method = handler_call_details.method
        if self._on_reject is not None:
            self._on_reject(method)
        message = "missing or wrong bearer token (send metadata 'authorization: Bearer <token>')"

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator like the real handler

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        # The body of a refused call is never parsed: an unauthenticated caller costs no parse.
        return make(
            deny_stream if handler.response_streaming else deny,
            request_deserializer=discard,
            response_serializer=handler.response_serializer,
        )
