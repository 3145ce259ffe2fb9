"""SQL over ``usage_events``: the ledger's batch insert and the reads behind ``authz usage``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import asyncpg

from authz.errors import StoreError
from authz.store.db import Connection, Pool
from authz.store.spend import settle
from authz.store.usagerow import UsageRow, merge_rows

# PostgreSQL type of each UsageRow field as sent in the insert. groups travels as jsonb because
# unnest() flattens a two-dimensional text[][] into single strings; it is rebuilt into text[] below.
_SEND_TYPES = {
    "request_id": "text",
    "started_at": "timestamptz",
    "user_sub": "text",
    "user_email": "text",
    "groups": "jsonb",
    "session_id": "text",
    "cc_session_id": "text",
    "agent_id": "text",
    "parent_agent_id": "text",
    "user_agent": "text",
    "ingress_format": "text",
    "operation": "text",
    "upstream": "text",
    "policy": "text",
    "requested_model": "text",
    "upstream_model": "text",
    "status": "int4",
    "outcome": "text",
    "reason": "text",
    "input_tokens": "int8",
    "input_tokens_estimated": "bool",
    "output_tokens": "int8",
    "output_tokens_estimated": "bool",
    "cache_write_tokens": "int8",
    "cache_write_5m_tokens": "int8",
    "cache_write_1h_tokens": "int8",
    "cache_read_tokens": "int8",
    "cost_usd": "numeric",
    "latency_ms": "float8",
    "ttfb_ms": "float8",
    "recorded_by": "text",
    "service_identity": "text",
    "reserved_usd": "numeric",
    "leases": "jsonb",
    "attempts": "int4",
}
# Tuple fields travel as JSON arrays (see _SEND_TYPES) and are stored as text[].
_ARRAYS = frozenset({"groups", "leases"})

# Column names are the field names; a field without a type above fails at import, not at 3 a.m.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))
_TYPES = tuple(_SEND_TYPES[name] for name in COLUMNS)


def _select_expr(name: str) -> str:
    if name in _ARRAYS:
        return f'ARRAY(SELECT jsonb_array_elements_text(u."{name}"))'
    return f'u."{name}"'


_COLUMN_LIST = ", ".join(f'"{name}"' for name in COLUMNS)

# One statement and one round trip per batch. ON CONFLICT makes replaying a spool segment (even
# twice, even from two workers) idempotent; the rows it skipped are merged with the stored ones
# (merge_rows: a final row stands, two partial reports of one request combine). The f-strings below
# only splice in the field names and types declared above; every value travels as a parameter.
_SELECT_LIST = ", ".join(_select_expr(n) for n in COLUMNS)
_UNNEST_ARGS = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, 1))
INSERT_SQL = (
    f"INSERT INTO usage_events ({_COLUMN_LIST}) SELECT {_SELECT_LIST} "  # noqa: S608 - see above
    f"FROM unnest({_UNNEST_ARGS}) AS u({_COLUMN_LIST}) "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)
_STORED_SQL = f"SELECT {_COLUMN_LIST} FROM usage_events WHERE request_id = ANY($1::text[]) FOR UPDATE"  # noqa: S608
_UPDATE_COLUMNS = [name for name in COLUMNS if name != "request_id"]
_UPDATE_SQL = (
    "UPDATE usage_events SET "  # noqa: S608 - field names only, as above
    + ", ".join(
        f'"{name}" = ARRAY(SELECT jsonb_array_elements_text(${i}::jsonb))'
        if name in _ARRAYS
        else f'"{name}" = ${i}'
        for i, name in enumerate(_UPDATE_COLUMNS, 2)
    )
    + " WHERE request_id = $1"
)

# Same construction as INSERT_SQL: field names spliced in, the limit bound as $1.
_RECENT_SQL = f"SELECT {_COLUMN_LIST} FROM usage_events ORDER BY started_at DESC, request_id LIMIT $1"  # noqa: S608


def _columns_of(rows: Sequence[UsageRow]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in COLUMNS]
    for row in rows:
        for i, name in enumerate(COLUMNS):
            value = getattr(row, name)
            columns[i].append(json.dumps(list(value)) if name in _ARRAYS else value)
    return columns


def _merged(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """One row per request id, in first-seen order, duplicates folded with merge_rows."""
    by_id: dict[str, UsageRow] = {}
    for row in rows:
        seen = by_id.get(row.request_id)
        by_id[row.request_id] = row if seen is None else merge_rows(seen, row)
    return list(by_id.values())


async def insert_rows(conn: Connection, rows: Sequence[UsageRow]) -> int:
    """Insert ``rows`` in one statement, merge the ones whose request id is already stored, and
    settle them (spend counters, leases, rate counters: :func:`authz.store.spend.settle`), all in
    one transaction; return how many were new.

    asyncpg's exceptions propagate unchanged: the ledger tells a refused row from an unreachable
    server by their type.
    """
    if not rows:
        return 0
    batch = _merged(rows)
    async with conn.transaction():
        inserted = {record["request_id"] for record in await conn.fetch(INSERT_SQL, *_columns_of(batch))}
        stored = [row for row in batch if row.request_id not in inserted]
        changed = await _merge_stored(conn, stored) if stored else []
        await settle(conn, [row for row in batch if row.request_id in inserted], changed)
    return len(inserted)


async def _merge_stored(conn: Connection, rows: Sequence[UsageRow]) -> list[tuple[UsageRow, UsageRow]]:
    # Replays of a spooled segment land here too: merge_rows leaves an identical row alone, so only
    # the rare second report of one request (a cut stream and Envoy's access log) is written.
    # Returns (stored, merged) for each row that changed.
    records = await conn.fetch(_STORED_SQL, [row.request_id for row in rows])
    current = {record["request_id"]: row_from_record(record) for record in records}
    updates = []
    changed = []
    for row in rows:
        before = current.get(row.request_id)
        if before is None:
            continue
        after = merge_rows(before, row)
        if after != before:
            values = [
                json.dumps(list(getattr(after, n))) if n in _ARRAYS else getattr(after, n)
                for n in _UPDATE_COLUMNS
            ]
            updates.append((after.request_id, *values))
            changed.append((before, after))
    if updates:
        await conn.executemany(_UPDATE_SQL, updates)
    return changed


def row_from_record(record: Any) -> UsageRow:
    """Build a :class:`UsageRow` from a fetched ``usage_events`` record."""
    values = {name: record[name] for name in COLUMNS}
    for name in _ARRAYS:
        values[name] = tuple(values[name] or ())
    return UsageRow(**values)


async def recent_usage(pool: Pool | Connection, limit: int = 50) -> list[UsageRow]:
    """The ``limit`` most recent rows, newest first (``authz usage``)."""
    try:
        records = await pool.fetch(_RECENT_SQL, limit)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"cannot read usage_events: {exc}") from exc
    return [row_from_record(r) for r in records]
