"""The OpenTelemetry SDK side: one MeterProvider per worker whose two readers, an OTLP exporter and
a Prometheus endpoint, publish :class:`~authz.telemetry.metrics.GatewayMetrics` and the gauges the
process registers.

Counters and gauges are SDK observable instruments reading the plain-Python aggregates at
collection time. Histograms have no observable form in the SDK, so each reader adds them, as SDK
``HistogramDataPoint`` objects, to the ``MetricsData`` it received before handing it on
(``MetricReader._receive_metrics``, the documented extension point of a reader). Either way the
request path never calls the SDK (see :mod:`authz.telemetry.aggregate` for why).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricsData,
    PeriodicExportingMetricReader,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry, start_http_server

from authz.configtypes import Otlp
from authz.telemetry import aggregate
from authz.telemetry.metrics import GatewayMetrics

log = logging.getLogger("authz.telemetry")

SCOPE = "claude-gateway"

# Cumulative for every instrument: Prometheus needs it, and the histograms added here are
# cumulative whatever an exporter would prefer (OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE).
CUMULATIVE: dict[type, AggregationTemporality] = {
    kind: AggregationTemporality.CUMULATIVE
    for kind in (
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    )
}

Read = Callable[[], float]
ReadMany = Callable[[], Mapping[str, float]]


def resource(service_name: str, worker: int) -> Resource:
    """Who the metrics and spans come from: one ``service.instance.id`` per worker process, so the
    cumulative series of several workers never merge."""
    return Resource.create(
        {
            "service.name": service_name,
            "service.instance.id": str(uuid.uuid4()),
            "gateway.worker": worker,
        }
    )


class _Histograms:
    """Adds the gateway's histograms to what a reader collected."""

    def __init__(self, metrics: GatewayMetrics, started_ns: int) -> None:
        self._metrics = metrics
        self._started_ns = started_ns

    def add_to(self, data: MetricsData) -> MetricsData:
        now = time.time_ns()
        extra = [m for m in (self._metric(h, now) for h in self._metrics.histograms) if m is not None]
        if not extra or not data.resource_metrics:
            return data
        first = data.resource_metrics[0]
        scopes = list(first.scope_metrics)
        for i, scope in enumerate(scopes):
            if scope.scope.name == SCOPE:
                scopes[i] = replace(scope, metrics=[*scope.metrics, *extra])
                break
        else:
            scopes.append(ScopeMetrics(InstrumentationScope(SCOPE), extra, ""))
        return replace(
            data, resource_metrics=[replace(first, scope_metrics=scopes), *data.resource_metrics[1:]]
        )

    def _metric(self, histogram: aggregate.Histogram, now: int) -> Metric | None:
        points = [
            HistogramDataPoint(
                attributes=histogram.instrument.labels(key),
                start_time_unix_nano=self._started_ns,
                time_unix_nano=now,
                count=count,
                sum=total,
                bucket_counts=counts,
                explicit_bounds=list(histogram.bounds),
                min=low,
                max=high,
            )
            for key, counts, count, total, low, high in histogram.snapshot()
        ]
        if not points:
            return None
        instrument = histogram.instrument
        return Metric(
            name=instrument.name,
            description=instrument.description,
            unit=instrument.unit,
            data=HistogramData(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )


class _PrometheusReader(PrometheusMetricReader):
    def __init__(self, histograms: _Histograms, registry: CollectorRegistry) -> None:
        # Scope labels off: every series comes from one scope, and dashboards read plain labels.
        super().__init__(registry=registry, scope_info_enabled=False)
        self._histograms = histograms

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        super()._receive_metrics(self._histograms.add_to(metrics_data), timeout_millis, **kwargs)


class _OtlpReader(PeriodicExportingMetricReader):
    def __init__(self, histograms: _Histograms, exporter: MetricExporter, interval: float) -> None:
        super().__init__(exporter, export_interval_millis=interval * 1000.0)
        self._histograms = histograms

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        super()._receive_metrics(self._histograms.add_to(metrics_data), timeout_millis, **kwargs)


def otlp_metric_exporter(otlp: Otlp) -> MetricExporter:
    """The OTLP metric exporter for ``telemetry.otlp`` (HTTP/protobuf or gRPC)."""
    headers = dict(otlp.headers)
    if otlp.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter(
            endpoint=grpc_target(otlp.endpoint),
            insecure=otlp.endpoint.startswith("http://"),
            headers=headers,
            timeout=otlp.timeout,
            preferred_temporality=CUMULATIVE,
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(
        endpoint=signal_url(otlp.endpoint, "metrics"),
        headers=headers,
        timeout=otlp.timeout,
        preferred_temporality=CUMULATIVE,
    )


def signal_url(endpoint: str, signal: str) -> str:
    """The OTLP/HTTP URL of one signal under a base endpoint (``/v1/metrics``, ``/v1/traces``, ...)."""
    return f"{endpoint.rstrip('/')}/v1/{signal}"


def grpc_target(endpoint: str) -> str:
    """``host:port`` of an OTLP/gRPC endpoint URL (default port 4317)."""
    rest = endpoint.split("://", 1)[-1].rstrip("/")
    return rest if ":" in rest.rsplit("]", 1)[-1] else f"{rest}:4317"


def grpc_metadata(otlp: Otlp) -> tuple[tuple[str, str], ...]:
    """``telemetry.otlp.headers`` as gRPC metadata (whose keys are lower case)."""
    return tuple((key.lower(), value) for key, value in otlp.headers)


class PrometheusServer:
    """``/metrics`` on a port of its own, served from a thread (a scrape never waits on the event loop)."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        server, thread = start_http_server(port, address, registry=registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class MetricsPipeline:
    """The MeterProvider, its readers and the Prometheus server of one worker."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        resource: Resource,
        otlp: Otlp | None,
        prometheus: tuple[str, int] | None,
        exporter: MetricExporter | None = None,
    ) -> None:
        histograms = _Histograms(metrics, time.time_ns())
        readers: list[Any] = []
        self.prometheus: PrometheusServer | None = None
        if prometheus is not None:
            registry = CollectorRegistry()
            readers.append(_PrometheusReader(histograms, registry))
            self.prometheus = PrometheusServer(registry, *prometheus)
        if otlp is not None and (otlp.endpoint or exporter is not None):
            readers.append(_OtlpReader(histograms, exporter or otlp_metric_exporter(otlp), otlp.interval))
        self._readers = readers
        # Exemplars off: they would look up the current span on every measurement.
        self.provider = MeterProvider(
            resource=resource, metric_readers=readers, exemplar_filter=AlwaysOffExemplarFilter()
        )
        self._meter = self.provider.get_meter(SCOPE)
        for total in metrics.sums:
            self._observe_sum(total)

    def _observe_sum(self, total: aggregate.Sum) -> None:
        instrument = total.instrument

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, instrument.labels(key)) for key, value in total.snapshot()]

        self._meter.create_observable_counter(
            instrument.name, callbacks=[observe], unit=instrument.unit, description=instrument.description
        )

    def gauge(self, name: str, unit: str, description: str, read: Read) -> None:
        """Publish ``read()`` as a gauge, read at each collection."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read())]

        self._meter.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)

    def counter(self, name: str, unit: str, description: str, attribute: str, read: ReadMany) -> None:
        """Publish the cumulative totals ``read()`` returns, one series per value of ``attribute``."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, {attribute: label}) for label, value in read().items()]

        self._meter.create_observable_counter(name, callbacks=[observe], unit=unit, description=description)

    def flush(self, timeout: float = 10.0) -> None:
        """Export now (OTLP), for tests and shutdown."""
        self.provider.force_flush(timeout_millis=timeout * 1000.0)

    def close(self) -> None:
        """Export what is left and stop the readers and the Prometheus server."""
        try:
            self.provider.shutdown()
        except Exception:
            log.exception("telemetry: shutting the meter provider down failed")
        if self.prometheus is not None:
            self.prometheus.close()
