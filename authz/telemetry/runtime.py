"""The one object the rest of the gateway calls: :class:`Telemetry` (which does nothing) when
telemetry is off, :class:`LiveTelemetry` when the configuration asks for metrics or traces.

Every method on the request path only adds to plain-Python aggregates (or, for a traced request,
starts and ends a span) and returns; exporting happens on the SDK's threads. Nothing here blocks,
raises into the caller, or imports the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter

from authz.configtypes import GatewayConfig
from authz.store.usagerow import UsageRow
from authz.telemetry.export import MetricsPipeline, Read, ReadMany, resource
from authz.telemetry.metrics import GatewayMetrics
from authz.telemetry.tracing import RequestSpan, Tracing

log = logging.getLogger("authz.telemetry")

Record = Callable[[UsageRow], None]


class Telemetry:
    """Telemetry switched off: every method is a no-op, so the request path pays a call at most."""

    enabled = False
    tracing = False

    def recorder(self, record: Record) -> Record:
        """``record`` (the ledger's), also counting each row in the metrics when telemetry is on."""
        return record

    def row(self, row: UsageRow) -> None:
        """Count a finished request from its usage row."""

    def refusal(self, reason: str) -> None:
        """Count a refusal that wrote no usage row (no caller was identified)."""

    def check_seconds(self, seconds: float) -> None:
        """Time ext_authz spent on one ``Check``."""

    def exchange_seconds(self, stream: str, seconds: float) -> None:
        """Time ext_proc spent on all the messages of one stream: an inference ``request``, or one
        ``attempt`` of a failover chain."""

    def stream_opened(self) -> None:
        """An ext_proc stream (one inference request in flight) began."""

    def stream_closed(self) -> None:
        """An ext_proc stream ended."""

    def credential_refresh_failed(self, upstream: str) -> None:
        """Refreshing ``upstream``'s cloud credential failed."""

    def spend_reserved(self, usd: float, scope: str) -> None:
        """Admission reserved ``usd`` against a spend cap of ``scope`` (user, group, org)."""

    def spend_refused(self, scope: str) -> None:
        """Admission refused a request because the ``scope`` cap was reached."""

    def relayed(self, signal: str, result: str) -> None:
        """One client telemetry request (``metrics``, ``logs``, ``traces``): forwarded or why not."""

    def gauge(self, name: str, unit: str, description: str, read: Read) -> None:
        """Publish ``read()`` as a gauge (called at collection time, off the request path)."""

    def counter(self, name: str, unit: str, description: str, attribute: str, read: ReadMany) -> None:
        """Publish the cumulative totals ``read()`` returns, keyed by ``attribute``'s values."""

    def span(
        self, name: str, metadata: Iterable[Any] | None, started_ns: int | None = None
    ) -> RequestSpan | None:
        """A span continuing the trace a gRPC call's metadata carries, started at ``started_ns``
        (``time.time_ns()``, by default now); None when not traced."""
        return None

    def flush(self) -> None:
        """Export metrics and spans now (tests; blocking)."""

    def close(self) -> None:
        """Export what is left and stop (blocking: call it from a thread)."""


class LiveTelemetry(Telemetry):
    """Metrics through the configured readers and, when configured, traces."""

    enabled = True

    def __init__(self, metrics: GatewayMetrics, pipeline: MetricsPipeline, tracing: Tracing | None) -> None:
        self.metrics = metrics
        self.pipeline = pipeline
        self._tracing = tracing
        self.tracing = tracing is not None
        self._streams = 0
        if tracing is not None:
            pipeline.counter(
                "gateway.telemetry.spans",
                "{span}",
                "The gateway's own spans: exported, or dropped and why (queue_full, export_failed).",
                "gateway.telemetry.result",
                lambda: {"exported": tracing.exported, **tracing.dropped},
            )
        pipeline.gauge(
            "gateway.active_streams",
            "{stream}",
            "Inference requests in flight (one ext_proc stream each).",
            lambda: float(self._streams),
        )

    @property
    def prometheus_port(self) -> int | None:
        """The port ``/metrics`` is served on, if it is."""
        return self.pipeline.prometheus.port if self.pipeline.prometheus is not None else None

    def recorder(self, record: Record) -> Record:
        row = self.metrics.row

        def record_and_count(usage: UsageRow) -> None:
            record(usage)
            try:
                row(usage)
            except Exception:
                # Counting must never fail a request: the row is in the ledger all the same.
                log.exception("telemetry: could not count usage row %s", usage.request_id)

        return record_and_count

    def row(self, row: UsageRow) -> None:
        self.metrics.row(row)

    def refusal(self, reason: str) -> None:
        self.metrics.refusal(reason)

    def check_seconds(self, seconds: float) -> None:
        self.metrics.check_time.record((), seconds)

    def exchange_seconds(self, stream: str, seconds: float) -> None:
        self.metrics.exchange_time.record((stream,), seconds)

    def stream_opened(self) -> None:
        self._streams += 1

    def stream_closed(self) -> None:
        self._streams -= 1

    def credential_refresh_failed(self, upstream: str) -> None:
        self.metrics.credential_failures.add((upstream,))

    def spend_reserved(self, usd: float, scope: str) -> None:
        self.metrics.spend_reserved.add((scope,), usd)

    def spend_refused(self, scope: str) -> None:
        self.metrics.spend_refusals.add((scope,))

    def relayed(self, signal: str, result: str) -> None:
        self.metrics.relayed.add((signal, result))

    def gauge(self, name: str, unit: str, description: str, read: Read) -> None:
        self.pipeline.gauge(name, unit, description, read)

    def counter(self, name: str, unit: str, description: str, attribute: str, read: ReadMany) -> None:
        self.pipeline.counter(name, unit, description, attribute, read)

    def span(
        self, name: str, metadata: Iterable[Any] | None, started_ns: int | None = None
    ) -> RequestSpan | None:
        return self._tracing.span(name, metadata, started_ns) if self._tracing is not None else None

    def flush(self) -> None:
        self.pipeline.flush()
        if self._tracing is not None:
            self._tracing.flush()

    def close(self) -> None:
        self.pipeline.close()
        if self._tracing is not None:
            try:
                self._tracing.close()
            except Exception:
                log.exception("telemetry: shutting the tracer provider down failed")


NO_TELEMETRY = Telemetry()


def start_telemetry(
    config: GatewayConfig,
    worker: int = 0,
    *,
    metric_exporter: MetricExporter | None = None,
) -> Telemetry:
    """The telemetry of worker ``worker`` as ``config.telemetry`` asks (``metric_exporter``: tests)."""
    settings = config.telemetry
    prometheus = settings.prometheus
    if not (prometheus.enabled or settings.otlp.endpoint or metric_exporter):
        return NO_TELEMETRY
    metrics = GatewayMetrics(
        {name: up.kind for name, up in config.upstreams}, per_user=settings.per_user_attributes
    )
    where = resource(settings.service_name, worker)
    pipeline = MetricsPipeline(
        metrics,
        resource=where,
        otlp=settings.otlp,
        prometheus=(prometheus.address, prometheus.port + worker if prometheus.port else 0)
        if prometheus.enabled
        else None,
        exporter=metric_exporter,
    )
    tracing = None
    if settings.tracing:
        tracing = Tracing(where, settings.otlp)
    return LiveTelemetry(metrics, pipeline, tracing)
