"""Telemetry through the real stack: a gateway with metrics (OTLP and Prometheus) and traces on,
behind the real Envoy, scraped by a real Prometheus and exporting to a real OTLP/HTTP receiver.

The stack writes to a database of its own, so "the usage rows" are exactly the rows of the
requests sent here, and the metrics' totals can be compared with them to the token and the cent.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from anthropic import AnthropicBedrock, AnthropicVertex, BadRequestError

from authz.dev.devstack import Ports, Stack
from authz.dev.ports import free_port
from tests.e2e.conftest import fetch_rows, shared_stack_config, wait_for
from tests.otlp_receiver import OtlpReceiver
from tests.prometheus_fixture import PrometheusServer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
USER = "telemetry@example.com"
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
HAIKU_VERTEX = "claude-haiku-4-5@20251001"
# What Grafana substitutes in the dashboards' queries, for an instant query over the test's data.
GRAFANA_VARIABLES = {"$__rate_interval": "10m", "$__range": "1h", "$__interval": "15s", "$policy": ".*"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
DENIED_TRACE_ID = "5b8efff798038103d269b633813fc60c"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Traffic:
    """What the module's requests were."""

    token_sid: str
    traced_request_id: str
    rows: list[dict[str, Any]]
    anonymous_refusals: int


def _create_database(dsn: str) -> str:
    name = f"telemetry_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def tstack(pg_dsn: str, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with every telemetry switch on, on a database of its own."""
    s = Stack(root=tmp_path_factory.mktemp("telemetry"), database_url=_create_database(pg_dsn))
    s.ports = Ports.pick(s.workers)
    s.extra_config = {
        **shared_stack_config(s.emulator_url),
        "telemetry": {
            "otlp": {"endpoint": receiver.url, "interval": 1},
            "prometheus": {"enabled": True, "port": free_port()},
            "traces": {"sample_ratio": 1.0},
            "per_user_attributes": True,
        },
    }
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def prometheus(tstack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    assert tstack.config is not None
    server = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{tstack.config.telemetry.prometheus.port}"]
    )
    try:
        wait_for(lambda: server.query('up{job="claude-gateway"} == 1'), timeout=30)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def traffic(tstack: Stack, prometheus: PrometheusServer) -> Traffic:
    """Allowed requests in both formats (streamed and not, one carrying a client traceparent), a
    policy refusal, an anonymous refusal, and a batch of Claude Code's own telemetry."""
    sid = f"sid-{secrets.token_hex(4)}"
    token = tstack.mint(email=USER, sid=sid)
    _requests(tstack, token, traced=False)
    # The counters and histograms now exist in Prometheus; a second round makes their rates (over
    # the dashboards' windows) positive as well.
    first_chunks = "sum(gen_ai_client_operation_time_to_first_chunk_seconds_count)"
    wait_for(lambda: prometheus.value(first_chunks), timeout=30)
    traced = _requests(tstack, token, traced=True)
    anonymous = httpx.post(
        f"{tstack.envoy_url}/model/{SONNET}/invoke", headers={"authorization": "Bearer nope"}, json={}
    )
    assert anonymous.status_code == 401
    logs = {
        "resourceLogs": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "claude-code"}}]
                },
                "scopeLogs": [{"logRecords": [{"body": {"stringValue": "claude_code.api_request"}}]}],
            }
        ]
    }
    relayed = httpx.post(
        f"{tstack.envoy_url}/v1/logs",
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        content=json.dumps(logs),
    )
    assert relayed.status_code == 200

    def all_rows() -> list[dict[str, Any]] | None:
        rows = fetch_rows(tstack.database_url)
        return rows if len(rows) == 10 else None

    rows = wait_for(all_rows, timeout=20)
    return Traffic(sid, traced, rows, anonymous_refusals=1)


