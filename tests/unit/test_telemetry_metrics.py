"""How usage rows, refusals and timings become the gateway's metrics (authz/telemetry/metrics.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from authz.telemetry import aggregate
from authz.telemetry.aggregate import Histogram, Instrument, Sum
from authz.telemetry.metrics import GatewayMetrics, denial_reason
from tests.telemetry_rows import denied, row

KINDS = {"bedrock-dev": "bedrock", "vertex-dev": "vertex"}


def _by(histogram: Histogram, attribute: str) -> dict[str, float]:
    """Histogram sums per value of one attribute."""
    out: dict[str, float] = {}
    for key, _counts, _count, total, _low, _high in histogram.snapshot():
        label = str(histogram.instrument.labels(key).get(attribute, ""))
        out[label] = out.get(label, 0.0) + total
    return out


def _labels(total: Sum) -> list[dict[str, str | bool]]:
    return [total.instrument.labels(key) for key, _ in total.snapshot()]


def test_token_usage_sums_equal_the_rows_columns_by_token_type() -> None:
    """Input, output, cache writes and cache reads add up, per gen_ai.token.type, to the rows' columns."""
    metrics = GatewayMetrics(KINDS)
    rows = [
        row(request_id="a"),
        row(request_id="b", input_tokens=7, output_tokens=0, cache_write_tokens=0, cache_read_tokens=5),
        row(request_id="c", upstream="vertex-dev", ingress_format="vertex", operation="invoke"),
    ]
    for r in rows:
        metrics.row(r)
    assert _by(metrics.tokens, "gen_ai.token.type") == {
        "input": sum(r.input_tokens for r in rows),
        "output": sum(r.output_tokens for r in rows),
        "cache_creation": sum(r.cache_write_tokens for r in rows),
        "cache_read": sum(r.cache_read_tokens for r in rows),
    }
    assert _by(metrics.tokens, "gen_ai.provider.name") == {
        "aws.bedrock": 120 + 45 + 300 + 2000 + 7 + 5,
        "gcp.vertex_ai": 120 + 45 + 300 + 2000,
    }


def test_cost_and_requests_follow_the_rows() -> None:
    """gateway.cost adds the rows' costs (to float precision); gateway.requests counts each row once."""
    metrics = GatewayMetrics(KINDS)
    costs = [Decimal("0.1"), Decimal("0.2"), Decimal("0.00000001")]
    for i, cost in enumerate(costs):
        metrics.row(row(request_id=str(i), cost_usd=cost))
    metrics.row(denied(request_id="d"))
    assert sum(v for _, v in metrics.cost.snapshot()) == pytest.approx(float(sum(costs)), abs=1e-12)
    assert sum(v for _, v in metrics.requests.snapshot()) == 4


def test_rows_with_estimated_counts_are_counted_by_outcome_and_which() -> None:
    """A row whose tokens are partly estimated (cut short) shows in gateway.usage.estimated; an
    exact row does not."""
    metrics = GatewayMetrics(KINDS)
    metrics.row(row(request_id="exact"))
    metrics.row(row(request_id="cut", outcome="client_aborted", output_tokens_estimated=True))
    metrics.row(
        row(
            request_id="early",
            outcome="upstream_error",
            input_tokens_estimated=True,
            output_tokens_estimated=True,
        )
    )
    assert sorted(
        (
            str(metrics.estimated.instrument.labels(k)["gateway.outcome"]),
            str(metrics.estimated.instrument.labels(k)["gateway.estimated"]),
            v,
        )
        for k, v in metrics.estimated.snapshot()
    ) == [("client_aborted", "output", 1), ("upstream_error", "input,output", 1)]


def test_a_denied_row_counts_as_a_request_with_a_bounded_reason_and_no_model_usage() -> None:
    """A refusal counts in gateway.requests with the reason's stable prefix, never in tokens or durations."""
    metrics = GatewayMetrics(KINDS)
    metrics.row(denied())
    (labels,) = _labels(metrics.requests)
    assert labels["gateway.outcome"] == "denied"
    assert labels["gateway.denial_reason"] == "policy"
    assert metrics.tokens.snapshot() == []
    assert metrics.duration.snapshot() == []


def test_anonymous_refusals_are_counted_with_the_status_they_got() -> None:
    """A token refusal counts as 401 and a malformed header as 400, with no user or model attributes."""
    metrics = GatewayMetrics(KINDS)
    metrics.refusal("token_expired")
    metrics.refusal("malformed_header")
    statuses = {
        str(lab["gateway.denial_reason"]): lab.get("http.response.status_code")
        for lab in _labels(metrics.requests)
    }
    assert statuses == {"token_expired": "401", "malformed_header": "400"}


