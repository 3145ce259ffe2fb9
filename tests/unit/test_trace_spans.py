"""The gateway's span records and their OTLP encoding (authz/telemetry/spans.py): the same
``ExportTraceServiceRequest`` the OpenTelemetry SDK's own encoder makes of the same spans."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from authz.telemetry.spans import SpanRecord, export_request, resource_message, set_value

RESOURCE = Resource.create(
    {"service.name": "claude-gateway", "service.instance.id": "w-1", "gateway.worker": 3}
)
SCOPE = "claude-gateway"

RECORDS = [
    SpanRecord(
        "ext_proc Process",
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        1_700_000_000_000_000_000,
        1_700_000_000_004_000_000,
        {
            "gateway.request_id": "req-1",
            "gateway.outcome": "complete",
            "http.response.status_code": 200,
            "gen_ai.usage.input_tokens": 1234,
            "gen_ai.usage.output_tokens": 0,
            "gateway.cost_usd": 0.012345,
            "enduser.id": "zoë@example.com",
        },
        False,
    ),
    SpanRecord(
        "ext_authz Check",
        1,
        2,
        5,
        6,
        {"gateway.decision": "deny", "gateway.denial_reason": "policy: no", "gateway.flag": True},
        True,
    ),
    SpanRecord("ext_proc Process", (1 << 128) - 1, (1 << 64) - 1, 7, 8, {"n": -3}, True),
]


def _ids(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


def _sdk_span(record: SpanRecord, span_id: int) -> ReadableSpan:
    parent = SpanContext(record.trace_id, record.parent_span_id, is_remote=True, trace_flags=TraceFlags(1))
    return ReadableSpan(
        record.name,
        context=SpanContext(record.trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1)),
        parent=parent,
        resource=RESOURCE,
        attributes=record.attributes,
        kind=SpanKind.SERVER,
        status=Status(StatusCode.ERROR) if record.failed else Status(),
        start_time=record.start_ns,
        end_time=record.end_ns,
        instrumentation_scope=InstrumentationScope(SCOPE),
    )


def test_the_request_is_the_one_the_sdk_encoder_makes_of_the_same_spans() -> None:
    """Field for field (ids, parent, times, kind, attributes of every type, status, flags, resource
    and scope): a collector cannot tell the two apart."""
    ids = _ids(0x1000)
    ours = ExportTraceServiceRequest.FromString(
        export_request(resource_message(RESOURCE.attributes), SCOPE, RECORDS, lambda: next(ids))
    )
    theirs = encode_spans([_sdk_span(r, 0x1000 + i) for i, r in enumerate(RECORDS)])
    assert ours == theirs
    (resource_spans,) = ours.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert [s.span_id for s in scope_spans.spans] == [(0x1000 + i).to_bytes(8, "big") for i in range(3)]


def test_no_records_no_spans() -> None:
    """An empty batch is a request with the resource and no spans (nothing is invented)."""
    message = ExportTraceServiceRequest.FromString(
        export_request(resource_message(RESOURCE.attributes), SCOPE, [], lambda: 1)
    )
    assert [len(s.spans) for s in message.resource_spans[0].scope_spans] == [0]


@pytest.mark.parametrize(
    ("value", "field"),
    [("x", "string_value"), (True, "bool_value"), (7, "int_value"), (0.5, "double_value")],
)
def test_values_take_their_own_field(value: object, field: str) -> None:
    """A bool is a bool_value, not an int_value (bool is an int subclass in Python)."""
    target = AnyValue()
    set_value(target, value)
    assert target.WhichOneof("value") == field
    assert getattr(target, field) == value


def test_sequences_become_arrays_and_other_values_are_refused() -> None:
    """Resource attributes may hold sequences; anything else OTLP cannot carry is an error."""
    target = AnyValue()
    set_value(target, ("a", "b"))
    assert [v.string_value for v in target.array_value.values] == ["a", "b"]
    with pytest.raises(TypeError):
        set_value(AnyValue(), {"a": 1})
