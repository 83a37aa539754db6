"""Request deserializers for both gRPC servers that never raise.

grpc answers a deserializer exception with UNKNOWN/INTERNAL and logs a traceback per call. These
parsers return an `Undecodable` instead (too big, truncated, invalid UTF-8 in a string field),
so the handler answers INVALID_ARGUMENT with a short message and one log line. The size check
runs before any parsing: a request over the limit costs no parse time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes were refused; `reason` says why, for the caller."""

    reason: str


def lenient_parser(message_type: Any, max_bytes: Callable[[], int]) -> Callable[[bytes], Any]:
    """A request deserializer for `message_type`; `max_bytes()` is read per call, so a server
    can tighten its limit once it knows the model (e.g. its context length)."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        limit = max_bytes()
        if len(data) > limit:
            return Undecodable(
                f"request of {len(data)} bytes exceeds the limit of {limit} bytes; "
                "split it or shorten it"
            )
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(
                f"cannot parse {name}: the message is malformed or truncated, or a text field "
                "is not valid UTF-8"
            )

    return parse


def discard(data: bytes) -> None:
    """A deserializer for calls refused before their body matters (e.g. unauthenticated)."""
    return None
