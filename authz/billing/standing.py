"""Where a capped caller stands, in the forms Claude Code reads: the ``anthropic-ratelimit-unified-*``
response headers, the refusal's message, and the ``GET /api/oauth/usage`` document. Pure.

The headers follow DESIGN.md ("Claude Code's gateway protocol", spend caps). On a successful
response: ``-status`` (``allowed``, or ``allowed_warning`` past 75%), ``-representative-claim:
overage``, ``-overage-status``, ``-overage-utilization`` (two decimals, below 1),
``-overage-surpassed-threshold`` (0.75 or 0.95 once passed), ``-reset`` and ``-overage-reset`` (Unix
seconds). On the 429: ``-status: rejected``, the resets, ``-overage-utilization: 1``,
``-overage-surpassed-threshold: 1``, ``-overage-period``, ``-overage-disabled-reason`` and, when a
budget a group shares ran out, ``-overage-scope: group_pool``; no ``-representative-claim`` and no
``-overage-status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

from authz.billing.caps import Cap, dollars
from authz.configtypes import Period

PREFIX = "anthropic-ratelimit-unified-"
WARN_AT = Decimal("0.75")
CRITICAL_AT = Decimal("0.95")
_HUNDREDTH = Decimal("0.01")
_BELOW_ONE = Decimal("0.99")
# Why the overage a 429 names is unavailable: the cap was spent, or the gateway could not read it.
OUT_OF_CREDITS = "out_of_credits"
FETCH_ERROR = "fetch_error"


@dataclass(frozen=True, slots=True)
class Standing:
    """One cap and the spend against it: ``spent`` settled so far in the period ending ``reset``."""

    cap: Cap
    spent: Decimal
    reset: datetime

    @property
    def utilization(self) -> Decimal:
        """Spent over cap (1 for a zero cap); may exceed 1."""
        if self.cap.usd <= 0:
            return Decimal(1)
        return self.spent / self.cap.usd

    @property
    def remaining(self) -> Decimal:
        """What is left of the cap, never negative."""
        return max(Decimal(0), self.cap.usd - self.spent)


def representative(standings: Sequence[Standing]) -> Standing:
    """The cap a caller is closest to: the highest utilization, then the latest reset."""
    return max(standings, key=lambda s: (s.utilization, s.reset))


def _unix(at: datetime) -> str:
    return str(int(at.timestamp()))


def two_decimals(value: Decimal) -> str:
    """``value`` rounded down to hundredths (0.749 shows as 0.74: never a threshold not passed)."""
    return str(value.quantize(_HUNDREDTH, rounding=ROUND_DOWN))


def surpassed(utilization: Decimal) -> Decimal | None:
    """The highest warning threshold ``utilization`` has reached, or None."""
    if utilization >= CRITICAL_AT:
        return CRITICAL_AT
    if utilization >= WARN_AT:
        return WARN_AT
    return None


def standing_headers(standings: Sequence[Standing]) -> tuple[tuple[str, str], ...]:
    """The headers of a successful response for a caller with these caps (none without caps)."""
    if not standings:
        return ()
    top = representative(standings)
    utilization = min(top.utilization, _BELOW_ONE)
    threshold = surpassed(utilization)
    status = "allowed" if threshold is None else "allowed_warning"
    reset = _unix(top.reset)
    headers = [
        (f"{PREFIX}status", status),
        (f"{PREFIX}reset", reset),
        (f"{PREFIX}representative-claim", "overage"),
        (f"{PREFIX}overage-status", status),
        (f"{PREFIX}overage-utilization", two_decimals(utilization)),
    ]
    if threshold is not None:
        headers.append((f"{PREFIX}overage-surpassed-threshold", str(threshold)))
    headers.append((f"{PREFIX}overage-reset", reset))
    return tuple(headers)


def refusal_headers(
    cap: Cap, reset: datetime, *, reason: str = OUT_OF_CREDITS
) -> tuple[tuple[str, str], ...]:
    """The unified headers of a 429 for ``cap`` (``reason``: out_of_credits, or fetch_error when the
    spend could not be read; utilization and threshold are then unknown and left out)."""
    headers = [(f"{PREFIX}status", "rejected"), (f"{PREFIX}reset", _unix(reset))]
    if reason == OUT_OF_CREDITS:
        headers += [(f"{PREFIX}overage-utilization", "1"), (f"{PREFIX}overage-surpassed-threshold", "1")]
    headers += [
        (f"{PREFIX}overage-reset", _unix(reset)),
        (f"{PREFIX}overage-period", cap.period),
        (f"{PREFIX}overage-disabled-reason", reason),
    ]
    if cap.scope == "group_pool":
        headers.append((f"{PREFIX}overage-scope", "group_pool"))
    return tuple(headers)


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe_cap(cap: Cap) -> str:
    """Whose cap it is, as a refusal's message names it: ``the eng group's shared monthly budget``,
    ``the organisation's daily spend cap`` or ``your weekly spend cap``."""
    if cap.scope == "group_pool":
        return f"the {cap.name} group's shared {cap.period} budget"
    if cap.scope == "org":
        return f"the organisation's {cap.period} spend cap"
    return f"your {cap.period} spend cap"


