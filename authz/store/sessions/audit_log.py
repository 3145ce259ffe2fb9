"""The audit trail and the pruning of expired rows."""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timedelta
from typing import Any

from authz.store.db import Connection, Pool, failing
from authz.store.sessions._common import AuditEvent, _transaction

# --- audit -------------------------------------------------------------------------------------


def operator() -> str:
    """The login name of whoever runs an admin command, as its audit row records it ("unknown"
    where there is none: no login name and no passwd entry, as in some containers)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


async def audit(
    db: Pool | Connection,
    *,
    kind: str,
    outcome: str,
    reason: str | None = None,
    email: str | None = None,
    session_id: str | None = None,
    client_ip: str | None = None,
    user_agent: str | None = None,
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> int:
    """Append an audit row (``outcome``: ``ok``, ``denied`` or ``error``); return its id. ``now``
    defaults to the database's clock."""
    with failing("write an audit event"):
        value: int = await db.fetchval(
            "INSERT INTO audit_events (at, kind, outcome, reason, email, session_id, client_ip, user_agent,"
            " detail) VALUES (COALESCE($1::timestamptz, now()), $2, $3, $4, $5, $6, $7, $8, $9::jsonb)"
            " RETURNING id",
            now,
            kind,
            outcome,
            reason,
            email,
            session_id,
            client_ip,
            user_agent,
            None if detail is None else json.dumps(detail),
        )
    return value


async def recent_audit(db: Pool | Connection, limit: int = 50, kind: str | None = None) -> list[AuditEvent]:
    """The newest ``limit`` audit rows, of one ``kind`` or all, newest first."""
    with failing("read audit events"):
        if kind is None:
            records = await db.fetch("SELECT * FROM audit_events ORDER BY id DESC LIMIT $1", limit)
        else:
            records = await db.fetch(
                "SELECT * FROM audit_events WHERE kind = $2 ORDER BY id DESC LIMIT $1", limit, kind
            )
    return [_event(r) for r in records]


def _event(r: Any) -> AuditEvent:
    return AuditEvent(
        id=r["id"],
        at=r["at"],
        kind=r["kind"],
        outcome=r["outcome"],
        reason=r["reason"],
        email=r["email"],
        session_id=r["session_id"],
        client_ip=r["client_ip"],
        user_agent=r["user_agent"],
        detail=None if r["detail"] is None else json.loads(r["detail"]),
    )


async def audit_since(
    db: Pool | Connection, since: datetime | None, *, kind: str | None = None, limit: int = 1000
) -> list[AuditEvent]:
    """Audit rows at or after ``since`` (all when None), of one ``kind`` or all, oldest first."""
    with failing("read audit events"):
        records = await db.fetch(
            "SELECT * FROM (SELECT * FROM audit_events WHERE ($1::timestamptz IS NULL OR at >= $1)"
            " AND ($2::text IS NULL OR kind = $2) ORDER BY id DESC LIMIT $3) newest ORDER BY id",
            since,
            kind,
            limit,
        )
    return [_event(r) for r in records]


async def prune_expired(db: Pool | Connection, now: datetime, *, keep_sessions: timedelta) -> int:
    """Delete expired sign-in state (device codes, auth requests, logout jtis) and sessions expired
    more than ``keep_sessions`` ago (with their refresh tokens); return how many rows went."""
    with failing("prune expired rows"):
        async with _transaction(db) as conn:
            total = 0
            for sql, at in (
                ("DELETE FROM device_codes WHERE expires_at <= $1", now),
                (
                    "DELETE FROM auth_requests WHERE expires_at <= $1"
                    " AND (approval_expires_at IS NULL OR approval_expires_at <= $1)",
                    now,
                ),
                ("DELETE FROM logout_jtis WHERE expires_at <= $1", now),
                ("DELETE FROM sessions WHERE expires_at <= $1", now - keep_sessions),
            ):
                status: str = await conn.execute(sql, at)
                # The command tag is "DELETE <count>".
                total += int(status.rsplit(" ", 1)[-1])
    return total
