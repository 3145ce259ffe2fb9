"""SQL behind spend caps and rate limits: the caps set at run time, the spend counters, the workers'
leases, the per-minute rate counters, and settlement inside the ledger's insert.

Tables (migration ``0009_spend``):

* ``spend_limits``: caps set with ``authz spend-limits`` (changes audited in ``audit_events``).
* ``spend_counters``: settled spend per (scope, name, period, period start). The ledger adds each
  row's cost in the transaction that inserts the row (:func:`settle`), for the user, the
  organisation and every group in ``spend_groups`` (groups with a shared budget), so a counter is
  always the sum of its rows.
* ``spend_leases``: budget a worker holds to admit requests locally. A lease's ``amount`` is the
  worker's unused slice plus the estimates of the requests it admitted whose rows are not written
  yet; settlement takes each row's estimate back off the leases that reserved it. A lease counts
  until ``expires_at`` (renewed by its holder), so a dead worker's budget comes back by itself.
* ``rate_counters``: requests (pushed by the workers) and tokens (added by settlement) per user
  and minute.

Lock order, the same in every transaction so that none can deadlock another: ``usage_events``
rows, then ``spend_counters`` rows in key order, then ``spend_leases`` rows in id order, then
``rate_counters`` rows in key order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from authz.configtypes import Period
from authz.errors import StoreError
from authz.store.db import Connection, Pool
from authz.store.sessions.audit_log import audit
from authz.store.usagerow import UsageRow

DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
_ZERO = Decimal(0)
_CENTS_OF_CENTS = Decimal("0.00000001")  # numeric(18, 8), as the amounts are stored
# Rows that ended longer ago than this no longer count against tokens-per-minute (a spool replay
# after an outage must not block anyone now).
_RATE_HORIZON = timedelta(minutes=2)
# In the SQL below each cap period truncates a timestamp with PostgreSQL's date_trunc unit (in UTC;
# ISO weeks start on Monday), the same periods as authz.billing.periods, and counters are locked in
# key order with the "C" collation (byte order), whatever the database's own collation.


@contextlib.contextmanager
def failing(what: str) -> Iterator[None]:
    """Turn PostgreSQL and socket errors into :class:`StoreError` naming ``what`` failed."""
    try:
        yield
    except DB_ERRORS as exc:
        raise StoreError(f"cannot {what}: {exc or type(exc).__name__}") from exc


@dataclass(frozen=True, slots=True, order=True)
class Bucket:
    """One counter: a scope's spend (``user``, ``group_pool`` or ``org``) named ``name`` in the
    ``period`` starting at ``start``."""

    scope: str
    name: str
    period: Period
    start: datetime


@dataclass(frozen=True, slots=True)
class LimitRecord:
    """A row of ``spend_limits``."""

    scope: str
    name: str
    period: Period
    usd: Decimal
    updated_at: datetime
    updated_by: str | None


@dataclass(frozen=True, slots=True)
class TopUp:
    """A worker asking for ``need`` more dollars on its lease ``lease_id`` of ``bucket``, whose cap is
    ``cap``, for a request of ``unit`` dollars; up to ``fraction`` of the room left after the need
    comes too, in whole units, so the next requests are admitted without asking."""

    bucket: Bucket
    lease_id: str
    cap: Decimal
    need: Decimal
    unit: Decimal
    fraction: Decimal


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to a :class:`TopUp`: ``granted`` dollars (0: refused), the bucket's settled
    ``spent``, the ``room`` there was before the grant (cap minus spent minus every live lease), and
    ``lost`` when the worker's lease had expired (its unused slice is gone; it must start a new
    lease)."""

    bucket: Bucket
    granted: Decimal
    spent: Decimal
    room: Decimal
    lost: bool = False


