"""Health and reflection wiring shared by both kuiper gRPC servers.

Each server serves grpc.health.v1 (Check, Watch and List) and server reflection the same way
and reports one status for the whole server ("") and for its own service.

Health is implemented here rather than with grpcio-health-checking's servicer, which answers
List (advertised by reflection) with UNIMPLEMENTED, a malformed request with UNKNOWN, and keeps
Watch streams open through a drain, so a client that watches (gRPC client-side health
checking) held every stopping server for its whole grace period.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from kuiper_serve.common.request_parsing import Undecodable, lenient_parser

HEALTH_SERVICE = "grpc.health.v1.Health"
_HealthStatus = health_pb2.HealthCheckResponse
# Health and reflection requests are a service name or a symbol: far below this.
_MAX_REQUEST_BYTES = 64 << 10
_SHUTTING_DOWN = "the server is shutting down (health NOT_SERVING); connect to another replica"


class HealthService:
    """grpc.health.v1.Health on a grpc.aio server, for a fixed set of service names.

    Check: the status, or NOT_FOUND for a name the server does not report. Watch: the status
    now and on every change (SERVICE_UNKNOWN for an unknown name); once the server shuts down
    the stream sends NOT_SERVING and ends with UNAVAILABLE, so it does not hold up the drain.
    List: every name's status."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._status = {name: _HealthStatus.NOT_SERVING for name in names}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def set(self, status: int) -> None:
        """The status of every name (ignored once shutting down)."""
        if self._shutting_down:
            return
        async with self._changed:
            for name in self._status:
                self._status[name] = status
            self._changed.notify_all()

    async def shut_down(self) -> None:
        """NOT_SERVING for good; open Watch streams send it and end."""
        await self.set(_HealthStatus.NOT_SERVING)
        async with self._changed:
            self._shutting_down = True
            self._changed.notify_all()

    async def check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = await _service_name(request, context)
        status = self._status.get(name)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(name))
        return _HealthStatus(status=status)

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        name = await _service_name(request, context)
        unknown = _HealthStatus.SERVICE_UNKNOWN
        sent = None
        while True:
            # The lock is held to read and wait only, never while a slow client is written to.
            async with self._changed:
                while self._status.get(name, unknown) == sent and not self._shutting_down:
                    await self._changed.wait()
                status, done = self._status.get(name, unknown), self._shutting_down
            if status != sent:
                yield _HealthStatus(status=status)
                sent = status
            if done:
                break
        await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)

    async def list(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return health_pb2.HealthListResponse(
            statuses={name: _HealthStatus(status=s) for name, s in self._status.items()}
        )

    def _unknown(self, name: str) -> str:
        known = ", ".join(repr(n) for n in self._status)
        return f"unknown service {name!r}: this server reports health for {known}"

    def handler(self) -> grpc.GenericRpcHandler:
        def parser(message_type: Any) -> Any:
            return lenient_parser(message_type, lambda: _MAX_REQUEST_BYTES)

        check = health_pb2.HealthCheckRequest
        return grpc.method_handlers_generic_handler(
            HEALTH_SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check, parser(check), _HealthStatus.SerializeToString
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch, parser(check), _HealthStatus.SerializeToString
                ),
                "List": grpc.unary_unary_rpc_method_handler(
                    self.list,
                    parser(health_pb2.HealthListRequest),
                    health_pb2.HealthListResponse.SerializeToString,
                ),
            },
        )


async def _service_name(request: Any, context: grpc.aio.ServicerContext) -> str:
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
    return request.service


def _reflection_handler(service_names: tuple[str, ...]) -> grpc.GenericRpcHandler:
    """grpcio-reflection's servicer behind a deserializer that never raises: a malformed
    request ends the stream with INVALID_ARGUMENT instead of UNKNOWN."""
    servicer = reflection.aio.ReflectionServicer(service_names)

    async def info(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                yield request

        async for response in servicer.ServerReflectionInfo(parsed(), context):
            yield response

    return grpc.method_handlers_generic_handler(
        reflection.SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                info,
                lenient_parser(reflection_pb2.ServerReflectionRequest, lambda: _MAX_REQUEST_BYTES),
                reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )


class ServerHealth:
    """Health (starting NOT_SERVING) and reflection for `service_name` on `server`.

    Create it before the server starts: grpc.aio takes no servicers later."""

    def __init__(self, server: grpc.aio.Server, service_name: str) -> None:
        self.service = HealthService(("", service_name))
        server.add_generic_rpc_handlers(
            (
                self.service.handler(),
                _reflection_handler((service_name, HEALTH_SERVICE, reflection.SERVICE_NAME)),
            )
        )

    async def set_serving(self, serving: bool) -> None:
        await self.service.set(_HealthStatus.SERVING if serving else _HealthStatus.NOT_SERVING)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good: later set_serving calls change nothing; Watch streams end."""
        await self.service.shut_down()
