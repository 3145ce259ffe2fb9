"""SQL over ``usage_events``: the ledger's batch insert and the reads behind ``authz usage``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import asyncpg

from authz.billing.usagerow import UsageRow
from authz.errors import StoreError
from authz.store.db import Connection, Pool

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
    "service_identity": "text",
}

# Column names are the field names; a field without a type above fails at import, not at 3 a.m.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))
_TYPES = tuple(_SEND_TYPES[name] for name in COLUMNS)


def _select_expr(name: str) -> str:
    if name == "groups":
        return 'ARRAY(SELECT jsonb_array_elements_text(u."groups"))'
    return f'u."{name}"'


_COLUMN_LIST = ", ".join(f'"{name}"' for name in COLUMNS)

# One statement and one round trip per batch. ON CONFLICT makes replaying a spool segment (even
# twice, even from two workers) idempotent. The f-strings below only splice in the field names and
# types declared above; every value travels as a bound parameter.
_SELECT_LIST = ", ".join(_select_expr(n) for n in COLUMNS)
_UNNEST_ARGS = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, 1))
INSERT_SQL = (
    f"INSERT INTO usage_events ({_COLUMN_LIST}) SELECT {_SELECT_LIST} "  # noqa: S608 - see above
    f"FROM unnest({_UNNEST_ARGS}) AS u({_COLUMN_LIST}) ON CONFLICT (request_id) DO NOTHING"
)

# Same construction as INSERT_SQL: field names spliced in, the limit bound as $1.
_RECENT_SQL = f"SELECT {_COLUMN_LIST} FROM usage_events ORDER BY started_at DESC, request_id LIMIT $1"  # noqa: S608


def _columns_of(rows: Sequence[UsageRow]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in COLUMNS]
    for row in rows:
        for i, name in enumerate(COLUMNS):
            value = getattr(row, name)
            columns[i].append(json.dumps(list(value)) if name == "groups" else value)
    return columns


async def insert_rows(conn: Connection, rows: Sequence[UsageRow]) -> int:
    """Insert ``rows`` in one statement, skipping request ids already present; return how many were new.

    asyncpg's exceptions propagate unchanged: the ledger tells a refused row from an unreachable
    server by their type.
    """
    if not rows:
        return 0
    status: str = await conn.execute(INSERT_SQL, *_columns_of(rows))
    # The command tag is "INSERT 0 <count>".
    return int(status.rsplit(" ", 1)[-1])


def row_from_record(record: Any) -> UsageRow:
    """Build a :class:`UsageRow` from a fetched ``usage_events`` record."""
    values = {name: record[name] for name in COLUMNS}
    values["groups"] = tuple(values["groups"] or ())
    return UsageRow(**values)


async def recent_usage(pool: Pool | Connection, limit: int = 50) -> list[UsageRow]:
    """The ``limit`` most recent rows, newest first (``authz usage``)."""
    try:
        records = await pool.fetch(_RECENT_SQL, limit)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"cannot read usage_events: {exc}") from exc
    return [row_from_record(r) for r in records]
