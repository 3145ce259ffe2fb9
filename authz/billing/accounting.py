"""Build usage rows from what ext_authz and ext_proc learned. Pure functions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from authz.billing.usagerow import UsageRow
from authz.gateway.context import RequestContext
from authz.serviceid import service_identity
from backends.usage import MeterResult

if TYPE_CHECKING:
    from authz.billing.pricing import PriceBook


class AskedFor(Protocol):
    """The request as ext_authz saw it (``CheckInput`` satisfies this)."""

    @property
    def request_id(self) -> str: ...
    @property
    def now(self) -> float: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


class RouteAsked(Protocol):
    """The inference route the request named (``InferenceRoute`` satisfies this)."""

    @property
    def format(self) -> str: ...
    @property
    def operation(self) -> str: ...
    @property
    def model_raw(self) -> str | None: ...


class Caller(Protocol):
    """Who asked, from a verified token (``Claims`` satisfies this)."""

    @property
    def sub(self) -> str: ...
    @property
    def email(self) -> str: ...
    @property
    def groups(self) -> tuple[str, ...]: ...
    @property
    def sid(self) -> str | None: ...


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def denied_row(
    req: AskedFor,
    route: RouteAsked | None,
    claims: Caller | None,
    status: int,
    reason: str,
) -> UsageRow:
    """The row for a request ext_authz refused: who (when known), what, and why."""
    h = req.headers
    return UsageRow(
        request_id=req.request_id,
        started_at=_utc(req.now),
        user_sub=claims.sub if claims else None,
        user_email=claims.email if claims else None,
        groups=claims.groups if claims else (),
        session_id=claims.sid if claims else None,
        cc_session_id=h.get("x-claude-code-session-id"),
        agent_id=h.get("x-claude-code-agent-id"),
        parent_agent_id=h.get("x-claude-code-parent-agent-id"),
        user_agent=h.get("user-agent"),
        ingress_format=route.format if route else "unknown",
        operation=route.operation if route else "unknown",
        upstream=None,
        requested_model=route.model_raw if route else None,
        upstream_model=None,
        status=status,
        outcome="denied",
        reason=reason,
        input_tokens=0,
        output_tokens=0,
        output_tokens_estimated=False,
        cache_write_tokens=0,
        cache_write_5m_tokens=0,
        cache_write_1h_tokens=0,
        cache_read_tokens=0,
        cost_usd=Decimal(0),
        latency_ms=0.0,
        ttfb_ms=None,
        service_identity=service_identity(claims.sub, claims.sid) if claims else None,
    )


def finished_row(
    ctx: RequestContext,
    *,
    status: int,
    outcome: str,
    reason: str | None,
    meter: MeterResult | None,
    prices: PriceBook,
    upstream_model: str | None,
    ended_at: float,
    first_byte_at: float | None,
) -> UsageRow:
    """The row for a request that reached ext_proc, priced from the usage the meter counted.

    When a stream was cut before its final usage arrived, output tokens fall back to the estimate
    from what was relayed (and the row says the figure is estimated).
    """
    result = meter or MeterResult()
    usage = result.usage
    output = usage.output_tokens
    estimated = False
    if not result.complete and result.estimated_output_tokens > output:
        output = result.estimated_output_tokens
        estimated = True
    priced_usage = usage if output == usage.output_tokens else replace(usage, output_tokens=output)
    # No model (count-tokens, inference profiles) carries no tokens; any that do appear are priced
    # at the fallback rate rather than treated as free.
    cost = prices.cost_usd(ctx.model or "unknown", priced_usage, regional=ctx.regional)
    return UsageRow(
        request_id=ctx.request_id,
        started_at=_utc(ctx.started_at),
        user_sub=ctx.sub,
        user_email=ctx.email,
        groups=ctx.groups,
        session_id=ctx.session_id,
        cc_session_id=ctx.cc_session_id,
        agent_id=ctx.agent_id,
        parent_agent_id=ctx.parent_agent_id,
        user_agent=ctx.user_agent,
        ingress_format=ctx.ingress_format,
        operation=ctx.operation,
        upstream=ctx.upstream,
        requested_model=ctx.model_raw,
        upstream_model=upstream_model,
        status=status,
        outcome=outcome,
        reason=reason,
        input_tokens=usage.input_tokens,
        output_tokens=output,
        output_tokens_estimated=estimated,
        cache_write_tokens=usage.cache_creation_input_tokens,
        cache_write_5m_tokens=usage.cache_creation_5m_input_tokens,
        cache_write_1h_tokens=usage.cache_creation_1h_input_tokens,
        cache_read_tokens=usage.cache_read_input_tokens,
        cost_usd=cost,
        latency_ms=round((ended_at - ctx.started_at) * 1000.0, 3),
        ttfb_ms=round((first_byte_at - ctx.started_at) * 1000.0, 3) if first_byte_at else None,
        service_identity=service_identity(ctx.sub, ctx.session_id),
    )
