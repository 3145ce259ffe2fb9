"""Client OTLP payloads: decoding both encodings, stamping the verified sender, refusing bad input."""

from __future__ import annotations

import json

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from authz.telemetry.otlp_payload import PayloadError, Sender, decode, is_json, stamp
from tests.otlp_receiver import attributes

SENDER = Sender(user="alice@example.com", groups=("developers", "platform"), session_id="sid-42")


def _metrics_request(**resource: str) -> ExportMetricsServiceRequest:
    attrs = [KeyValue(key=k.replace("_", "."), value=AnyValue(string_value=v)) for k, v in resource.items()]
    return ExportMetricsServiceRequest(
        resource_metrics=[ResourceMetrics(resource=Resource(attributes=attrs))]
    )


def test_stamp_sets_the_verified_user_over_what_the_client_claimed() -> None:
    """A client-sent enduser.id is replaced by the verified one; the client's other attributes stay."""
    message = _metrics_request(enduser_id="mallory@example.com", service_name="claude-code")
    assert stamp("metrics", message, SENDER, "claude-gateway") == 1
    (resource,) = message.resource_metrics
    got = attributes(resource.resource.attributes)
    assert got == {
        "service.name": "claude-code",
        "enduser.id": "alice@example.com",
        "gateway.user.groups": ["developers", "platform"],
        "gateway.session.id": "sid-42",
        "gateway.name": "claude-gateway",
    }
    assert [kv.key for kv in resource.resource.attributes].count("enduser.id") == 1


def test_protobuf_round_trip() -> None:
    """Binary protobuf decodes to the request it encodes."""
    original = _metrics_request(service_name="claude-code")
    assert decode("metrics", original.SerializeToString(), json_body=False) == original


def test_json_trace_ids_are_hex_as_otlp_json_says() -> None:
    """OTLP/JSON's hex trace and span ids arrive as the same bytes (not read as base64)."""
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "claude-code"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "parentSpanId": "eee19b7ec3c1b173",
                                "name": "claude_code.interaction",
                                "kind": 1,
                                "startTimeUnixNano": "1544712660000000000",
                            }
                        ]
                    }
                ],
            }
        ]
    }
    message = decode("traces", json.dumps(body).encode(), json_body=True)
    assert isinstance(message, ExportTraceServiceRequest)
    span = message.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert span.parent_span_id.hex() == "eee19b7ec3c1b173"
    assert span.start_time_unix_nano == 1544712660000000000


def test_json_logs_decode_with_unknown_fields_ignored() -> None:
    """A JSON log export with fields newer than this gateway knows still decodes."""
    body = {
        "resourceLogs": [
            {
                "resource": {},
                "scopeLogs": [{"logRecords": [{"body": {"stringValue": "x"}, "futureField": 1}]}],
            }
        ]
    }
    message = decode("logs", json.dumps(body).encode(), json_body=True)
    assert isinstance(message, ExportLogsServiceRequest)
    assert message.resource_logs[0].scope_logs[0].log_records[0].body.string_value == "x"


@pytest.mark.parametrize(
    ("signal", "body", "json_body"),
    [
        ("metrics", b"\xff\xff\xff", False),
        ("metrics", b"not json", True),
        ("logs", b'{"resourceLogs": "not a list"}', True),
        ("traces", b"[1, 2]", True),
    ],
)
def test_malformed_bodies_are_refused(signal: str, body: bytes, json_body: bool) -> None:
    """Anything but an export request of its signal raises PayloadError (the relay drops and counts it)."""
    with pytest.raises(PayloadError):
        decode(signal, body, json_body=json_body)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/x-protobuf", False),
        (None, False),
    ],
)
def test_is_json(content_type: str | None, expected: bool) -> None:
    """Only application/json (with parameters) is the JSON encoding; anything else is read as protobuf."""
    assert is_json(content_type) is expected
