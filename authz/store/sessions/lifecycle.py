"""Sessions and their refresh tokens, and revocation with its NOTIFY to every replica."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from authz.store.db import Connection, Pool, failing
from authz.store.sessions._common import RotateResult, Session, _session, _transaction

REVOCATION_CHANNEL = "gateway_revocations"
"""The LISTEN/NOTIFY channel; the payload is the revoked session's id."""

REFRESH_TOKEN_REUSE = "refresh_token_reuse"  # noqa: S105 - a revocation reason, not a secret
"""``revoked_reason`` of a session whose spent refresh token was presented again."""

# --- sessions and refresh tokens ----------------------------------------------------------------


async def create_session(
    db: Pool | Connection,
    *,
    session_id: str,
    sub: str,
    email: str,
    groups: Sequence[str],
    idp_sid: str | None,
    idp_refresh_token_enc: bytes | None,
    surface: str | None,
    user_agent: str | None,
    lifetime: timedelta,
    now: datetime,
    refresh_token_hash: bytes | None,
) -> Session:
    """Create a session expiring ``lifetime`` after ``now`` and, in the same transaction, its first
    refresh token. In the device flow pass ``refresh_token_hash=None``: the token is minted at the
    poll instead (:func:`poll_device`)."""
    with failing("create a session"):
        async with _transaction(db) as conn:
            record = await conn.fetchrow(
                "INSERT INTO sessions (id, sub, email, groups, idp_sid, idp_refresh_token, surface,"
                " user_agent, created_at, last_refresh_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)"
                " RETURNING *",
                session_id,
                sub,
                email,
                list(groups),
                idp_sid,
                idp_refresh_token_enc,
                surface,
                user_agent,
                now,
                now + lifetime,
            )
            if refresh_token_hash is not None:
                await conn.execute(
                    "INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)",
                    refresh_token_hash,
                    session_id,
                    now,
                )
    return _session(record)


async def issue_refresh_token(
    db: Pool | Connection, session_id: str, token_hash: bytes, now: datetime
) -> bool:
    """Add a refresh token to an active session; False if the session is revoked, expired or unknown."""
    with failing("issue a refresh token"):
        record = await db.fetchrow(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at)"
            " SELECT $2, id, $3 FROM sessions WHERE id = $1 AND revoked_at IS NULL AND expires_at > $3"
            " RETURNING 1",
            session_id,
            token_hash,
            now,
        )
    return record is not None


async def rotate_refresh_token(
    db: Pool | Connection, old_hash: bytes, new_hash: bytes, now: datetime
) -> RotateResult:
    """Spend the refresh token ``old_hash`` and issue ``new_hash`` in its place, atomically.

    Unknown token, or its session revoked or expired: ``invalid``. A token already spent is reuse
    (a stolen copy, or a replay): the whole session is revoked with reason
    :data:`REFRESH_TOKEN_REUSE` and the result is ``reused``. Otherwise ``ok`` with the session.
    """
    with failing("rotate a refresh token"):
        async with _transaction(db) as conn:
            # The row lock makes two concurrent uses of one token queue up: the second sees it spent.
            token = await conn.fetchrow(
                "SELECT session_id, used_at FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE", old_hash
            )
            if token is None:
                return RotateResult("invalid")
            session_id: str = token["session_id"]
            if token["used_at"] is not None:
                await _revoke(conn, _BY_ID, (session_id,), REFRESH_TOKEN_REUSE, now)
                return RotateResult("reused", session_id=session_id)
            s = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", session_id)
            session = _session(s)
            if not session.is_active(now):
                return RotateResult("invalid", session_id=session_id)
            await conn.execute("UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1", old_hash, now)
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)",
                new_hash,
                session_id,
                now,
            )
    return RotateResult("ok", session=session, session_id=session_id)


async def update_session_after_refresh(
    db: Pool | Connection,
    session_id: str,
    groups: Sequence[str],
    idp_refresh_token_enc: bytes | None,
    now: datetime,
) -> Session | None:
    """Record a successful refresh at the IdP: new groups, the IdP's new refresh token (None keeps
    the stored one, for IdPs that do not rotate it) and ``last_refresh_at``. None if the session is
    no longer active, which the caller must treat as a failed refresh."""
    with failing("update a session after refresh"):
        record = await db.fetchrow(
            "UPDATE sessions SET groups = $2, idp_refresh_token = COALESCE($3, idp_refresh_token),"
            " last_refresh_at = $4 WHERE id = $1 AND revoked_at IS NULL AND expires_at > $4 RETURNING *",
            session_id,
            list(groups),
            idp_refresh_token_enc,
            now,
        )
    return None if record is None else _session(record)


async def get_session(db: Pool | Connection, session_id: str) -> Session | None:
    """The session ``session_id`` in whatever state it is, or None."""
    with failing("read a session"):
        record = await db.fetchrow("SELECT * FROM sessions WHERE id = $1", session_id)
    return None if record is None else _session(record)


