"""Spans for ext_authz ``Check`` and ext_proc ``Process``, children of Envoy's spans.

When Envoy traces a request (``tracing`` in its HTTP connection manager, rendered by
:mod:`authz.envoy.tracing`), its ext_authz and ext_proc gRPC calls carry the W3C ``traceparent``
of Envoy's egress span in their gRPC metadata. A servicer call that carries one gets a child span
here; one that does not (tracing off, or this request not sampled) costs a dictionary lookup.
Spans are batched and exported over OTLP off the event loop (``BatchSpanProcessor``'s thread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.billing.usagerow import UsageRow
from authz.configtypes import Otlp
from authz.telemetry.export import SCOPE, grpc_target, signal_url

_PROPAGATOR = TraceContextTextMapPropagator()
_FAILED = frozenset({"upstream_error", "error"})

Attributes = Mapping[str, str | int | float | bool]


def otlp_span_exporter(otlp: Otlp) -> SpanExporter:
    """The OTLP span exporter for ``telemetry.otlp``."""
    headers = dict(otlp.headers)
    if otlp.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(
            endpoint=grpc_target(otlp.endpoint),
            insecure=otlp.endpoint.startswith("http://"),
            headers=headers,
            timeout=otlp.timeout,
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=signal_url(otlp.endpoint, "traces"), headers=headers, timeout=otlp.timeout)


def parent_context(metadata: Iterable[Any] | None) -> Context | None:
    """The trace context a gRPC call's metadata carries (``traceparent``, ``tracestate``), if any."""
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate") and isinstance(value, str):
            carrier[key] = value
    if "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


def row_attributes(row: UsageRow) -> dict[str, str | int | float | bool]:
    """What a span says about the request its usage row records."""
    attributes: dict[str, str | int | float | bool] = {
        "gateway.request_id": row.request_id,
        "gateway.outcome": row.outcome,
        "gateway.client_format": row.ingress_format,
        "gateway.operation": row.operation,
        "http.response.status_code": row.status,
        "gen_ai.usage.input_tokens": row.input_tokens,
        "gen_ai.usage.output_tokens": row.output_tokens,
        "gen_ai.usage.cache_creation.input_tokens": row.cache_write_tokens,
        "gen_ai.usage.cache_read.input_tokens": row.cache_read_tokens,
        "gateway.cost_usd": float(row.cost_usd),
    }
    optional = {
        "enduser.id": row.user_email or row.user_sub,
        "gateway.session.id": row.session_id,
        "gateway.cc_session.id": row.cc_session_id,
        "gen_ai.request.model": row.requested_model,
        "gen_ai.response.model": row.upstream_model,
        "gateway.upstream": row.upstream,
        "gateway.policy": row.policy,
        "gateway.reason": row.reason,
    }
    attributes.update({k: v for k, v in optional.items() if v})
    return attributes


class RequestSpan:
    """One servicer call's span; attributes are set once the outcome is known."""

    __slots__ = ("_ended", "_span")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._ended = False

    def finish(self, attributes: Attributes, *, failed: bool = False) -> None:
        """Set ``attributes`` and end the span."""
        if self._ended:
            return
        span = self._span
        span.set_attributes(attributes)
        if failed:
            span.set_status(Status(StatusCode.ERROR))
        self.end()

    def finish_row(self, row: UsageRow) -> None:
        """End the span with what ``row`` records."""
        self.finish(row_attributes(row), failed=row.outcome in _FAILED)

    def recording(self, record: Callable[[UsageRow], None]) -> Callable[[UsageRow], None]:
        """``record``, which also ends this span with the row's attributes."""

        def record_and_finish(row: UsageRow) -> None:
            record(row)
            self.finish_row(row)

        return record_and_finish

    def end(self) -> None:
        """End the span if nothing finished it yet."""
        if not self._ended:
            self._ended = True
            self._span.end()


class Tracing:
    """The TracerProvider of one worker, exporting over OTLP."""

    def __init__(
        self, resource: Resource, otlp: Otlp, sample_ratio: float, exporter: SpanExporter | None = None
    ) -> None:
        # ParentBased: Envoy's sampling decision, carried in the traceparent flags, is followed;
        # the ratio only applies to a root, which these servicers never start.
        self.provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter or otlp_span_exporter(otlp)))
        self._tracer = self.provider.get_tracer(SCOPE)

    def span(self, name: str, metadata: Iterable[Any] | None) -> RequestSpan | None:
        """A child of the span the call's metadata names; None when it names none or is not sampled."""
        parent = parent_context(metadata)
        if parent is None:
            return None
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        if not span.is_recording():
            return None
        return RequestSpan(span)

    def flush(self, timeout: float = 10.0) -> None:
        """Export the spans ended so far."""
        self.provider.force_flush(timeout_millis=int(timeout * 1000))

    def close(self) -> None:
        """Export what is left and stop."""
        self.provider.shutdown()
