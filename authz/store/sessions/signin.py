"""Sign-in at the IdP: the browser's auth requests and the verified identities awaiting approval."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from authz.store.db import Connection, Pool, failing
from authz.store.sessions._common import (
    Approval,
    ApprovalFailure,
    AuthRequest,
    AuthRequestFailure,
    VerifiedIdentity,
    _auth_request,
    _identity_from_json,
    _identity_json,
    _same,
    _transaction,
)

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
    purpose: str = "device",
) -> AuthRequest:
    """Record one redirect to the IdP, bound to the browser whose cookie hashes to ``browser_hash``;
    ``purpose`` says which sign-in the callback finishes (``device`` or ``admin``)."""
    with failing("create an auth request"):
        record = await db.fetchrow(
            "INSERT INTO auth_requests (state, browser_hash, user_code, nonce, code_verifier, created_at,"
            " expires_at, purpose) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
            state,
            browser_hash,
            user_code,
            nonce,
            code_verifier,
            now,
            now + ttl,
            purpose,
        )
    return _auth_request(record)


async def consume_auth_request(
    db: Pool | Connection, state: str, browser_hash: bytes, now: datetime
) -> AuthRequest | AuthRequestFailure:
    """Take the auth request for ``state`` once, from the browser it was made for; else why not.

    A foreign browser learns nothing about the request and does not use it up, so a forged callback
    cannot spoil the real user's sign-in.
    """
    with failing("consume an auth request"):
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
    browser_hash: bytes,
    identity: VerifiedIdentity,
    ttl: timedelta,
    now: datetime,
) -> bool:
    """Park the identity verified at the callback of ``state`` under ``approval_id`` for the approve
    POST, bound from now on to the browser whose new cookie hashes to ``browser_hash`` (the binding
    cookie is rotated at every sign-in step).

    False unless the auth request was consumed and holds no approval yet.
    """
    with failing("store an approval"):
        record = await db.fetchrow(
            "UPDATE auth_requests SET approval_id = $2, identity = $3::jsonb, approval_expires_at = $4,"
            " browser_hash = $5"
            " WHERE state = $1 AND used_at IS NOT NULL AND approval_id IS NULL RETURNING 1",
            state,
            approval_id,
            _identity_json(identity),
            now + ttl,
            browser_hash,
        )
    return record is not None


async def take_approval(
    db: Pool | Connection, approval_id: str, browser_hash: bytes, now: datetime
) -> Approval | ApprovalFailure:
    """Take the approval ``approval_id`` once, from the browser that signed in; else why not."""
    with failing("take an approval"):
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