def _requests(tstack: Stack, token: str, *, traced: bool) -> str:
    """One round of requests as Claude Code sends them (with ``traced``, the first and the refused
    one carry a client traceparent); the request id of the first."""
    body: dict[str, Any] = {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"} if traced else {}
    denied_headers = {"traceparent": f"00-{DENIED_TRACE_ID}-{CLIENT_SPAN}-01"} if traced else {}
    bedrock_client = AnthropicBedrock(
        api_key=token, base_url=tstack.envoy_url, aws_region="us-east-1", max_retries=0
    )
    with bedrock_client as bedrock:
        first = bedrock.messages.with_raw_response.create(model=SONNET, **body, extra_headers=headers)
        with bedrock.messages.stream(model=SONNET, **body) as stream:
            stream.until_done()
        with pytest.raises(BadRequestError):
            bedrock.messages.create(
                model="us.anthropic.claude-opus-4-1-20250805-v1:0", **body, extra_headers=denied_headers
            )
    vertex_client = AnthropicVertex(
        access_token=token,
        base_url=f"{tstack.envoy_url}/v1",
        project_id="p",
        region="us-east5",
        max_retries=0,
    )
    with vertex_client as vertex:
        vertex.messages.create(model=HAIKU_VERTEX, **body)
        with vertex.messages.stream(model=HAIKU_VERTEX, **body) as stream:
            stream.until_done()
    request_id: str = first.headers["x-request-id"]
    return request_id


def _column(rows: list[dict[str, Any]], name: str) -> float:
    return float(sum(r[name] for r in rows))


def test_prometheus_totals_equal_the_usage_rows(traffic: Traffic, prometheus: PrometheusServer) -> None:
    """Tokens by type, cost and requests scraped by Prometheus equal the rows' sums."""
    rows = traffic.rows
    expected = {
        "input": _column(rows, "input_tokens"),
        "output": _column(rows, "output_tokens"),
        "cache_creation": _column(rows, "cache_write_tokens"),
        "cache_read": _column(rows, "cache_read_tokens"),
    }
    assert all(expected.values())

    def scraped() -> dict[str, float | None]:
        return {
            kind: prometheus.value(f'sum(gen_ai_client_token_usage_sum{{gen_ai_token_type="{kind}"}})')
            for kind in expected
        }

    wait_for(lambda: scraped() == expected, timeout=30)
    cost = sum((r["cost_usd"] for r in rows), Decimal(0))
    assert prometheus.value("sum(gateway_cost_USD_total)") == pytest.approx(float(cost), abs=1e-9)
    assert prometheus.value("sum(gateway_requests_total)") == len(rows) + traffic.anonymous_refusals
    denied = [r for r in rows if r["outcome"] == "denied"]
    assert prometheus.value('sum(gateway_requests_total{gateway_outcome="denied",enduser_id!=""})') == len(
        denied
    )
    assert prometheus.value(f'sum(gateway_cost_USD_total{{enduser_id="{USER}"}})') == pytest.approx(
        float(cost)
    )
    # One handling time per Check, and one per request that reached ext_proc (all its messages
    # together, recorded as its stream closes).
    checks = "sum(gateway_ext_authz_duration_seconds_count)"
    wait_for(lambda: prometheus.value(checks) == len(rows) + traffic.anonymous_refusals, timeout=30)
    exchanges = 'sum(gateway_ext_proc_duration_seconds_count{gateway_ext_proc_stream="request"})'
    wait_for(lambda: prometheus.value(exchanges) == len(rows) - len(denied), timeout=30)


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.stem)
def test_every_dashboard_query_returns_data(
    traffic: Traffic, prometheus: PrometheusServer, dashboard: Path
) -> None:
    """Each PromQL expression in the shipped Grafana dashboards is valid and returns data for this traffic."""
    panels = json.loads(dashboard.read_text())["panels"]
    exprs = [(p["title"], t["expr"]) for p in panels for t in p["targets"]]
    assert exprs
    pattern = re.compile("|".join(re.escape(k) for k in sorted(GRAFANA_VARIABLES, key=len, reverse=True)))

    def empty() -> list[str]:
        missing = []
        for title, expr in exprs:
            query = pattern.sub(lambda m: GRAFANA_VARIABLES[m.group(0)], expr)
            result = prometheus.query(query)
            if not result or all(v["value"][1] == "NaN" for v in result):
                missing.append(f"{title}: {query}")
        return missing

    # The rate() panels need two scrapes after the traffic; poll rather than guess how long that takes.
    deadline = time.monotonic() + 30
    missing = empty()
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = empty()
    assert missing == [], "\n".join(missing)