def grant_for(need: Decimal, room: Decimal, fraction: Decimal, unit: Decimal) -> Decimal:
    """How much a top-up gets: nothing when the room cannot hold the need, else the need plus as
    many whole ``unit``s (requests like this one) as fit in ``fraction`` of what is left.

    Far from a cap a worker thus leases a slice that admits many requests locally; once a tenth (by
    default) of the room holds less than one more request, grants are the need itself: exact
    reservations, and no worker keeps a fragment too small for a request while others are refused.
    """
    if need <= 0 or room < need:
        return _ZERO
    if unit <= 0:
        return need
    return need + unit * ((room - need) * fraction // unit)


def _bucket_arrays(buckets: Sequence[Bucket]) -> list[list[Any]]:
    return [
        [b.scope for b in buckets],
        [b.name for b in buckets],
        [b.period for b in buckets],
        [b.start for b in buckets],
    ]


async def top_up(db: Pool | Connection, holder: str, wants: Sequence[TopUp], lease_ttl: float) -> list[Grant]:
    """Lease more budget for each of ``wants`` in one transaction; the grants in the same order."""
    buckets = [w.bucket for w in wants]
    ids = [w.lease_id for w in wants]
    with failing("lease spend budget"):
        async with _connection(db) as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO spend_counters (scope, name, period, period_start) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) "
                "  AS k(scope, name, period, period_start) "
                'ORDER BY scope COLLATE "C", name COLLATE "C", period COLLATE "C", period_start '
                "ON CONFLICT DO NOTHING",
                *_bucket_arrays(buckets),
            )
            counters = await conn.fetch(
                "SELECT scope, name, period, period_start, spent FROM spend_counters "
                "WHERE (scope, name, period, period_start) IN "
                "  (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])) "
                'ORDER BY scope COLLATE "C", name COLLATE "C", period COLLATE "C", period_start FOR UPDATE',
                *_bucket_arrays(buckets),
            )
            spent = {
                Bucket(r["scope"], r["name"], r["period"], r["period_start"]): r["spent"] for r in counters
            }
            mine = {
                r["id"]: (r["amount"], r["alive"])
                for r in await conn.fetch(
                    "SELECT id, amount, expires_at > now() AS alive FROM spend_leases "
                    "WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                    ids,
                )
            }
            others = {
                Bucket(r["scope"], r["name"], r["period"], r["period_start"]): r["held"]
                for r in await conn.fetch(
                    "SELECT scope, name, period, period_start, sum(amount) AS held FROM spend_leases "
                    "WHERE (scope, name, period, period_start) IN "
                    "  (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])) "
                    "AND expires_at > now() AND NOT (id = ANY($5::text[])) GROUP BY 1, 2, 3, 4",
                    *_bucket_arrays(buckets),
                    ids,
                )
            }
            grants: list[Grant] = []
            updates: list[tuple[str, str, str, str, str, datetime, Decimal]] = []
            for want in wants:
                bucket = want.bucket
                held, alive = mine.get(want.lease_id, (_ZERO, True))
                settled = spent.get(bucket, _ZERO)
                if not alive:
                    grants.append(Grant(bucket, _ZERO, settled, _ZERO, lost=True))
                    continue
                room = want.cap - settled - others.get(bucket, _ZERO) - max(held, _ZERO)
                granted = grant_for(want.need, room, want.fraction, want.unit)
                grants.append(Grant(bucket, granted, settled, room))
                if granted > 0:
                    updates.append(
                        (
                            want.lease_id,
                            holder,
                            bucket.scope,
                            bucket.name,
                            bucket.period,
                            bucket.start,
                            granted,
                        )
                    )
            if updates:
                await conn.executemany(
                    "INSERT INTO spend_leases (id, holder, scope, name, period, period_start, amount, "
                    "expires_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8)) "
                    "ON CONFLICT (id) DO UPDATE SET amount = spend_leases.amount + EXCLUDED.amount, "
                    "expires_at = EXCLUDED.expires_at",
                    [(*u, lease_ttl) for u in sorted(updates)],
                )
    return grants


async def renew_leases(db: Pool | Connection, holder: str, lease_ttl: float) -> set[str]:
    """Extend the live leases of ``holder``; the ids still alive (an expired lease is not revived:
    other workers may have been granted its budget since)."""
    with failing("renew spend leases"):
        async with _connection(db) as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id FROM spend_leases WHERE holder = $1 AND expires_at > now() ORDER BY id FOR UPDATE",
                holder,
            )
            alive = [r["id"] for r in rows]
            if alive:
                await conn.execute(
                    "UPDATE spend_leases SET expires_at = now() + make_interval(secs => $2) "
                    "WHERE id = ANY($1::text[])",
                    alive,
                    lease_ttl,
                )
    return set(alive)


