"""What the session store's submodules share: the row dataclasses, token helpers, row converters,
and the error and transaction wrappers every query runs under.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg

from authz.store.db import Connection, Pool

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
    purpose: str = "device"
    """``device`` (the device flow's sign-in) or ``admin`` (the admin page's)."""


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
        purpose=r["purpose"],
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
