"""The device authorization flow (RFC 8628): device codes, user codes, polling, approve and deny."""

from __future__ import annotations

from datetime import datetime, timedelta

from authz.store.db import Connection, Pool, failing
from authz.store.sessions._common import (
    DeviceCode,
    PollError,
    PollResult,
    _device,
    _session,
    _transaction,
)

SLOW_DOWN_STEP = 5
"""Seconds added to a device code's poll interval at every ``slow_down`` (RFC 8628 section 3.5)."""

# Polls are spaced by the client's timer plus network latency, and consecutive polls may reach
# replicas whose clocks differ slightly: a poll this much early still counts as on time, so a
# well-behaved client is never told to slow down.
_POLL_SLACK = timedelta(seconds=1)

# --- device flow (RFC 8628) ------------------------------------------------------------------------


async def create_device_code(
    db: Pool | Connection,
    *,
    device_code_hash: bytes,
    user_code: str,
    ttl: timedelta,
    interval: int,
    surface: str | None,
    user_agent: str | None,
    client_ip: str | None,
    now: datetime,
) -> DeviceCode | None:
    """Record a new pending device authorization; None if ``user_code`` is held by a live code.

    ``user_code`` is the normalised form (``WDJBMJHT``). On None the caller draws another code: user
    codes are short, so a collision, though rare, is possible and must not be an error.
    """
    with failing("create a device code"):
        async with _transaction(db) as conn:
            # An expired code keeps its user code only until someone needs it again.
            await conn.execute(
                "DELETE FROM device_codes WHERE user_code = $1 AND expires_at <= $2", user_code, now
            )
            record = await conn.fetchrow(
                "INSERT INTO device_codes (device_code_hash, user_code, created_at, expires_at,"
                " poll_interval, surface, user_agent, client_ip) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                " ON CONFLICT (user_code) DO NOTHING RETURNING *",
                device_code_hash,
                user_code,
                now,
                now + ttl,
                interval,
                surface,
                user_agent,
                client_ip,
            )
    return None if record is None else _device(record)


async def find_device_by_user_code(db: Pool | Connection, user_code: str, now: datetime) -> DeviceCode | None:
    """The unexpired device authorization with ``user_code`` (any status), or None."""
    with failing("look up a user code"):
        record = await db.fetchrow(
            "SELECT * FROM device_codes WHERE user_code = $1 AND expires_at > $2", user_code, now
        )
    return None if record is None else _device(record)


async def poll_device(
    db: Pool | Connection, device_code_hash: bytes, now: datetime, *, refresh_token_hash: bytes | None = None
) -> PollResult:
    """Answer one token-endpoint poll for a device code, atomically (RFC 8628 section 3.5).

    Unknown or already consumed: ``invalid_grant``. Expired: ``expired_token``. Denied:
    ``access_denied``. Pending and polled sooner than the interval: ``slow_down``, and the stored
    interval grows by :data:`SLOW_DOWN_STEP`. Pending: ``authorization_pending``. Approved: the
    session, once; the code is consumed and, with ``refresh_token_hash``, the session's first
    refresh token is recorded in the same transaction (the replica that approved never saw it).
    """
    with failing("poll a device code"):
        async with _transaction(db) as conn:
            r = await conn.fetchrow(
                "SELECT status, expires_at, poll_interval, last_poll_at, session_id FROM device_codes"
                " WHERE device_code_hash = $1 FOR UPDATE",
                device_code_hash,
            )
            if r is None:
                return PollResult("invalid_grant", 0)
            interval: int = r["poll_interval"]
            if r["status"] == "consumed":
                return PollResult("invalid_grant", interval)
            if r["expires_at"] <= now:
                return PollResult("expired_token", interval)
            if r["status"] == "denied":
                return PollResult("access_denied", interval)
            if r["status"] == "pending":
                last = r["last_poll_at"]
                # slow_down is "a variant of authorization_pending" (section 3.5): only a code still
                # waiting for the user is rate limited; a decided one is answered at once.
                if last is not None and now - last < timedelta(seconds=interval) - _POLL_SLACK:
                    interval += SLOW_DOWN_STEP
                    error: PollError = "slow_down"
                else:
                    error = "authorization_pending"
                await conn.execute(
                    "UPDATE device_codes SET poll_interval = $2, last_poll_at = $3"
                    " WHERE device_code_hash = $1",
                    device_code_hash,
                    interval,
                    now,
                )
                return PollResult(error, interval)
            # Approved: consumed whatever happens next, so the code can never yield a second session.
            await conn.execute(
                "UPDATE device_codes SET status = 'consumed', last_poll_at = $2 WHERE device_code_hash = $1",
                device_code_hash,
                now,
            )
            s = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", r["session_id"])
            session = None if s is None else _session(s)
            if session is None or not session.is_active(now):
                return PollResult("invalid_grant", interval)
            if refresh_token_hash is not None:
                await conn.execute(
                    "INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)",
                    refresh_token_hash,
                    session.id,
                    now,
                )
            return PollResult(None, interval, session)


async def approve_device(
    db: Pool | Connection, user_code: str, session_id: str, email: str, now: datetime
) -> bool:
    """Approve the pending, unexpired code ``user_code`` for ``session_id``; False if it is not one."""
    with failing("approve a device code"):
        record = await db.fetchrow(
            "UPDATE device_codes SET status = 'approved', session_id = $2, email = $3"
            " WHERE user_code = $1 AND status = 'pending' AND expires_at > $4 RETURNING 1",
            user_code,
            session_id,
            email,
            now,
        )
    return record is not None


async def deny_device(db: Pool | Connection, user_code: str, now: datetime, email: str | None = None) -> bool:
    """Deny the pending, unexpired code ``user_code``; False if it is not one."""
    with failing("deny a device code"):
        record = await db.fetchrow(
            "UPDATE device_codes SET status = 'denied', email = $2"
            " WHERE user_code = $1 AND status = 'pending' AND expires_at > $3 RETURNING 1",
            user_code,
            email,
            now,
        )
    return record is not None
