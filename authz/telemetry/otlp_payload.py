"""Client OTLP/HTTP payloads: decode (protobuf or JSON), stamp the verified sender
onto every resource, encode as protobuf. Pure.

OTLP/HTTP (https://opentelemetry.io/docs/specs/otlp/#otlphttp) carries one
``Export{Metrics,Logs,Trace}ServiceRequest`` per request, as binary protobuf
(``application/x-protobuf``) or as its JSON mapping (``application/json``), in which trace and
span ids are hex strings rather than the protobuf JSON mapping's base64; they are converted before
parsing.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue

SIGNALS: dict[str, tuple[type[Message], str, str]] = {
    # signal: (request message, its repeated resource field, the gRPC method that exports it)
    "metrics": (
        ExportMetricsServiceRequest,
        "resource_metrics",
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    ),
    "logs": (
        ExportLogsServiceRequest,
        "resource_logs",
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
    ),
    "traces": (
        ExportTraceServiceRequest,
        "resource_spans",
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    ),
}

_HEX_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


class PayloadError(ValueError):
    """The body is not an OTLP export request of the signal it was posted as."""


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent client telemetry, as the gateway verified it from the bearer token."""

    user: str
    groups: tuple[str, ...]
    session_id: str | None


def is_json(content_type: str | None) -> bool:
    """Whether the body is OTLP's JSON encoding (else binary protobuf)."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def decode(signal: str, body: bytes, *, json_body: bool) -> Message:
    """The export request in ``body``; :class:`PayloadError` if it is not one."""
    message_type = SIGNALS[signal][0]
    message = message_type()
    if json_body:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"not JSON: {exc}") from exc
        try:
            json_format.ParseDict(_ids_to_base64(data), message, ignore_unknown_fields=True)
        except (json_format.ParseError, TypeError, ValueError) as exc:
            raise PayloadError(f"not an OTLP {signal} request: {exc}") from exc
        return message
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise PayloadError(f"not an OTLP {signal} request: {exc}") from exc
    return message


def _ids_to_base64(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _hex_to_base64(v) if k in _HEX_ID_FIELDS and isinstance(v, str) else _ids_to_base64(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_ids_to_base64(v) for v in value]
    return value


def _hex_to_base64(value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode("ascii")
    except ValueError:
        # Not hex: leave it for the parser to judge (some senders do use base64).
        return value
    except binascii.Error:  # pragma: no cover - bytes.fromhex raises ValueError only
        return value


def stamp(signal: str, message: Message, sender: Sender, gateway: str) -> int:
    """Set the verified sender on every resource of ``message``, replacing any value the client
    set for the same keys; return how many resources were stamped."""
    attributes = {
        "enduser.id": AnyValue(string_value=sender.user),
        "gateway.user.groups": AnyValue(
            array_value=ArrayValue(values=[AnyValue(string_value=g) for g in sender.groups])
        ),
        "gateway.name": AnyValue(string_value=gateway),
    }
    if sender.session_id:
        attributes["gateway.session.id"] = AnyValue(string_value=sender.session_id)
    resources = getattr(message, SIGNALS[signal][1])
    for item in resources:
        kept = [kv for kv in item.resource.attributes if kv.key not in attributes]
        del item.resource.attributes[:]
        item.resource.attributes.extend(kept)
        item.resource.attributes.extend(KeyValue(key=k, value=v) for k, v in attributes.items())
    return len(resources)
