"""The benchmark's plain Envoys and gateway config, run for real but briefly (`make bench` runs it all)."""

from __future__ import annotations

import asyncio
import http.client
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from authz.config import load
from authz.envoy.binary import envoy_binary
from authz.store.db import connect
from authz.store.queries import insert_rows
from authz.store.usagerow import UsageRow
from tests.bench import SLOW_GROUP, make_stack
from tests.bench_arms import SCENARIOS, VARIANTS, Scenario, request_bytes, request_headers, request_path
from tests.bench_ledger import Job, check_ledger
from tests.bench_load import run_job
from tests.bench_report import ledger_checks
from tests.bench_upstream import (
    CANNED_USAGE,
    canned_bootstrap,
    envoy_alone_bootstrap,
    start_canned_upstream,
    start_envoy_alone,
    upstream_operations,
)

pytestmark = pytest.mark.integration

ANSWERS = {a.key: a for a in upstream_operations()}


def test_both_bootstraps_validate(tmp_path: Path) -> None:
    """envoy --mode validate accepts the canned upstream (large direct responses) and Envoy alone."""
    for name, bootstrap in (
        ("canned", canned_bootstrap(10001, 10002)),
        ("alone", envoy_alone_bootstrap(10003, 10004, 10001)),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bootstrap), encoding="utf-8")
        result = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def envoys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """The canned upstream and Envoy alone in front of it: (canned port, Envoy alone port)."""
    root = tmp_path_factory.mktemp("bench-envoys")
    canned, canned_port = start_canned_upstream(root, concurrency=1)
    try:
        alone, alone_port = start_envoy_alone(root, canned_port)
        try:
            yield canned_port, alone_port
        finally:
            alone.stop()
    finally:
        canned.stop()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.key)