async def release(db: Pool | Connection, amounts: Sequence[tuple[str, Decimal]]) -> None:
    """Give back unused budget: ``(lease id, dollars)`` taken off each lease."""
    if not amounts:
        return
    with failing("release spend leases"):
        async with _connection(db) as conn, conn.transaction():
            await _take_off_leases(conn, amounts)


async def _take_off_leases(conn: Connection, amounts: Sequence[tuple[str, Decimal]]) -> None:
    totals: dict[str, Decimal] = {}
    for lease_id, amount in amounts:
        totals[lease_id] = totals.get(lease_id, _ZERO) + amount
    ids = sorted(totals)
    await conn.execute("SELECT 1 FROM spend_leases WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", ids)
    await conn.execute(
        "UPDATE spend_leases AS s SET amount = s.amount - d.amount "
        "FROM unnest($1::text[], $2::numeric[]) AS d(id, amount) WHERE s.id = d.id",
        ids,
        [totals[i] for i in ids],
    )


async def spent_in(db: Pool | Connection, buckets: Sequence[Bucket]) -> dict[Bucket, Decimal]:
    """The settled spend of each bucket (0 for a bucket no row has counted in yet)."""
    if not buckets:
        return {}
    with failing("read spend counters"):
        rows = await db.fetch(
            "SELECT scope, name, period, period_start, spent FROM spend_counters "
            "WHERE (scope, name, period, period_start) IN "
            "  (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]))",
            *_bucket_arrays(buckets),
        )
    found = {Bucket(r["scope"], r["name"], r["period"], r["period_start"]): r["spent"] for r in rows}
    return {b: found.get(b, _ZERO) for b in buckets}


@contextlib.asynccontextmanager
async def _connection(db: Pool | Connection) -> AsyncIterator[Connection]:
    # A pool lends a connection; a caller's connection is used in place.
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


# --- settlement (inside the ledger's insert transaction) ------------------------------------------


def _user_key(row: UsageRow) -> str | None:
    # authz.billing.caps.user_key, on a row.
    if row.user_email:
        return row.user_email.lower()
    return row.user_sub or None


async def settle(
    conn: Connection, inserted: Sequence[UsageRow], changed: Sequence[tuple[UsageRow, UsageRow]]
) -> None:
    """Count rows just written: their cost into the spend counters, their estimate off the leases
    that reserved it, their tokens into the rate counters. ``changed`` pairs a stored row with what a
    merge made of it: only the difference counts, and its lease was settled when it was first written.

    Runs inside the transaction that inserted the rows: a row is counted exactly when it is stored
    (a replayed spool segment that inserts nothing counts nothing).
    """
    costs: list[tuple[str | None, list[str], datetime, Decimal]] = []
    tokens: dict[tuple[str, datetime], int] = {}
    leases: list[tuple[str, Decimal]] = []
    horizon = datetime.now(UTC) - _RATE_HORIZON
    for before, after in [(None, row) for row in inserted] + [(b, a) for b, a in changed]:
        cost = after.cost_usd - (before.cost_usd if before is not None else _ZERO)
        if cost:
            costs.append((_user_key(after), list(after.groups), after.started_at, cost))
        if before is None and after.reserved_usd and after.leases:
            leases.extend((lease_id, after.reserved_usd) for lease_id in after.leases)
        used = _tokens(after) - (_tokens(before) if before is not None else 0)
        key = _user_key(after)
        if used and key is not None:
            ended = after.started_at + timedelta(milliseconds=after.latency_ms or 0)
            if ended >= horizon:
                minute = ended.astimezone(UTC).replace(second=0, microsecond=0)
                tokens[(key, minute)] = tokens.get((key, minute), 0) + used
    if costs:
        await conn.execute(
            "WITH r AS (SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::numeric[]) "
            "    AS r(user_key, groups, started_at, cost)), "
            "  k AS (SELECT 'user' AS scope, user_key AS name, started_at, cost FROM r "
            "      WHERE user_key IS NOT NULL "
            "    UNION ALL SELECT 'org', '*', started_at, cost FROM r "
            "    UNION ALL SELECT 'group_pool', g.name, r.started_at, r.cost "
            "      FROM r, jsonb_array_elements_text(r.groups::jsonb) AS g(name) "
            "      WHERE g.name IN (SELECT name FROM spend_groups)) "
            "INSERT INTO spend_counters (scope, name, period, period_start, spent) "
            "SELECT k.scope, k.name, p.period, "
            "  date_trunc(p.unit, k.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS period_start, "
            "  sum(k.cost) "
            "FROM k CROSS JOIN "
            "  (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month')) AS p(period, unit) "
            "GROUP BY 1, 2, 3, 4 "
            'ORDER BY scope COLLATE "C", name COLLATE "C", period COLLATE "C", period_start '
            "ON CONFLICT (scope, name, period, period_start) "
            "DO UPDATE SET spent = spend_counters.spent + EXCLUDED.spent",
            [c[0] for c in costs],
            [json.dumps(c[1]) for c in costs],
            [c[2] for c in costs],
            [c[3] for c in costs],
        )
    if leases:
        await _take_off_leases(conn, leases)
    if tokens:
        await _add_rate(conn, "tokens", sorted(tokens.items()))


