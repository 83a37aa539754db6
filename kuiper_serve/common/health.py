"""Health and reflection wiring shared by both kuiper gRPC servers.

Each server registers grpc.health.v1 health and server reflection the same way and reports
one status for the whole server ("") and for its own service.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


class ServerHealth:
    """Health (starting NOT_SERVING) and reflection for `service_name` on `server`.

    Create it before the server starts: grpc.aio takes no servicers later."""

    def __init__(self, server: grpc.aio.Server, service_name: str) -> None:
        self.servicer = health.aio.HealthServicer()
        self._names = ("", service_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        reflection.enable_server_reflection(
            (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self.servicer.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good: later set_serving calls change nothing."""
        await self.servicer.enter_graceful_shutdown()
