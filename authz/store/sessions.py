"""SQL over the session tables (migration ``0002_sessions``): device flow, sign-in, sessions, audit.

Plain async functions over an asyncpg pool or connection. Each does one job, in one transaction
where the job reads and then writes, and returns frozen dataclasses. The clock is passed in
(``now``, an aware datetime) so that every replica and every test agrees on what it compares.
Secrets arrive already hashed (SHA-256 of the opaque token) or sealed (:mod:`authz.secretbox`).

Every revocation runs ``pg_notify('gateway_revocations', <session id>)`` in the revoking
transaction, so the notification is delivered when, and only if, the revocation commits;
:mod:`authz.revocation` listens for it. Database failures raise :class:`~authz.errors.StoreError`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from authz.errors import StoreError
from authz.store.db import Connection, Pool

REVOCATION_CHANNEL = "gateway_revocations"
"""The LISTEN/NOTIFY channel; the payload is the revoked session's id."""

REFRESH_TOKEN_REUSE = "refresh_token_reuse"  # noqa: S105 - a revocation reason, not a secret
"""``revoked_reason`` of a session whose spent refresh token was presented again."""

SLOW_DOWN_STEP = 5
"""Seconds added to a device code's poll interval at every ``slow_down`` (RFC 8628 section 3.5)."""

# Polls are spaced by the client's timer plus network latency, and consecutive polls may reach
# replicas whose clocks differ slightly: a poll this much early still counts as on time, so a
# well-behaved client is never told to slow down.
_POLL_SLACK = timedelta(seconds=1)

_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)

PollError = Literal["authorization_pending", "slow_down", "access_denied", "expired_token", "invalid_grant"]
AuthRequestFailure = Literal["state_unknown", "state_mismatch", "state_reused", "state_expired"]
ApprovalFailure = Literal["approval_unknown", "approval_mismatch", "approval_reused", "approval_expired"]
DeviceStatus = Literal["pending", "approved", "denied", "consumed"]


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """One gateway session (a row of ``sessions``)."""

    id: str
    sub: str
    email: str
    groups: tuple[str, ...]
    idp_sid: str | None
    idp_refresh_token_enc: bytes | None = field(repr=False)
    surface: str | None
    user_agent: str | None
    created_at: datetime
    last_refresh_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None

    def is_active(self, now: datetime) -> bool:
        """Neither revoked nor past its absolute lifetime at ``now``."""
        return self.revoked_at is None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class DeviceCode:
    """One RFC 8628 device authorization (a row of ``device_codes``)."""

    device_code_hash: bytes = field(repr=False)
    user_code: str
    created_at: datetime
    expires_at: datetime
    poll_interval: int
    last_poll_at: datetime | None
    status: DeviceStatus
    session_id: str | None
    surface: str | None
    user_agent: str | None
    client_ip: str | None
    email: str | None


@dataclass(frozen=True, slots=True)
class PollResult:
    """The answer to one device-code poll: an RFC 8628 error code, or the session on success."""

    error: PollError | None
    interval: int
    session: Session | None = None


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """One browser redirect to the IdP (a row of ``auth_requests``)."""

    state: str
    browser_hash: bytes = field(repr=False)
    user_code: str
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """Who the IdP said signed in, kept between the callback and the approve POST."""

    sub: str
    email: str
    groups: tuple[str, ...]
    idp_sid: str | None
    idp_refresh_token_enc: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Approval:
    """A verified identity waiting for the user to approve or deny the device with ``user_code``."""

    approval_id: str
    state: str
    user_code: str
    identity: VerifiedIdentity
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class RotateResult:
    """The outcome of presenting a refresh token: ``ok`` with the session, ``invalid`` or ``reused``."""

    status: Literal["ok", "invalid", "reused"]
    session: Session | None = None
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One row of ``audit_events``."""

    id: int
    at: datetime
    kind: str
    outcome: str
    reason: str | None
    email: str | None
    session_id: str | None
    client_ip: str | None
    user_agent: str | None
    detail: dict[str, Any] | None


# --- helpers -------------------------------------------------------------------------------------


def new_session_id() -> str:
    """A fresh session id: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


def new_opaque_token() -> str:
    """A fresh opaque token (refresh token, device code): 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """SHA-256 of an opaque token: the only form in which tokens are stored or looked up."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@contextlib.contextmanager
def _failing(action: str) -> Iterator[None]:
    try:
        yield
    except _DB_ERRORS as exc:
        raise StoreError(f"cannot {action}: {exc}; check that PostgreSQL is reachable and migrated") from exc


@contextlib.asynccontextmanager
async def _transaction(db: Pool | Connection) -> AsyncIterator[Connection]:
    # A pool lends a connection for the transaction; a caller's connection (or pool proxy) runs it
    # in place, as a savepoint if the caller already opened a transaction.
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