def test_user_attributes_only_when_configured() -> None:
    """enduser.id appears on request, token and cost metrics only with per_user_attributes."""
    plain = GatewayMetrics(KINDS)
    per_user = GatewayMetrics(KINDS, per_user=True)
    for metrics in (plain, per_user):
        metrics.row(row())
    assert all("enduser.id" not in lab for lab in _labels(plain.requests) + _labels(plain.cost))
    assert _by(plain.tokens, "enduser.id") == {"": 2465}
    assert [lab["enduser.id"] for lab in _labels(per_user.requests)] == ["alice@example.com"]
    assert _by(per_user.tokens, "enduser.id") == {"alice@example.com": 2465}


def test_time_to_first_chunk_is_recorded_for_streams_only() -> None:
    """Only streamed answers have a first chunk; a non-streaming call records its duration alone."""
    metrics = GatewayMetrics(KINDS)
    metrics.row(row(request_id="s", operation="stream", ttfb_ms=250.0))
    metrics.row(row(request_id="i", operation="invoke", ttfb_ms=900.0))
    (series,) = metrics.first_chunk.snapshot()
    assert series[2:4] == (1, 0.25)
    assert sum(s[2] for s in metrics.duration.snapshot()) == 2


def test_failed_operations_carry_their_error_type() -> None:
    """An upstream error or client abort is an error.type on the duration; a complete call has none."""
    metrics = GatewayMetrics(KINDS)
    metrics.row(row(request_id="ok"))
    metrics.row(row(request_id="bad", outcome="upstream_error"))
    types = sorted(
        str(metrics.duration.instrument.labels(s[0]).get("error.type", ""))
        for s in metrics.duration.snapshot()
    )
    assert types == ["", "upstream_error"]


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("policy: model x is not allowed", "policy"),
        ("bad_model_id", "bad_model_id"),
        (None, "unknown"),
        ("x" * 500, "x" * 64),
    ],
)
def test_denial_reason_keeps_a_bounded_prefix(reason: str | None, expected: str) -> None:
    """Free text after the colon (model names, group names) never becomes a metric attribute."""
    assert denial_reason(reason) == expected


def test_histogram_buckets_are_upper_inclusive() -> None:
    """A value equal to a bound lands in that bound's bucket (OTLP explicit bounds), larger in the next."""
    histogram = Histogram(Instrument("h", "s", "", ()), (1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 9.0):
        histogram.record((), value)
    ((_, counts, count, total, low, high),) = histogram.snapshot()
    assert counts == [2, 2, 1]
    assert (count, total, low, high) == (5, 14.0, 0.5, 9.0)


def test_series_past_the_cardinality_limit_fold_into_one_overflow_series(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """New attribute sets past MAX_SERIES fold into one otel.metric.overflow series; known ones count on."""
    monkeypatch.setattr(aggregate, "MAX_SERIES", 3)
    total = Sum(Instrument("c", "1", "", ("model",)))
    for model in ("a", "b", "c", "d", "e", "a"):
        total.add((model,))
    values = {str(total.instrument.labels(k)): v for k, v in total.snapshot()}
    assert values == {
        "{'model': 'a'}": 2,
        "{'model': 'b'}": 1,
        "{'model': 'c'}": 1,
        "{'otel.metric.overflow': True}": 2,
    }


def test_an_unfinished_requests_access_log_report_is_not_counted_twice() -> None:
    """The access log's row for an allowed request that did not finish merges in the ledger with the
    exchange's cut row, which alone is counted; its rows for Envoy's own refusals count."""
    metrics = GatewayMetrics(KINDS)
    metrics.row(row(request_id="cut", outcome="client_aborted", recorded_by="ext_proc_cut"))
    metrics.row(row(request_id="cut", outcome="upstream_error", recorded_by="access_log", input_tokens=9999))
    metrics.row(
        denied(
            request_id="413", status=413, reason="envoy: request_payload_too_large", recorded_by="access_log"
        )
    )
    assert sum(v for _, v in metrics.requests.snapshot()) == 2
    assert _by(metrics.tokens, "gen_ai.token.type")["input"] == 120
    assert {str(lab.get("gateway.denial_reason", "")) for lab in _labels(metrics.requests)} == {"", "envoy"}