def _tokens(row: UsageRow) -> int:
    return row.input_tokens + row.cache_write_tokens + row.cache_read_tokens + row.output_tokens


async def _add_rate(
    conn: Connection, column: str, counts: Sequence[tuple[tuple[str, datetime], int]]
) -> None:
    assert column in ("requests", "tokens")
    await conn.execute(
        f"INSERT INTO rate_counters (user_key, minute, {column}) "  # noqa: S608 - a column name from the assert above
        "SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int8[]) AS u(user_key, minute, n) "
        'ORDER BY user_key COLLATE "C", minute '
        f"ON CONFLICT (user_key, minute) DO UPDATE SET {column} = rate_counters.{column} + EXCLUDED.{column}",
        [k[0] for k, _ in counts],
        [k[1] for k, _ in counts],
        [n for _, n in counts],
    )


# --- rate counters ----------------------------------------------------------------------------


async def push_requests(
    db: Pool | Connection, counts: dict[tuple[str, datetime], int], users: Sequence[str], since: datetime
) -> dict[tuple[str, datetime], tuple[int, int]]:
    """Add this worker's admitted requests per (user, minute) and read back every worker's
    ``(requests, tokens)`` for ``users`` from the minute ``since`` on."""
    with failing("sync rate counters"):
        async with _connection(db) as conn:
            if counts:
                async with conn.transaction():
                    await _add_rate(conn, "requests", sorted(counts.items()))
            if not users:
                return {}
            rows = await conn.fetch(
                "SELECT user_key, minute, requests, tokens FROM rate_counters "
                "WHERE user_key = ANY($1::text[]) AND minute >= $2",
                list(users),
                since,
            )
    return {(r["user_key"], r["minute"]): (r["requests"], r["tokens"]) for r in rows}


# --- caps set at run time -------------------------------------------------------------------------


def _limit(r: Any) -> LimitRecord:
    return LimitRecord(r["scope"], r["name"], r["period"], r["usd"], r["updated_at"], r["updated_by"])


async def load_limits(db: Pool | Connection) -> list[LimitRecord]:
    """Every cap set with ``authz spend-limits``."""
    with failing("read spend limits"):
        rows = await db.fetch(
            'SELECT * FROM spend_limits ORDER BY scope COLLATE "C", name COLLATE "C", period COLLATE "C"'
        )
    return [_limit(r) for r in rows]


async def set_limit(
    db: Pool | Connection, *, scope: str, name: str, period: str, usd: Decimal, by: str
) -> Decimal | None:
    """Create or replace a cap and audit the change; the previous amount, or None if it is new."""
    with failing("set the spend limit"):
        async with _connection(db) as conn, conn.transaction():
            old = await conn.fetchval(
                "SELECT usd FROM spend_limits WHERE scope = $1 AND name = $2 AND period = $3 FOR UPDATE",
                scope,
                name,
                period,
            )
            await conn.execute(
                "INSERT INTO spend_limits (scope, name, period, usd, updated_at, updated_by) "
                "VALUES ($1, $2, $3, $4, now(), $5) ON CONFLICT (scope, name, period) "
                "DO UPDATE SET usd = EXCLUDED.usd, updated_at = now(), updated_by = EXCLUDED.updated_by",
                scope,
                name,
                period,
                usd,
                by,
            )
            await _audit_limit(conn, "spend_limit_set", scope, name, period, old, usd, by)
            if scope == "group_pool":
                await track_group(conn, name)
    return old  # type: ignore[no-any-return]


