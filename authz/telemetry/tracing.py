"""Spans for ext_authz ``Check`` and ext_proc ``Process``, children of Envoy's spans.

When Envoy traces a request (``tracing`` in its HTTP connection manager, rendered by
:mod:`authz.envoy.tracing`), its ext_authz and ext_proc gRPC calls carry the W3C ``traceparent``
of Envoy's egress span in their gRPC metadata. A servicer call that carries a sampled one gets a
child span here; one that does not (tracing off, or this request not sampled) costs a lookup.

Cheap by construction, since every traced request pays it twice on the request path: the
``traceparent`` is sliced rather than parsed by the propagator, and nothing is built until the
outcome is known; then one SDK ``ReadableSpan`` goes to the ``BatchSpanProcessor``, which encodes
and exports batches over OTLP on its own thread. Envoy's flag decides sampling (the SDK's
``ParentBased`` rule: a sampled parent's children are recorded, an unsampled one's are not);
``telemetry.traces.sample_ratio`` is applied by Envoy to the requests it starts traces for.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from authz.configtypes import Otlp
from authz.store.usagerow import UsageRow
from authz.telemetry.export import SCOPE, grpc_target, signal_url

_FAILED = frozenset({"upstream_error", "error"})
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_ERROR = Status(StatusCode.ERROR)
_UNSET = Status()
_HEX = frozenset("0123456789abcdef")

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


def parent_context(metadata: Iterable[Any] | None) -> SpanContext | None:
    """The sampled parent a gRPC call's ``traceparent`` names, if any (W3C Trace Context level 1,
    section 3.2: ``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``; an unsampled, invalid or
    all-zero one is no parent)."""
    for key, value in metadata or ():
        if key != "traceparent":
            continue
        if (
            not isinstance(value, str)
            or len(value) < 55
            or value[2] != "-"
            or value[35] != "-"
            or value[52] != "-"
        ):
            return None
        version, trace_hex, span_hex, flags = value[:2], value[3:35], value[36:52], value[53:55]
        if version == "ff" or not _HEX.issuperset(trace_hex + span_hex + flags + version):
            return None
        if not int(flags, 16) & TraceFlags.SAMPLED:
            return None
        trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
        if not trace_id or not span_id:
            return None
        return SpanContext(trace_id, span_id, is_remote=True, trace_flags=_SAMPLED)
    return None


def row_attributes(row: UsageRow) -> dict[str, str | int | float | bool]:
    """What a span says about the request its usage row records: who, which model, the tokens, the
    outcome and cost. Deliberately few: each attribute costs about 2 microseconds to encode, on
    every traced request; the usage row (``gateway.request_id``) has the rest."""
    attributes: dict[str, str | int | float | bool] = {
        "gateway.request_id": row.request_id,
        "gateway.outcome": row.outcome,
        "http.response.status_code": row.status,
        "gen_ai.usage.input_tokens": row.input_tokens,
        "gen_ai.usage.output_tokens": row.output_tokens,
        "gen_ai.usage.cache_creation.input_tokens": row.cache_write_tokens,
        "gen_ai.usage.cache_read.input_tokens": row.cache_read_tokens,
        "gateway.cost_usd": float(row.cost_usd),
    }
    user = row.user_email or row.user_sub
    if user:
        attributes["enduser.id"] = user
    if row.requested_model:
        attributes["gen_ai.request.model"] = row.requested_model
    if row.reason:
        attributes["gateway.reason"] = row.reason
    return attributes


class RequestSpan:
    """One servicer call's span, built and handed to the exporter when it finishes."""

    __slots__ = ("_ended", "_name", "_parent", "_started", "_tracing")

    def __init__(self, tracing: Tracing, name: str, parent: SpanContext) -> None:
        self._tracing = tracing
        self._name = name
        self._parent = parent
        self._started = time.time_ns()
        self._ended = False

    def finish(self, attributes: Attributes, *, failed: bool = False) -> None:
        """End the span with ``attributes`` (the first call wins)."""
        if self._ended:
            return
        self._ended = True
        self._tracing.emit(self._name, self._parent, self._started, attributes, failed)

    def finish_row(self, row: UsageRow) -> None:
        """End the span with what ``row`` records."""
        self.finish(row_attributes(row), failed=row.outcome in _FAILED)

    def recording(self, record: Callable[[UsageRow], None]) -> Callable[[UsageRow], None]:
        """``record``, which also ends this span with the row's attributes."""

        def record_and_finish(row: UsageRow) -> None:
            record(row)
            self.finish_row(row)

        return record_and_finish

    def discard(self) -> None:
        """Export nothing for this call (a no-op once the span finished)."""
        self._ended = True


class Tracing:
    """One worker's spans: batched and exported over OTLP."""

    def __init__(self, resource: Resource, otlp: Otlp, exporter: SpanExporter | None = None) -> None:
        self._resource = resource
        self._scope = InstrumentationScope(SCOPE)
        self._processor = BatchSpanProcessor(exporter or otlp_span_exporter(otlp))

    def span(self, name: str, metadata: Iterable[Any] | None) -> RequestSpan | None:
        """A child of the sampled span the call's metadata names; None otherwise."""
        parent = parent_context(metadata)
        return RequestSpan(self, name, parent) if parent is not None else None

    def emit(
        self, name: str, parent: SpanContext, started: int, attributes: Attributes, failed: bool
    ) -> None:
        """Hand one finished span to the batch processor."""
        context = SpanContext(
            parent.trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=_SAMPLED
        )
        span = ReadableSpan(
            name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            status=_ERROR if failed else _UNSET,
            start_time=started,
            end_time=time.time_ns(),
            instrumentation_scope=self._scope,
        )
        self._processor.on_end(span)

    def flush(self, timeout: float = 10.0) -> None:
        """Export the spans ended so far."""
        self._processor.force_flush(timeout_millis=int(timeout * 1000))

    def close(self) -> None:
        """Export what is left and stop."""
        self._processor.shutdown()  # type: ignore[no-untyped-call]  # untyped in the SDK
