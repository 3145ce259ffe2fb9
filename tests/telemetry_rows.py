"""Usage rows for the telemetry tests: a complete request and variations of it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from authz.store.usagerow import UsageRow

BASE = UsageRow(
    request_id="req-1",
    started_at=datetime(2026, 11, 2, 9, 30, tzinfo=UTC),
    user_sub="sub-alice",
    user_email="alice@example.com",
    groups=("developers",),
    session_id="sid-1",
    cc_session_id="cc-1",
    agent_id=None,
    parent_agent_id=None,
    user_agent="claude-cli/2.1.0 (external, cli)",
    ingress_format="bedrock",
    operation="stream",
    upstream="bedrock-dev",
    policy="developers",
    requested_model="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    upstream_model="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    status=200,
    outcome="complete",
    reason=None,
    input_tokens=120,
    input_tokens_estimated=False,
    output_tokens=45,
    output_tokens_estimated=False,
    cache_write_tokens=300,
    cache_write_5m_tokens=300,
    cache_write_1h_tokens=0,
    cache_read_tokens=2000,
    cost_usd=Decimal("0.00283500"),
    latency_ms=830.0,
    ttfb_ms=210.0,
)


def row(**changes: Any) -> UsageRow:
    """:data:`BASE` with ``changes``."""
    return replace(BASE, **changes)


def denied(**changes: Any) -> UsageRow:
    """A request refused by policy: no upstream, no tokens, no cost."""
    fields: dict[str, Any] = {
        "outcome": "denied",
        "status": 400,
        "reason": "policy: model claude-opus-4-1 is not allowed for your groups",
        "upstream": None,
        "upstream_model": None,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_write_tokens": 0,
        "cache_write_5m_tokens": 0,
        "cache_read_tokens": 0,
        "cost_usd": Decimal(0),
        "latency_ms": 0.0,
        "ttfb_ms": None,
    }
    return replace(BASE, **{**fields, **changes})