async def delete_limit(
    db: Pool | Connection, *, scope: str, name: str, period: str, by: str
) -> Decimal | None:
    """Delete a cap and audit it; the amount it had, or None if there was none."""
    with failing("delete the spend limit"):
        async with _connection(db) as conn, conn.transaction():
            old = await conn.fetchval(
                "DELETE FROM spend_limits WHERE scope = $1 AND name = $2 AND period = $3 RETURNING usd",
                scope,
                name,
                period,
            )
            if old is not None:
                await _audit_limit(conn, "spend_limit_delete", scope, name, period, old, None, by)
    return old  # type: ignore[no-any-return]


async def _audit_limit(
    conn: Connection,
    kind: str,
    scope: str,
    name: str,
    period: str,
    old: Decimal | None,
    new: Decimal | None,
    by: str,
) -> None:
    await audit(
        conn,
        kind=kind,
        outcome="ok",
        email=name if scope == "user" else None,
        detail={
            "scope": scope,
            "name": name,
            "period": period,
            "old_usd": None if old is None else str(old.quantize(_CENTS_OF_CENTS)),
            "new_usd": None if new is None else str(new.quantize(_CENTS_OF_CENTS)),
            "by": by,
        },
    )


async def track_group(db: Pool | Connection, group: str) -> bool:
    """Start counting ``group``'s shared spend (once per group): its counters for the current
    periods are filled from the rows already written, and from then on :func:`settle` adds every
    new row. True if it was not tracked before.

    The share lock on ``usage_events`` makes the backfill and the switch to settlement one step: no
    row is written between them, so none is counted twice or missed.
    """
    with failing("start counting a group's spend"):
        async with _connection(db) as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM spend_groups WHERE name = $1", group):
                return False
            await conn.execute("LOCK TABLE usage_events IN SHARE MODE")
            added = await conn.fetchval(
                "INSERT INTO spend_groups (name) VALUES ($1) ON CONFLICT DO NOTHING RETURNING name", group
            )
            if added is None:
                return False
            await conn.execute(
                "INSERT INTO spend_counters (scope, name, period, period_start, spent) "
                "SELECT 'group_pool', $1::text, p.period, "
                "  date_trunc(p.unit, u.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', sum(u.cost_usd) "
                "FROM usage_events AS u CROSS JOIN "
                "  (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month')) AS p(period, unit) "
                "WHERE $1 = ANY(u.groups) AND u.cost_usd <> 0 "
                "  AND u.started_at >= date_trunc(p.unit, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' "
                # One scope and name: the key order is the period's (ASCII) then the start's.
                "GROUP BY 1, 2, 3, 4 ORDER BY 3, 4 "
                "ON CONFLICT (scope, name, period, period_start) DO UPDATE SET spent = EXCLUDED.spent",
                group,
            )
    return True


async def tracked_groups(db: Pool | Connection) -> set[str]:
    """The groups whose shared spend is counted."""
    with failing("read the counted groups"):
        rows = await db.fetch("SELECT name FROM spend_groups")
    return {r["name"] for r in rows}


async def prune(db: Pool | Connection) -> None:
    """Drop what no longer counts: leases expired an hour ago, rate counters older than ten minutes,
    counters of periods that ended more than 400 days ago (retention keeps usage rows as long)."""
    with failing("prune spend state"):
        async with _connection(db) as conn:
            await conn.execute("DELETE FROM spend_leases WHERE expires_at < now() - interval '1 hour'")
            await conn.execute("DELETE FROM rate_counters WHERE minute < now() - interval '10 minutes'")
            await conn.execute("DELETE FROM spend_counters WHERE period_start < now() - interval '400 days'")


async def user_groups(db: Pool | Connection, user: str) -> tuple[str, ...] | None:
    """The groups a user last signed in (or was seen in a usage row) with, or None if unknown."""
    with failing("read the user's groups"):
        groups = await db.fetchval(
            "SELECT groups FROM sessions WHERE lower(email) = $1 OR sub = $1 "
            "ORDER BY last_refresh_at DESC "
            "LIMIT 1",
            user,
        )
        if groups is None:
            groups = await db.fetchval(
                "SELECT groups FROM usage_events WHERE lower(user_email) = $1 OR user_sub = $1 "
                "ORDER BY started_at DESC LIMIT 1",
                user,
            )
    return None if groups is None else tuple(groups)
