"""One worker's telemetry end to end in-process: rows in, the same totals out of the OTLP exporter
(decoded by a real OTLP/HTTP receiver) and out of the Prometheus endpoint, and spans continuing
the caller's trace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from authz.config import loads
from authz.telemetry.runtime import LiveTelemetry, start_telemetry
from tests.otlp_receiver import OtlpReceiver
from tests.prometheus_text import scrape, total
from tests.telemetry_rows import denied, row

pytestmark = pytest.mark.integration

ROWS = [
    row(request_id="a"),
    row(request_id="b", input_tokens=9, output_tokens=3, cache_write_tokens=0, cache_read_tokens=0),
    row(request_id="c", upstream="vertex-dev", ingress_format="vertex", operation="invoke"),
    denied(request_id="d"),
]
CONFIG = """
upstreams:
  bedrock-dev: {{kind: bedrock, region: us-east-1}}
  vertex-dev: {{kind: vertex, region: us-east5, project: gateway-prod}}
telemetry:
  otlp: {{endpoint: '{endpoint}', interval: 3600}}
  prometheus: {{enabled: true, port: 0}}
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def telemetry(receiver: OtlpReceiver) -> Iterator[LiveTelemetry]:
    live = start_telemetry(loads(CONFIG.format(endpoint=receiver.url), {}))
    assert isinstance(live, LiveTelemetry)
    try:
        yield live
    finally:
        live.close()


def _record(telemetry: LiveTelemetry) -> None:
    recorded = []
    record = telemetry.recorder(recorded.append)
    for r in ROWS:
        record(r)
    telemetry.refusal("token_expired")
    assert recorded == ROWS  # the ledger still gets every row


def test_otlp_metrics_equal_the_rows(telemetry: LiveTelemetry, receiver: OtlpReceiver) -> None:
    """Token sums by type, cost and request counts exported over OTLP equal the rows' columns."""
    _record(telemetry)
    telemetry.flush()

    def tokens(kind: str) -> float:
        return receiver.metric_sum("gen_ai.client.token.usage", lambda a: a["gen_ai.token.type"] == kind)

    assert tokens("input") == sum(r.input_tokens for r in ROWS)
    assert tokens("output") == sum(r.output_tokens for r in ROWS)
    assert tokens("cache_creation") == sum(r.cache_write_tokens for r in ROWS)
    assert tokens("cache_read") == sum(r.cache_read_tokens for r in ROWS)
    assert receiver.metric_sum("gateway.cost") == pytest.approx(float(sum(r.cost_usd for r in ROWS)))
    assert receiver.metric_sum("gateway.requests") == len(ROWS) + 1
    assert receiver.metric_sum("gateway.requests", lambda a: a.get("gateway.outcome") == "denied") == 2
    (resource,) = {str(r["service.name"]) for r in receiver.resources("/v1/metrics")}
    assert resource == "claude-gateway"


def test_prometheus_metrics_equal_the_rows(telemetry: LiveTelemetry) -> None:
    """The /metrics endpoint exposes the same totals, with Prometheus names and labels."""
    _record(telemetry)
    samples = scrape(f"http://127.0.0.1:{telemetry.prometheus_port}/metrics")
    tokens = total(samples, "gen_ai_client_token_usage_sum")
    assert tokens == sum(
        r.input_tokens + r.output_tokens + r.cache_write_tokens + r.cache_read_tokens for r in ROWS
    )
    assert total(samples, "gateway_cost_USD_total") == pytest.approx(float(sum(r.cost_usd for r in ROWS)))
    assert total(samples, "gateway_requests_total", lambda lab: lab["gateway_denial_reason"] == "policy") == 1
    assert total(samples, "gen_ai_client_operation_duration_seconds_count") == 3
    assert total(samples, "gateway_active_streams") == 0


def test_gauges_and_counters_registered_by_the_process_are_read_at_collection(
    telemetry: LiveTelemetry,
) -> None:
    """A gauge's callback and a counter's totals are read when Prometheus scrapes, not before."""
    state = {"queue": 0.0}
    telemetry.gauge("gateway.ledger.queue", "{row}", "Rows queued.", lambda: state["queue"])
    telemetry.counter(
        "gateway.ledger.rows", "{row}", "Rows.", "gateway.ledger.disposition", lambda: {"written": 5}
    )
    state["queue"] = 7.0
    samples = scrape(f"http://127.0.0.1:{telemetry.prometheus_port}/metrics")
    assert total(samples, "gateway_ledger_queue") == 7.0
    assert (
        total(
            samples, "gateway_ledger_rows_total", lambda lab: lab["gateway_ledger_disposition"] == "written"
        )
        == 5
    )


def test_a_span_continues_the_callers_trace_and_carries_the_row(receiver: OtlpReceiver) -> None:
    """A span is a child of the gRPC metadata's traceparent and names user, model, tokens and outcome."""
    config = loads(CONFIG.format(endpoint=receiver.url), {})
    live = start_telemetry(config)
    try:
        assert live.tracing
        parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        span = live.span("ext_proc Process", [("traceparent", parent), ("user-agent", "grpc")])
        assert span is not None
        span.finish_row(ROWS[0])
        span.finish_row(ROWS[1])  # the first end wins: one span, with the first row
        assert live.span("ext_proc Process", [("user-agent", "grpc")]) is None  # not traced: no span
        unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        assert live.span("ext_proc Process", [("traceparent", unsampled)]) is None
        live.flush()
    finally:
        live.close()
    (got,) = receiver.spans()
    assert (got.trace_id, got.parent_span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert got.attributes["gateway.request_id"] == "a"
    assert got.attributes["enduser.id"] == "alice@example.com"
    assert got.attributes["gen_ai.request.model"] == ROWS[0].requested_model
    assert got.attributes["gen_ai.usage.output_tokens"] == ROWS[0].output_tokens
    assert got.attributes["gateway.outcome"] == "complete"
