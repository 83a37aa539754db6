"""What `kuiper bench` calls: a kuiper.v1 method found in the compiled descriptors, and the
request data rendered per call from JSON with ghz's template variables."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from kuiper.v1 import inference_pb2, tokenizer_pb2

from kuiper_serve.common.defaults import INFERENCE_PORT, TOKENIZER_PORT

# Default ports of the two services (the default target is localhost and its service's port).
DEFAULT_PORTS = {
    "kuiper.v1.InferenceService": INFERENCE_PORT,
    "kuiper.v1.TokenizerService": TOKENIZER_PORT,
}
_TEMPLATE = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")
TEMPLATE_FIELDS = ("RequestNumber", "WorkerID", "UUID", "TimestampUnix", "TimestampUnixMilli")


@dataclass(frozen=True)
class Call:
    service: str  # kuiper.v1.InferenceService
    method: str  # Generate
    client_streaming: bool
    server_streaming: bool
    request_cls: type[Message]
    response_cls: type[Message]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def name(self) -> str:
        return f"{self.service}.{self.method}"

    @property
    def counts_tokens(self) -> bool:
        """Responses carry generated token ids (Generate, Chat): TTFT and ITL are per token."""
        return "token_ids" in self.response_cls.DESCRIPTOR.fields_by_name

    @property
    def default_port(self) -> int:
        return DEFAULT_PORTS[self.service]


def all_calls() -> dict[str, Call]:
    out = {}
    for module in (inference_pb2, tokenizer_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                call = Call(
                    service=service.full_name,
                    method=m.name,
                    client_streaming=m.client_streaming,
                    server_streaming=m.server_streaming,
                    request_cls=message_factory.GetMessageClass(m.input_type),
                    response_cls=message_factory.GetMessageClass(m.output_type),
                )
                out[call.name] = call
    return out


def resolve_call(name: str) -> Call:
    """'Generate', 'InferenceService.Generate', 'kuiper.v1.InferenceService.Generate' or
    '/kuiper.v1.InferenceService/Generate'. Raises ValueError naming the choices."""
    calls = all_calls()
    key = name.strip().strip("/").replace("/", ".")
    matches = [c for full, c in calls.items() if full == key or full.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(sorted(calls))
    what = "is ambiguous" if matches else "is not a kuiper.v1 method"
    raise ValueError(f"--call {name!r} {what} (choose from: {choices})")


class RequestData:
    """The -d JSON for one call: an object, or for client-streaming calls (DecodeStream) a list
    of objects sent as the stream's messages. Values may use ghz's template variables
    ({{.RequestNumber}}, {{.WorkerID}}, {{.UUID}}, {{.TimestampUnix}}, {{.TimestampUnixMilli}}),
    filled in per call. Raises ValueError when the data does not parse into the request type."""

    def __init__(self, call: Call, text: str) -> None:
        self.call = call
        self.text = text or "{}"
        self.templated = bool(_TEMPLATE.search(self.text))
        unknown = {m.group(1) for m in _TEMPLATE.finditer(self.text)} - set(TEMPLATE_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown template variable(s) {sorted(unknown)} in the data "
                f"(known: {', '.join(TEMPLATE_FIELDS)})"
            )
        self._fixed = None if self.templated else self._parse(self.text)
        if self.templated:
            self._parse(self._render(0, 0))  # fail now, not in every worker

    def _render(self, request_number: int, worker_id: int) -> str:
        now = time.time()
        values = {
            "RequestNumber": str(request_number),
            "WorkerID": str(worker_id),
            "UUID": str(uuid.uuid4()),
            "TimestampUnix": str(int(now)),
            "TimestampUnixMilli": str(int(now * 1000)),
        }
        return _TEMPLATE.sub(lambda m: values[m.group(1)], self.text)

    def _parse(self, text: str) -> list[Message]:
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the data is not JSON: {exc}") from None
        items = data if isinstance(data, list) else [data]
        if not self.call.client_streaming and len(items) != 1:
            raise ValueError(f"{self.call.method} takes one request object, not a list")
        if not items:
            raise ValueError("the data list is empty: a stream needs at least one message")
        out = []
        for item in items:
            try:
                out.append(json_format.ParseDict(item, self.call.request_cls()))
            except (json_format.ParseError, TypeError) as exc:
                name = self.call.request_cls.DESCRIPTOR.full_name
                raise ValueError(f"the data does not fit {name}: {exc}") from None
        return out

    def messages(self, request_number: int, worker_id: int) -> list[Message]:
        if self._fixed is not None:
            return self._fixed
        return self._parse(self._render(request_number, worker_id))