def _session(r: Any) -> Session:
    return Session(
        id=r["id"],
        sub=r["sub"],
        email=r["email"],
        groups=tuple(r["groups"] or ()),
        idp_sid=r["idp_sid"],
        idp_refresh_token_enc=r["idp_refresh_token"],
        surface=r["surface"],
        user_agent=r["user_agent"],
        created_at=r["created_at"],
        last_refresh_at=r["last_refresh_at"],
        expires_at=r["expires_at"],
        revoked_at=r["revoked_at"],
        revoked_reason=r["revoked_reason"],
    )


def _device(r: Any) -> DeviceCode:
    return DeviceCode(
        device_code_hash=r["device_code_hash"],
        user_code=r["user_code"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        poll_interval=r["poll_interval"],
        last_poll_at=r["last_poll_at"],
        status=r["status"],
        session_id=r["session_id"],
        surface=r["surface"],
        user_agent=r["user_agent"],
        client_ip=r["client_ip"],
        email=r["email"],
    )


def _auth_request(r: Any) -> AuthRequest:
    return AuthRequest(
        state=r["state"],
        browser_hash=r["browser_hash"],
        user_code=r["user_code"],
        nonce=r["nonce"],
        code_verifier=r["code_verifier"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        used_at=r["used_at"],
    )


def _identity_json(identity: VerifiedIdentity) -> str:
    token = identity.idp_refresh_token_enc
    return json.dumps(
        {
            "sub": identity.sub,
            "email": identity.email,
            "groups": list(identity.groups),
            "idp_sid": identity.idp_sid,
            # jsonb holds text: the sealed bytes travel base64url-encoded.
            "idp_refresh_token_enc": None if token is None else base64.urlsafe_b64encode(token).decode(),
        }
    )


def _identity_from_json(text: str) -> VerifiedIdentity:
    data = json.loads(text)
    token = data.get("idp_refresh_token_enc")
    return VerifiedIdentity(
        sub=data["sub"],
        email=data["email"],
        groups=tuple(data.get("groups") or ()),
        idp_sid=data.get("idp_sid"),
        idp_refresh_token_enc=None if token is None else base64.urlsafe_b64decode(token),
    )


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


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
    with _failing("create a device code"):
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
    with _failing("look up a user code"):
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
    with _failing("poll a device code"):
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
    with _failing("approve a device code"):
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
    with _failing("deny a device code"):
        record = await db.fetchrow(
            "UPDATE device_codes SET status = 'denied', email = $2"
            " WHERE user_code = $1 AND status = 'pending' AND expires_at > $3 RETURNING 1",
            user_code,
            email,
            now,
        )
    return record is not None


# --- the browser's round trip to the IdP -----------------------------------------------------------


async def create_auth_request(
    db: Pool | Connection,
    *,
    state: str,
    browser_hash: bytes,
    user_code: str,
    nonce: str,
    code_verifier: str,
    ttl: timedelta,
    now: datetime,
) -> AuthRequest:
    """Record one redirect to the IdP, bound to the browser whose cookie hashes to ``browser_hash``."""
    with _failing("create an auth request"):
        record = await db.fetchrow(
            "INSERT INTO auth_requests (state, browser_hash, user_code, nonce, code_verifier, created_at,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
            state,
            browser_hash,
            user_code,
            nonce,
            code_verifier,
            now,
            now + ttl,
        )
    return _auth_request(record)


async def consume_auth_request(
    db: Pool | Connection, state: str, browser_hash: bytes, now: datetime
) -> AuthRequest | AuthRequestFailure:
    """Take the auth request for ``state`` once, from the browser it was made for; else why not.

    A foreign browser learns nothing about the request and does not use it up, so a forged callback
    cannot spoil the real user's sign-in.
    """
    with _failing("consume an auth request"):
        async with _transaction(db) as conn:
            r = await conn.fetchrow("SELECT * FROM auth_requests WHERE state = $1 FOR UPDATE", state)
            if r is None:
                return "state_unknown"
            if not _same(r["browser_hash"], browser_hash):
                return "state_mismatch"
            if r["used_at"] is not None:
                return "state_reused"
            if r["expires_at"] <= now:
                return "state_expired"
            await conn.execute("UPDATE auth_requests SET used_at = $2 WHERE state = $1", state, now)
    return replace(_auth_request(r), used_at=now)


async def store_approval(
    db: Pool | Connection,
    *,
    state: str,
    approval_id: str,
    identity: VerifiedIdentity,
    ttl: timedelta,
    now: datetime,
) -> bool:
    """Park the identity verified at the callback of ``state`` under ``approval_id`` for the approve POST.

    False unless the auth request was consumed and holds no approval yet.
    """
    with _failing("store an approval"):
        record = await db.fetchrow(
            "UPDATE auth_requests SET approval_id = $2, identity = $3::jsonb, approval_expires_at = $4"
            " WHERE state = $1 AND used_at IS NOT NULL AND approval_id IS NULL RETURNING 1",
            state,
            approval_id,
            _identity_json(identity),
            now + ttl,
        )
    return record is not None


async def take_approval(
    db: Pool | Connection, approval_id: str, browser_hash: bytes, now: datetime
) -> Approval | ApprovalFailure:
    """Take the approval ``approval_id`` once, from the browser that signed in; else why not."""
    with _failing("take an approval"):
        async with _transaction(db) as conn:
            r = await conn.fetchrow(
                "SELECT * FROM auth_requests WHERE approval_id = $1 FOR UPDATE", approval_id
            )
            if r is None:
                return "approval_unknown"
            if not _same(r["browser_hash"], browser_hash):
                return "approval_mismatch"
            if r["approval_used_at"] is not None:
                return "approval_reused"
            if r["approval_expires_at"] <= now:
                return "approval_expired"
            # The identity (with the sealed IdP refresh token) is not kept once it has been handed on.
            await conn.execute(
                "UPDATE auth_requests SET approval_used_at = $2, identity = NULL WHERE approval_id = $1",
                approval_id,
                now,
            )
    return Approval(
        approval_id=approval_id,
        state=r["state"],
        user_code=r["user_code"],
        identity=_identity_from_json(r["identity"]),
        expires_at=r["approval_expires_at"],
    )


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
    with _failing("create a session"):
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
    with _failing("issue a refresh token"):
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
    with _failing("rotate a refresh token"):
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
    with _failing("update a session after refresh"):
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
    with _failing("read a session"):
        record = await db.fetchrow("SELECT * FROM sessions WHERE id = $1", session_id)
    return None if record is None else _session(record)


async def session_id_for_refresh_token(db: Pool | Connection, token_hash: bytes) -> str | None:
    """The session a refresh token (spent or not) belongs to, for RFC 7009 revocation."""
    with _failing("look up a refresh token"):
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
    with _failing("list sessions"):
        records = await db.fetch(sql, *args)
    return [_session(r) for r in records]


# --- revocation ---------------------------------------------------------------------------------

# The sessions a revocation applies to, always narrowed to active ones: an expired session needs no
# revocation, and a revoked one keeps its first reason.
_BY_ID = "id = $3"
_BY_EMAIL = "lower(email) = lower($3)"
_BY_SUB = "sub = $3"
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
    with _failing("revoke a session"):
        return bool(await _revoke(db, _BY_ID, (session_id,), reason, now))


async def revoke_sessions_for_user(
    db: Pool | Connection, email: str, reason: str, now: datetime
) -> list[str]:
    """Revoke every active session of ``email`` (case-insensitive); return their ids."""
    with _failing("revoke a user's sessions"):
        return await _revoke(db, _BY_EMAIL, (email,), reason, now)


async def revoke_sessions_by_idp(
    db: Pool | Connection, *, sub: str | None, idp_sid: str | None, reason: str, now: datetime
) -> list[str]:
    """Revoke what an OIDC back-channel logout names: the sessions with IdP session ``idp_sid``
    (and ``sub``, when given too), else all of ``sub``'s sessions (Back-Channel Logout 1.0,
    section 2.4). Return their ids. ValueError if neither is given."""
    with _failing("revoke sessions for an IdP logout"):
        if idp_sid is not None:
            return await _revoke(db, _BY_SID, (idp_sid, sub), reason, now)
        if sub is not None:
            return await _revoke(db, _BY_SUB, (sub,), reason, now)
    raise ValueError("a logout names a sub, an IdP session id, or both")


async def revoked_session_ids(db: Pool | Connection, now: datetime) -> set[str]:
    """Ids of revoked sessions not yet expired: the full revocation set. Expired sessions are left
    out since their access tokens die by their own ``exp`` no later than the session."""
    with _failing("read the revoked sessions"):
        records = await db.fetch(
            "SELECT id FROM sessions WHERE revoked_at IS NOT NULL AND expires_at > $1", now
        )
    return {r["id"] for r in records}


# --- audit and back-channel logout replay ------------------------------------------------------


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
    with _failing("write an audit event"):
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
    with _failing("read audit events"):
        if kind is None:
            records = await db.fetch("SELECT * FROM audit_events ORDER BY id DESC LIMIT $1", limit)
        else:
            records = await db.fetch(
                "SELECT * FROM audit_events WHERE kind = $2 ORDER BY id DESC LIMIT $1", limit, kind
            )
    return [
        AuditEvent(
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
        for r in records
    ]


async def remember_logout_jti(
    db: Pool | Connection, jti: str, issuer: str, expires_at: datetime, now: datetime
) -> bool:
    """Record a back-channel logout token's ``jti``; False if it was seen before (a replay).

    ``expires_at`` is when the token stops passing validation (its exp plus the allowed clock skew):
    until then the jti is remembered; expired entries are pruned here.
    """
    with _failing("record a logout token id"):
        async with _transaction(db) as conn:
            await conn.execute("DELETE FROM logout_jtis WHERE expires_at <= $1", now)
            record = await conn.fetchrow(
                "INSERT INTO logout_jtis (jti, issuer, expires_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (issuer, jti) DO NOTHING RETURNING 1",
                jti,
                issuer,
                expires_at,
            )
    return record is not None


async def prune_expired(db: Pool | Connection, now: datetime, *, keep_sessions: timedelta) -> int:
    """Delete expired sign-in state (device codes, auth requests, logout jtis) and sessions expired
    more than ``keep_sessions`` ago (with their refresh tokens); return how many rows went."""
    with _failing("prune expired rows"):
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
