"""SQL over the session tables (migration ``0002_sessions``): device flow, sign-in, sessions, audit.

Plain async functions over an asyncpg pool or connection. Each does one job, in one transaction
where the job reads and then writes, and returns frozen dataclasses. The clock is passed in
(``now``, an aware datetime) so that every replica and every test agrees on what it compares.
Secrets arrive already hashed (SHA-256 of the opaque token) or sealed (:mod:`authz.signin.secretbox`).

Every revocation runs ``pg_notify('gateway_revocations', <session id>)`` in the revoking
transaction, so the notification is delivered when, and only if, the revocation commits;
:mod:`authz.signin.revocation` listens for it. Database failures raise :class:`~authz.errors.StoreError`.

The functions live in submodules by concern and are re-exported here, so callers import them from
this package: :mod:`~authz.store.sessions.device` (the device flow),
:mod:`~authz.store.sessions.signin` (the browser's round trip to the IdP),
:mod:`~authz.store.sessions.lifecycle` (sessions, refresh tokens, revocation),
:mod:`~authz.store.sessions.logout` (back-channel logouts and their jti replay check) and
:mod:`~authz.store.sessions.audit_log` (audit events, pruning).
"""

from authz.store.sessions._common import (
    Approval,
    ApprovalFailure,
    AuditEvent,
    AuthRequest,
    AuthRequestFailure,
    DeviceCode,
    DeviceStatus,
    PollError,
    PollResult,
    RotateResult,
    Session,
    VerifiedIdentity,
    hash_token,
    new_opaque_token,
    new_session_id,
)
from authz.store.sessions.audit_log import (
    audit,
    audit_since,
    prune_expired,
    recent_audit,
)
from authz.store.sessions.device import (
    SLOW_DOWN_STEP,
    approve_device,
    create_device_code,
    deny_device,
    find_device_by_user_code,
    poll_device,
)
from authz.store.sessions.lifecycle import (
    REFRESH_TOKEN_REUSE,
    REVOCATION_CHANNEL,
    create_session,
    get_session,
    issue_refresh_token,
    list_sessions,
    revoke_session,
    revoke_sessions_by_idp,
    revoke_sessions_for_user,
    revoked_session_ids,
    rotate_refresh_token,
    session_id_for_refresh_token,
    update_session_after_refresh,
)
from authz.store.sessions.logout import LogoutResult, LogoutStatus, record_backchannel_logout
from authz.store.sessions.signin import (
    consume_auth_request,
    create_auth_request,
    store_approval,
    take_approval,
)

__all__ = [
    "REFRESH_TOKEN_REUSE",
    "REVOCATION_CHANNEL",
    "SLOW_DOWN_STEP",
    "Approval",
    "ApprovalFailure",
    "AuditEvent",
    "AuthRequest",
    "AuthRequestFailure",
    "DeviceCode",
    "DeviceStatus",
    "LogoutResult",
    "LogoutStatus",
    "PollError",
    "PollResult",
    "RotateResult",
    "Session",
    "VerifiedIdentity",
    "approve_device",
    "audit",
    "audit_since",
    "consume_auth_request",
    "create_auth_request",
    "create_device_code",
    "create_session",
    "deny_device",
    "find_device_by_user_code",
    "get_session",
    "hash_token",
    "issue_refresh_token",
    "list_sessions",
    "new_opaque_token",
    "new_session_id",
    "poll_device",
    "prune_expired",
    "recent_audit",
    "record_backchannel_logout",
    "revoke_session",
    "revoke_sessions_by_idp",
    "revoke_sessions_for_user",
    "revoked_session_ids",
    "rotate_refresh_token",
    "session_id_for_refresh_token",
    "store_approval",
    "take_approval",
    "update_session_after_refresh",
]