async def session_id_for_refresh_token(db: Pool | Connection, token_hash: bytes) -> str | None:
    """The session a refresh token (spent or not) belongs to, for RFC 7009 revocation."""
    with failing("look up a refresh token"):
        value: str | None = await db.fetchval(
            "SELECT session_id FROM refresh_tokens WHERE token_hash = $1", token_hash
        )
    return value


async def list_sessions(
    db: Pool | Connection,
    email: str | None = None,
    active_only: bool = True,
    *,
    now: datetime | None = None,
) -> list[Session]:
    """Sessions, newest first: of ``email`` (case-insensitive) or everyone's; with ``active_only``
    only those neither revoked nor expired at ``now`` (the database's clock when None)."""
    conditions = []
    args: list[Any] = []
    if email is not None:
        args.append(email)
        conditions.append(f"lower(email) = lower(${len(args)})")
    if active_only:
        args.append(now)
        conditions.append(f"revoked_at IS NULL AND expires_at > COALESCE(${len(args)}::timestamptz, now())")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    # Only the fixed fragments above are spliced in; values are bound parameters.
    sql = f"SELECT * FROM sessions{where} ORDER BY created_at DESC, id"  # noqa: S608
    with failing("list sessions"):
        records = await db.fetch(sql, *args)
    return [_session(r) for r in records]


# --- revocation ---------------------------------------------------------------------------------

# The sessions a revocation applies to, always narrowed to active ones: an expired session needs no
# revocation, and a revoked one keeps its first reason.
_BY_ID = "id = $3"
_BY_EMAIL = "lower(email) = lower($3)"
_BY_SUB = "sub = $3 AND ($4::timestamptz IS NULL OR created_at <= $4)"
_BY_SID = "idp_sid = $3 AND ($4::text IS NULL OR sub = $4)"


async def _revoke(
    conn: Pool | Connection, where: str, args: tuple[Any, ...], reason: str, now: datetime
) -> list[str]:
    # One statement, hence one transaction (or part of the caller's): the NOTIFY for each revoked id
    # is delivered when, and only if, the revocation commits. ``where`` is one of the constants above.
    sql = (
        "WITH revoked AS (UPDATE sessions SET revoked_at = $1, revoked_reason = $2"  # noqa: S608
        f" WHERE {where} AND revoked_at IS NULL AND expires_at > $1 RETURNING id)"
        f" SELECT id, pg_notify('{REVOCATION_CHANNEL}', id) FROM revoked ORDER BY id"
    )
    records = await conn.fetch(sql, now, reason, *args)
    return [r["id"] for r in records]


async def revoke_session(db: Pool | Connection, session_id: str, reason: str, now: datetime) -> bool:
    """Revoke one active session and notify every replica; False if it was not active."""
    with failing("revoke a session"):
        return bool(await _revoke(db, _BY_ID, (session_id,), reason, now))


async def revoke_sessions_for_user(
    db: Pool | Connection, email: str, reason: str, now: datetime
) -> list[str]:
    """Revoke every active session of ``email`` (case-insensitive); return their ids."""
    with failing("revoke a user's sessions"):
        return await _revoke(db, _BY_EMAIL, (email,), reason, now)


async def revoke_sessions_by_idp(
    db: Pool | Connection,
    *,
    sub: str | None,
    idp_sid: str | None,
    reason: str,
    now: datetime,
    signed_in_by: datetime | None = None,
) -> list[str]:
    """Revoke what an OIDC back-channel logout names: the sessions with IdP session ``idp_sid``
    (and ``sub``, when given too), else all of ``sub``'s sessions (Back-Channel Logout 1.0,
    section 2.4). Return their ids. ValueError if neither is given.

    ``signed_in_by`` leaves out, of a logout by ``sub`` alone, the sessions created after it: one
    replayed from the journal long after it arrived must not end a sign-in the user made since. An
    IdP session, once logged out, never signs anyone in again, so ``idp_sid`` needs no such bound.
    """
    with failing("revoke sessions for an IdP logout"):
        if idp_sid is not None:
            return await _revoke(db, _BY_SID, (idp_sid, sub), reason, now)
        if sub is not None:
            return await _revoke(db, _BY_SUB, (sub, signed_in_by), reason, now)
    raise ValueError("a logout names a sub, an IdP session id, or both")


async def revoked_session_ids(db: Pool | Connection, now: datetime) -> set[str]:
    """Ids of revoked sessions not yet expired: the full revocation set. Expired sessions are left
    out since their access tokens die by their own ``exp`` no later than the session."""
    with failing("read the revoked sessions"):
        records = await db.fetch(
            "SELECT id FROM sessions WHERE revoked_at IS NOT NULL AND expires_at > $1", now
        )
    return {r["id"] for r in records}