def _whose(cap: Cap) -> str:
    described = describe_cap(cap)
    return f"{described[0].upper()}{described[1:]} of ${dollars(cap.usd)}"


def refusal_message(cap: Cap, reset: datetime, increase_url: str | None) -> str:
    """What a caller over ``cap`` reads: whose cap, when it resets, and what to do."""
    ask = f"ask for more at {increase_url}" if increase_url else "ask your gateway administrator to raise it"
    return f"{_whose(cap)} is used up. It resets at {_when(reset)}; to continue sooner, {ask}."


def fetch_error_message() -> str:
    """What a capped caller reads when the gateway cannot read its spend (fail closed)."""
    return (
        "The gateway cannot check your spend cap right now (its spend store is unreachable), so it "
        "refuses billable requests until it can. Retry in a minute; if it persists, tell your "
        "gateway administrator."
    )


# --- GET /api/oauth/usage -------------------------------------------------------------------------


def cents(usd: Decimal) -> int:
    """Dollars as whole cents, rounded half up (what the usage document reports)."""
    return int((usd * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def iso(at: datetime) -> str:
    """An instant as ISO 8601 in UTC to the second, ``2026-01-05T00:00:00Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _percent(utilization: Decimal) -> int:
    return int((utilization * 100).to_integral_value(rounding=ROUND_DOWN))


def _severity(utilization: Decimal) -> str:
    if utilization >= 1:
        return "exceeded"
    if utilization >= CRITICAL_AT:
        return "critical"
    if utilization >= WARN_AT:
        return "warning"
    return "normal"


def _scope(cap: Cap) -> dict[str, str]:
    if cap.scope == "group_pool":
        return {"type": "group_pool", "group": cap.name}
    if cap.scope == "org":
        return {"type": "organization"}
    return {"type": "user"}


def usage_document(
    standings: Sequence[Standing],
    own: dict[Period, tuple[Decimal, datetime]],
    *,
    fetch_error: bool = False,
) -> dict[str, Any]:
    """The ``GET /api/oauth/usage`` answer for a caller: ``extra_usage`` (dollars in cents: the
    caller's own spend this month, and each period of their own caps) and one ``limits`` row per
    cap that applies (``percent``, ``period`` and ``resets_at``, equal to the ``-reset`` header of
    the same cap). ``own`` is the caller's spend and reset per period; ``fetch_error`` says the spend
    could not be read (the figures are then absent)."""
    active = representative(standings) if standings else None
    own_caps = {s.cap.period: s for s in standings if s.cap.scope == "user"}

    def period_view(period: Period) -> dict[str, Any] | None:
        standing = own_caps.get(period)
        if standing is None or fetch_error:
            return None
        return {
            "limit": cents(standing.cap.usd),
            "used_credits": cents(standing.spent),
            "utilization": _percent(standing.utilization),
            "resets_at": iso(standing.reset),
        }

    monthly = own_caps.get("monthly")
    spent_month = own["monthly"][0] if "monthly" in own else Decimal(0)
    reached = any(s.utilization >= 1 for s in standings)
    extra: dict[str, Any] = {
        "is_enabled": bool(standings),
        "monthly_limit": cents(monthly.cap.usd) if monthly is not None else None,
        "used_credits": None if fetch_error else cents(spent_month),
        "utilization": _percent(monthly.utilization) if monthly is not None and not fetch_error else None,
        "currency": "USD",
        "disabled_reason": FETCH_ERROR if fetch_error else (OUT_OF_CREDITS if reached else None),
        "spend_limit_reached": reached and not fetch_error,
        "daily": period_view("daily"),
        "weekly": period_view("weekly"),
    }
    limits = [
        {
            "kind": "spend_cap",
            "group": s.cap.period,
            "period": s.cap.period,
            "scope": _scope(s.cap),
            "percent": None if fetch_error else _percent(s.utilization),
            "used_credits": None if fetch_error else cents(s.spent),
            "limit": cents(s.cap.usd),
            "severity": "unknown" if fetch_error else _severity(s.utilization),
            "resets_at": iso(s.reset),
            "is_active": s is active,
        }
        for s in standings
    ]
    return {"five_hour": None, "seven_day": None, "extra_usage": extra, "limits": limits}
