"""``authz sessions list|revoke``: the admin's view of sign-in sessions, straight from PostgreSQL.

A revocation goes through :mod:`authz.store.sessions`, which notifies every replica in the same
transaction (LISTEN/NOTIFY), so their ext_authz refuses the session's tokens within seconds. Each
revoked session leaves an ``admin_revoke`` audit row naming the operating-system user who ran it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from authz.configtypes import GatewayConfig
from authz.errors import GatewayError
from authz.store.migrate import open_migrated_pool
from authz.store.sessions import (
    Session,
    audit,
    get_session,
    list_sessions,
    revoke_session,
    revoke_sessions_for_user,
)
from authz.store.sessions.audit_log import operator

AUDIT_KIND = "admin_revoke"


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _state(session: Session, now: datetime) -> str:
    if session.revoked_at is not None:
        return f"revoked {_when(session.revoked_at)}: {session.revoked_reason or '-'}"
    if session.expires_at <= now:
        return "expired"
    return "active"


def format_sessions(sessions: Sequence[Session], now: datetime) -> str:
    """A table of ``sessions`` for a terminal, times in UTC; a one-line note when there are none."""
    if not sessions:
        return "No sessions.\n"
    header = (
        f"{'session':32}  {'email':28} {'groups':24} {'created (UTC)':16}  {'refreshed':16}  "
        f"{'expires':16}  state"
    )
    lines = [header]
    for s in sessions:
        groups = ",".join(s.groups) or "-"
        lines.append(
            f"{s.id:32}  {s.email[:28]:28} {groups[:24]:24} {_when(s.created_at):16}  "
            f"{_when(s.last_refresh_at):16}  {_when(s.expires_at):16}  {_state(s, now)}"
        )
    return "\n".join(lines) + "\n"


async def list_sessions_command(config: GatewayConfig, *, email: str | None, include_inactive: bool) -> int:
    """Print the sessions (active ones unless ``include_inactive``), of ``email`` or everyone."""
    now = datetime.now(UTC)
    pool = await open_migrated_pool(config.store, "the sessions")
    try:
        sessions = await list_sessions(pool, email=email, active_only=not include_inactive, now=now)
    finally:
        await pool.close()
    print(format_sessions(sessions, now), end="")
    return 0


async def revoke_sessions_command(
    config: GatewayConfig,
    *,
    email: str | None,
    session_id: str | None,
    reason: str,
    now: datetime | None = None,
) -> int:
    """Revoke session ``session_id`` or every active session of ``email``, auditing each one.

    Returns 1 when ``session_id`` names no session, 0 otherwise (revoking what is already revoked
    or expired changes nothing and says so).
    """
    if (email is None) == (session_id is None):
        raise GatewayError("name either a user (--user) or a session (--session)")
    now = now or datetime.now(UTC)
    detail = {"by": operator()}
    pool = await open_migrated_pool(config.store, "the sessions")
    try:
        if session_id is not None:
            session = await get_session(pool, session_id)
            if session is None:
                print(
                    f"authz: no session {session_id}; `authz sessions list --all` shows them",
                    file=sys.stderr,
                )
                return 1
            if not await revoke_session(pool, session_id, reason, now):
                print(f"Session {session_id} of {session.email} was already {_state(session, now)}")
                return 0
            await audit(
                pool,
                kind=AUDIT_KIND,
                outcome="ok",
                reason=reason,
                email=session.email,
                session_id=session_id,
                detail=detail,
                now=now,
            )
            print(f"Revoked session {session_id} of {session.email}")
            return 0
        assert email is not None  # checked above
        revoked = await revoke_sessions_for_user(pool, email, reason, now)
        for revoked_id in revoked:
            await audit(
                pool,
                kind=AUDIT_KIND,
                outcome="ok",
                reason=reason,
                email=email,
                session_id=revoked_id,
                detail=detail,
                now=now,
            )
    finally:
        await pool.close()
    if not revoked:
        print(f"No active sessions for {email}")
    else:
        noun = "session" if len(revoked) == 1 else "sessions"
        print(f"Revoked {len(revoked)} {noun} of {email}: {', '.join(revoked)}")
    return 0