def test_every_scenario_gets_its_canned_bytes_through_envoy_alone(
    envoys: tuple[int, int], scenario: Scenario
) -> None:
    """Each scenario's request through Envoy alone gets its canned answer, bytes and content type."""
    _, port = envoys
    answer = ANSWERS[scenario.upstream_op]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = request_headers(scenario, token="t", session="s")
        conn.request("POST", request_path(scenario, baseline=True), body=scenario.body(), headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("content-type") == answer.content_type
    assert body == answer.body


def test_unknown_path_is_a_404_from_the_canned_upstream(envoys: tuple[int, int]) -> None:
    """A path no canned answer serves is a 404, so a misrouted arm shows up as errors, not as speed."""
    canned_port, _ = envoys
    conn = http.client.HTTPConnection("127.0.0.1", canned_port, timeout=30)
    try:
        conn.request("POST", "/model/m/converse", body=b"{}")
        assert conn.getresponse().status == 404
    finally:
        conn.close()


async def test_load_generator_counts_answers_and_wrong_lengths(envoys: tuple[int, int]) -> None:
    """The load generator reads keep-alive answers in a loop; a body of the wrong length is an error."""
    _, port = envoys
    scenario = next(s for s in SCENARIOS if s.key == "bedrock_stream_60k")
    request = request_bytes(scenario, host="x", token="t", session="s", body=scenario.body(), baseline=True)
    size = len(ANSWERS[scenario.upstream_op].body)
    good = await run_job(
        "127.0.0.1", port, [request], concurrency=2, warmup=0, seconds=30, per_worker=3, expect_bytes=[size]
    )
    assert (good["sent"], good["ok"], good["errors"], good["reconnects"]) == (6, 6, 0, 0)
    assert good["body_bytes"] == 6 * size
    bad = await run_job(
        "127.0.0.1",
        port,
        [request],
        concurrency=1,
        warmup=0,
        seconds=30,
        per_worker=2,
        expect_bytes=[size - 1],
    )
    assert (bad["ok"], bad["errors"]) == (0, 2)
    assert bad["error_samples"][0] == f"body of {size} bytes, expected {size - 1}"


def test_bench_stack_config_points_at_the_canned_upstream(tmp_path: Path) -> None:
    """The bench's config overlay loads: the usual upstreams on the canned one, the slow group first."""
    canned_url = "http://127.0.0.1:1"
    stack = make_stack(tmp_path, "postgresql://bench@localhost/none", VARIANTS["gateway"], 1, canned_url)
    assert stack.ports is not None
    stack.root.mkdir(parents=True)
    config = load(stack.write_config(), os.environ)
    upstreams = dict(config.upstreams)
    assert upstreams["bedrock-dev"].settings.base_url == canned_url
    assert upstreams["vertex-dev"].settings.base_url == canned_url
    assert upstreams["bedrock-emulator"].settings.base_url == stack.emulator_url
    assert upstreams["vertex-emulator"].settings.base_url == stack.emulator_url
    assert config.policies[0].groups == (SLOW_GROUP,)
    assert config.policies[1].upstreams == ("bedrock-dev", "vertex-dev")


def _row(i: int, session: str, **changes: object) -> UsageRow:
    u = CANNED_USAGE
    row = UsageRow(
        request_id=f"bench-{i}",
        started_at=datetime(2026, 1, 2, tzinfo=UTC),
        user_sub="bench",
        user_email="bench@example.com",
        groups=("developers",),
        session_id="s",
        cc_session_id=session,
        agent_id=None,
        parent_agent_id=None,
        user_agent="claude-cli/2.0.0 (external, cli)",
        ingress_format="bedrock",
        operation="invoke",
        upstream="bedrock-dev",
        policy=None,
        requested_model="m",
        upstream_model="m",
        status=200,
        outcome="complete",
        reason=None,
        input_tokens=u.input_tokens,
        input_tokens_estimated=False,
        output_tokens=u.output_tokens,
        output_tokens_estimated=False,
        cache_write_tokens=u.cache_creation_input_tokens,
        cache_write_5m_tokens=u.cache_creation_5m_input_tokens,
        cache_write_1h_tokens=u.cache_creation_1h_input_tokens,
        cache_read_tokens=u.cache_read_input_tokens,
        cost_usd=Decimal("0.01"),
        latency_ms=1.0,
        ttfb_ms=None,
    )
    return replace(row, **changes)  # type: ignore[arg-type]


async def test_ledger_check_reports_missing_inexact_and_stray_rows(clean_db: str) -> None:
    """Rows are counted per arm by session id; a missing, an inexact and a stray row all show."""
    rows = [
        _row(1, "a0"),
        _row(2, "a1"),  # bedrock_invoke: sanity and one round, 2 rows for 2 requests, both exact
        _row(3, "b", output_tokens=986),  # vertex_raw: 1 row for 2 requests, not exact
        _row(4, "elsewhere"),  # a row no job sent
    ]
    conn = await connect(clean_db, timeout=10)
    try:
        await insert_rows(conn, rows)
    finally:
        await conn.close()
    jobs = [
        Job("sanity", "bedrock_invoke", "gateway", "a0", sent=1),
        Job("rounds", "bedrock_invoke", "gateway", "a1", sent=1),
        Job("rounds", "vertex_raw", "gateway", "b", sent=2),
    ]
    # check_ledger runs its own event loop: give it a thread.
    found = await asyncio.to_thread(check_ledger, clean_db, "bench@example.com", jobs, patience=0.5)
    by_arm = {e["scenario"]: e for e in found["arms"]}
    assert (by_arm["bedrock_invoke"]["sent"], by_arm["bedrock_invoke"]["exact"]) == (2, 2)
    assert (by_arm["vertex_raw"]["sent"], by_arm["vertex_raw"]["rows"], by_arm["vertex_raw"]["exact"]) == (
        2,
        1,
        0,
    )
    assert "output_tokens=986" in by_arm["vertex_raw"]["sample_mismatch"]
    assert found["stray_rows"] == 1
    met = {c.scenario: c.met for c in ledger_checks(found)}
    assert met == {"bedrock_invoke": True, "vertex_raw": False, "-": False}
