"""grpc.health.v1 Check without grpcio-health-checking: its two messages are built at import time
in a private descriptor pool, so this client needs grpcio and protobuf only (and does not clash
with grpc_health's own registration of the same names in a process that has both)."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse.ServingStatus, by number.
STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")

_Field = descriptor_pb2.FieldDescriptorProto


def _message_classes() -> tuple[type, type]:
    f = descriptor_pb2.FileDescriptorProto(
        name="kuiper_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    req = f.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=_Field.TYPE_STRING, label=_Field.LABEL_OPTIONAL)
    resp = f.message_type.add(name="HealthCheckResponse")
    enum = resp.enum_type.add(name="ServingStatus")
    for number, name in enumerate(STATUSES):
        enum.value.add(name=name, number=number)
    resp.field.add(
        name="status",
        number=1,
        type=_Field.TYPE_ENUM,
        label=_Field.LABEL_OPTIONAL,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)

    def get(name: str) -> type:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.health.v1.{name}"))

    return get("HealthCheckRequest"), get("HealthCheckResponse")


HealthCheckRequest, HealthCheckResponse = _message_classes()


def check_method(channel):
    """The Check RPC on `channel` (blocking or grpc.aio)."""
    return channel.unary_unary(
        CHECK_METHOD,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )


def status_name(response) -> str:
    """ "SERVING", "NOT_SERVING", ... for a HealthCheckResponse."""
    return STATUSES[response.status] if 0 <= response.status < len(STATUSES) else "UNKNOWN"