def test_otlp_metrics_equal_the_usage_rows(traffic: Traffic, receiver: OtlpReceiver) -> None:
    """The OTLP exporter's latest cumulative export holds the same token, cost and request totals."""
    rows = traffic.rows

    def tokens(kind: str) -> float:
        return receiver.metric_sum("gen_ai.client.token.usage", lambda a: a.get("gen_ai.token.type") == kind)

    wait_for(lambda: tokens("output") == _column(rows, "output_tokens"), timeout=20)
    assert tokens("input") == _column(rows, "input_tokens")
    assert tokens("cache_creation") == _column(rows, "cache_write_tokens")
    assert tokens("cache_read") == _column(rows, "cache_read_tokens")
    assert receiver.metric_sum("gateway.cost") == pytest.approx(float(sum(r["cost_usd"] for r in rows)))
    assert receiver.metric_sum("gateway.requests") == len(rows) + traffic.anonymous_refusals


def _trace(receiver: OtlpReceiver, trace_id: str, names: set[str]) -> list[Any]:
    spans = [s for s in receiver.spans() if s.trace_id == trace_id]
    return spans if names <= {s.name for s in spans} else []


def test_a_span_tree_continues_the_clients_trace(traffic: Traffic, receiver: OtlpReceiver) -> None:
    """Envoy's ingress span is the client span's child, its ext_authz and ext_proc calls are the
    ingress span's, and the ext_proc span of the services, child of Envoy's call, says who, which
    model, the tokens and the outcome."""
    names = {"ingress", "ext_proc Process"}
    spans = wait_for(lambda: _trace(receiver, TRACE_ID, names), timeout=30)  # Envoy flushes every 5 s
    by_id = {s.span_id: s for s in spans}
    (ingress,) = [s for s in spans if s.name == "ingress"]
    assert ingress.parent_span_id == CLIENT_SPAN
    assert ingress.service == "claude-gateway-envoy"
    egress = {s.name for s in spans if s.parent_span_id == ingress.span_id}
    assert any("Authorization.Check" in name for name in egress), egress
    (process,) = [s for s in spans if s.name == "ext_proc Process"]
    parent = by_id[process.parent_span_id]
    assert "ExternalProcessor.Process" in parent.name and parent.parent_span_id == ingress.span_id
    assert process.service == "claude-gateway"
    (row,) = [r for r in traffic.rows if r["request_id"] == traffic.traced_request_id]
    attributes = process.attributes
    assert attributes["gateway.request_id"] == row["request_id"]
    assert attributes["enduser.id"] == USER
    assert attributes["gen_ai.request.model"] == SONNET
    assert attributes["gen_ai.usage.input_tokens"] == row["input_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == row["output_tokens"]
    assert attributes["gateway.outcome"] == row["outcome"] == "complete"


def test_a_refused_requests_trace_ends_in_the_ext_authz_span(
    traffic: Traffic, receiver: OtlpReceiver
) -> None:
    """A request refused by policy never reaches ext_proc: its ext_authz span, child of Envoy's
    Check call, carries the refusal."""
    spans = wait_for(lambda: _trace(receiver, DENIED_TRACE_ID, {"ingress", "ext_authz Check"}), timeout=30)
    by_id = {s.span_id: s for s in spans}
    (check,) = [s for s in spans if s.name == "ext_authz Check"]
    assert "Authorization.Check" in by_id[check.parent_span_id].name
    assert check.attributes["gateway.outcome"] == "denied"
    assert check.attributes["gateway.decision"] == "deny"
    assert check.attributes["enduser.id"] == USER
    assert check.attributes["gateway.reason"].startswith("policy:")
    assert "ext_proc Process" not in {s.name for s in spans}


def test_relayed_client_telemetry_carries_the_gateway_user(traffic: Traffic, receiver: OtlpReceiver) -> None:
    """Claude Code's log batch reached the collector through Envoy and the portal, stamped with its user."""
    resources = wait_for(lambda: receiver.resources("/v1/logs"), timeout=20)
    (resource,) = resources
    assert resource["service.name"] == "claude-code"
    assert resource["enduser.id"] == USER
    assert resource["gateway.session.id"] == traffic.token_sid
    assert resource["gateway.user.groups"] == ["developers"]
