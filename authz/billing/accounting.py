"""The one builder of usage rows, from the request identity and what was measured. Pure.

Every row, allowed or refused, complete or cut, comes from :func:`usage_row`, so who made a
request is copied from :class:`~authz.identity.RequestIdentity` in exactly one place.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

from authz.billing.pricing import PriceBook
from authz.identity import RequestIdentity
from authz.serviceid import service_identity
from authz.store.usagerow import UsageRow
from backends.usage import MeterResult, Usage

# Anthropic models average about four bytes of JSON request body per input token (text is about
# 3.5-4 characters per token; JSON framing adds a little). An estimate is used only when the
# upstream received a prompt but its usage report never came back; the row says so.
BYTES_PER_INPUT_TOKEN = 4
_NONE = Decimal(0)


def estimate_input_tokens(request_bytes: int) -> int:
    """A rough input-token count for a request body of ``request_bytes`` bytes."""
    return max(0, request_bytes) // BYTES_PER_INPUT_TOKEN


def usage_row(
    identity: RequestIdentity,
    *,
    status: int,
    outcome: str,
    reason: str | None,
    prices: PriceBook,
    ended_at: float,
    meter: MeterResult | None = None,
    first_byte_at: float | None = None,
    estimate_input: bool = False,
    recorded_by: str = "ext_proc",
    attempts: int | None = 0,
) -> UsageRow:
    """The row for one request, priced from the usage the meter counted.

    When a response was cut before its final usage arrived, output tokens fall back to the
    estimate from what was relayed; with ``estimate_input`` (the upstream received the prompt but
    reported nothing), input tokens fall back to the estimate from the request body size. Either
    way the row says the figure is estimated.
    """
    result = meter or MeterResult()
    usage = result.usage
    output, output_estimated = usage.output_tokens, False
    if not result.complete and result.estimated_output_tokens > output:
        output, output_estimated = result.estimated_output_tokens, True
    input_tokens, input_estimated = usage.input_tokens, False
    if estimate_input and usage.total_input_tokens == 0:
        input_tokens = estimate_input_tokens(identity.request_bytes)
        input_estimated = input_tokens > 0
    if (output, input_tokens) != (usage.output_tokens, usage.input_tokens):
        usage = replace(usage, output_tokens=output, input_tokens=input_tokens)
    caller, client = identity.caller, identity.client
    return UsageRow(
        request_id=identity.request_id,
        started_at=datetime.fromtimestamp(identity.started_at, tz=UTC),
        user_sub=caller.sub if caller else None,
        user_email=caller.email if caller else None,
        groups=caller.groups if caller else (),
        session_id=caller.session_id if caller else None,
        cc_session_id=client.cc_session_id,
        agent_id=client.agent_id,
        parent_agent_id=client.parent_agent_id,
        user_agent=client.user_agent,
        ingress_format=identity.client_format,
        operation=identity.operation,
        upstream=identity.upstream,
        policy=identity.policy,
        requested_model=identity.requested_model,
        upstream_model=identity.upstream_model,
        status=status,
        outcome=outcome,
        reason=reason,
        input_tokens=usage.input_tokens,
        input_tokens_estimated=input_estimated,
        output_tokens=usage.output_tokens,
        output_tokens_estimated=output_estimated,
        cache_write_tokens=usage.cache_creation_input_tokens,
        cache_write_5m_tokens=usage.cache_creation_5m_input_tokens,
        cache_write_1h_tokens=usage.cache_creation_1h_input_tokens,
        cache_read_tokens=usage.cache_read_input_tokens,
        # No model (count-tokens, listings) carries no tokens; any that do appear are priced at the
        # fallback rate rather than treated as free.
        cost_usd=_cost(prices, identity, usage),
        latency_ms=round((ended_at - identity.started_at) * 1000.0, 3),
        ttfb_ms=round((first_byte_at - identity.started_at) * 1000.0, 3) if first_byte_at else None,
        recorded_by=recorded_by,
        service_identity=service_identity(caller.sub, caller.session_id) if caller else None,
        reserved_usd=identity.reservation.usd if identity.reservation else _NONE,
        leases=identity.reservation.leases if identity.reservation else (),
        attempts=attempts,
    )


def _cost(prices: PriceBook, identity: RequestIdentity, usage: Usage) -> Decimal:
    return prices.cost_usd(identity.model or "unknown", usage, regional=identity.regional)
