"""An OTLP/HTTP receiver for the tests: a real HTTP server on a loopback port that decodes every
export request with ``opentelemetry-proto`` and keeps it for the test to read.

Usage::

    with OtlpReceiver() as receiver:
        ...                        # point telemetry.otlp.endpoint at receiver.url
        receiver.metric_sum("gateway.requests")
        receiver.spans()
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

MESSAGES: dict[str, type[Message]] = {
    "/v1/metrics": ExportMetricsServiceRequest,
    "/v1/logs": ExportLogsServiceRequest,
    "/v1/traces": ExportTraceServiceRequest,
}


# signal: the gRPC service that exports it, its request and its answer (OTLP/gRPC).
GRPC_SERVICES: dict[str, tuple[str, type[Message], type[Message]]] = {
    "metrics": (
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        ExportMetricsServiceRequest,
        ExportMetricsServiceResponse,
    ),
    "logs": (
        "opentelemetry.proto.collector.logs.v1.LogsService",
        ExportLogsServiceRequest,
        ExportLogsServiceResponse,
    ),
    "traces": (
        "opentelemetry.proto.collector.trace.v1.TraceService",
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    ),
}


def grpc_collector(server: Any, signal: str, received: list[tuple[Message, dict[str, str]]]) -> int:
    """Serve OTLP/gRPC ``Export`` of ``signal`` on ``server`` (a ``grpc.server`` or a
    ``grpc.aio.server``, not yet started) at a free loopback port, returned; every request and its
    metadata is appended to ``received``."""
    service, request_type, response_type = GRPC_SERVICES[signal]

    def export(request: Message, context: grpc.ServicerContext) -> Message:
        received.append((request, dict(context.invocation_metadata())))
        return response_type()

    handler = grpc.unary_unary_rpc_method_handler(
        export,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {"Export": handler})])
    port: int = server.add_insecure_port("127.0.0.1:0")
    return port


def value_of(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` pairs as a dict."""
    return {kv.key: value_of(kv.value) for kv in pairs}


@dataclass(frozen=True)
class Received:
    """One export request as it arrived."""

    path: str
    headers: dict[str, str]
    message: Message


@dataclass(frozen=True)
class Span:
    """A received span, flattened."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    attributes: dict[str, Any]


class OtlpReceiver:
    """Collects OTLP/HTTP exports on ``url`` (``/v1/metrics``, ``/v1/logs``, ``/v1/traces``)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        # Statuses to answer the next requests with, before reading them (a failing collector).
        self.refusals: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self._body()
                with receiver._lock:
                    refusal = receiver.refusals.pop(0) if receiver.refusals else None
                if refusal is not None:
                    self.send_response(refusal)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                message_type = MESSAGES.get(self.path)
                if message_type is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                message = message_type()
                if (self.headers.get("Content-Type") or "").startswith("application/json"):
                    json_format.Parse(body, message)
                else:
                    message.ParseFromString(body)
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, message)
                    )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                # Envoy's OTLP/HTTP exporter streams its body chunked (RFC 9112 section 7.1).
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base endpoint (``telemetry.otlp.endpoint``)."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def of(self, path: str) -> list[Received]:
        """Everything received on ``path``."""
        with self._lock:
            return [r for r in self.received if r.path == path]

    def clear(self) -> None:
        """Forget what was received."""
        with self._lock:
            self.received.clear()

    # --- metrics ---------------------------------------------------------------------------------

    def latest_points(
        self, name: str, where: Callable[[dict[str, Any]], bool] = lambda _a: True
    ) -> list[Any]:
        """The data points of metric ``name`` in the latest export of each reporting process
        (exports are cumulative, so the latest one holds the totals), filtered by attributes."""
        latest: dict[str, list[Any]] = {}
        for received in self.of("/v1/metrics"):
            assert isinstance(received.message, ExportMetricsServiceRequest)
            for rm in received.message.resource_metrics:
                instance = str(attributes(rm.resource.attributes).get("service.instance.id"))
                points: list[Any] = []
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name != name:
                            continue
                        kind = metric.WhichOneof("data")
                        points.extend(
                            p for p in getattr(metric, kind).data_points if where(attributes(p.attributes))
                        )
                if any(m.name == name for sm in rm.scope_metrics for m in sm.metrics):
                    latest[instance] = points
        return [p for points in latest.values() for p in points]

    def metric_sum(self, name: str, where: Callable[[dict[str, Any]], bool] = lambda _a: True) -> float:
        """The total of a counter (its values) or histogram (its sums) across processes."""
        total = 0.0
        for point in self.latest_points(name, where):
            total += point.sum if hasattr(point, "bucket_counts") else (point.as_double or point.as_int)
        return total

    # --- traces and logs -------------------------------------------------------------------------

    def spans(self) -> list[Span]:
        """Every span received, flattened."""
        out: list[Span] = []
        for received in self.of("/v1/traces"):
            assert isinstance(received.message, ExportTraceServiceRequest)
            for rs in received.message.resource_spans:
                service = str(attributes(rs.resource.attributes).get("service.name"))
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append(
                            Span(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                service=service,
                                attributes=attributes(span.attributes),
                            )
                        )
        return out

    def resources(self, path: str) -> list[dict[str, Any]]:
        """The resource attributes of every resource received on ``path``."""
        field = {
            "/v1/metrics": "resource_metrics",
            "/v1/logs": "resource_logs",
            "/v1/traces": "resource_spans",
        }[path]
        return [
            attributes(r.resource.attributes)
            for received in self.of(path)
            for r in getattr(received.message, field)
        ]


def kv(key: str, value: str) -> KeyValue:
    """A string attribute."""
    return KeyValue(key=key, value=AnyValue(string_value=value))
