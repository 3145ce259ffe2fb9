"""Aggregates over ``usage_events`` for people: ``authz usage --by``, and the admin page.

Every query takes a half-open period ``[since, until)`` on ``started_at`` (either end may be open)
and bound parameters only; the grouping expressions are fixed strings chosen from
:data:`GROUPINGS`, never built from input.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from authz.errors import StoreError
from authz.store.db import Connection, Pool

# The key each report groups by. A request with several groups counts once in each of them (and a
# request without groups under ""), so the group report's sums can exceed the total.
GROUPINGS: dict[str, str] = {
    "user": "COALESCE(u.user_email, u.user_sub, '')",
    "group": "g.name",
    "model": "COALESCE(u.requested_model, '')",
    "day": "to_char(u.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "agent-session": "COALESCE(u.cc_session_id, '')",
    "policy": "COALESCE(u.policy, '')",
}
_GROUPS_JOIN = (
    " CROSS JOIN LATERAL"
    " unnest(CASE WHEN cardinality(u.groups) = 0 THEN ARRAY[''] ELSE u.groups END) AS g(name)"
)
_PERIOD = "($1::timestamptz IS NULL OR u.started_at >= $1) AND ($2::timestamptz IS NULL OR u.started_at < $2)"


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """The sums of one group of usage rows."""

    key: str
    requests: int
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    cost_usd: Decimal
    denials: int


@dataclass(frozen=True, slots=True)
class Denials:
    """Refused requests with one reason (the reason's stable prefix, as in the metrics)."""

    reason: str
    requests: int


def _summary_sql(by: str, limit: bool) -> str:
    key = GROUPINGS[by]
    join = _GROUPS_JOIN if by == "group" else ""
    order = "1" if by == "day" else "cost_usd DESC, 1"
    # Fixed fragments only (GROUPINGS, _PERIOD); values are bound parameters.
    sql = (
        f"SELECT {key} AS key, count(*) AS requests,"  # noqa: S608 - see above
        " COALESCE(sum(u.input_tokens), 0)::bigint AS input_tokens,"
        " COALESCE(sum(u.output_tokens), 0)::bigint AS output_tokens,"
        " COALESCE(sum(u.cache_write_tokens), 0)::bigint AS cache_write_tokens,"
        " COALESCE(sum(u.cache_read_tokens), 0)::bigint AS cache_read_tokens,"
        " COALESCE(sum(u.cost_usd), 0) AS cost_usd,"
        " count(*) FILTER (WHERE u.outcome = 'denied') AS denials"
        f" FROM usage_events u{join} WHERE {_PERIOD} GROUP BY 1 ORDER BY {order}"
    )
    return sql + (" LIMIT $3" if limit else "")


async def usage_summary(
    db: Pool | Connection,
    by: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[UsageSummary]:
    """Requests, tokens by type, cost and denials per ``by`` key (see :data:`GROUPINGS`) in the
    period; by cost, highest first (days in order), at most ``limit`` groups."""
    if by not in GROUPINGS:
        raise ValueError(f"cannot group usage by {by!r} (one of: {', '.join(GROUPINGS)})")
    args: list[Any] = [since, until] + ([limit] if limit is not None else [])
    records = await _fetch(db, _summary_sql(by, limit is not None), *args)
    return [
        UsageSummary(
            key=r["key"],
            requests=r["requests"],
            input_tokens=r["input_tokens"],
            output_tokens=r["output_tokens"],
            cache_write_tokens=r["cache_write_tokens"],
            cache_read_tokens=r["cache_read_tokens"],
            cost_usd=r["cost_usd"],
            denials=r["denials"],
        )
        for r in records
    ]


async def denial_reasons(
    db: Pool | Connection, *, since: datetime | None = None, until: datetime | None = None, limit: int = 10
) -> list[Denials]:
    """The most frequent refusal reasons in the period (``policy: ...`` counted as ``policy``)."""
    # Fixed fragments only; values are bound parameters.
    sql = (
        "SELECT COALESCE(NULLIF(trim(split_part(u.reason, ':', 1)), ''), 'unknown') AS reason,"  # noqa: S608
        " count(*) AS n FROM usage_events u"
        f" WHERE u.outcome = 'denied' AND {_PERIOD} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $3"
    )
    records = await _fetch(
        db,
        sql,
        since,
        until,
        limit,
    )
    return [Denials(r["reason"], r["n"]) for r in records]


async def _fetch(db: Pool | Connection, sql: str, *args: Any) -> list[Any]:
    try:
        return list(await db.fetch(sql, *args))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"cannot read usage_events: {exc}") from exc
