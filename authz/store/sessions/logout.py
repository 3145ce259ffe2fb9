"""OIDC back-channel logouts: the logout token's ``jti`` remembered and the sessions it names
revoked, in one transaction.

A logout is written either as it arrives or later, replayed from the local journal
(:mod:`authz.store.logout_spool`) after PostgreSQL was unreachable. Each journal entry carries a
random ``entry`` id that is stored with the jti, so a second write of the same entry (its first one
committed but the file outlived it) is told apart from another logout token reusing the jti.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from authz.store.db import Connection, Pool, failing
from authz.store.sessions._common import _transaction
from authz.store.sessions.audit_log import audit
from authz.store.sessions.lifecycle import revoke_sessions_by_idp

LogoutStatus = Literal["applied", "already_applied", "replay"]


@dataclass(frozen=True, slots=True)
class LogoutResult:
    """What writing one logout did.

    ``applied``: the jti was new and ``session_ids`` were revoked now. ``already_applied``: this
    very entry was written before (nothing more to do). ``replay``: another logout token with the
    same jti and issuer was acted on before (Back-Channel Logout 1.0, §2.6 step 7).
    """

    status: LogoutStatus
    session_ids: tuple[str, ...] = ()


async def record_backchannel_logout(
    db: Pool | Connection,
    *,
    entry: str,
    issuer: str,
    jti: str,
    jti_expires_at: datetime,
    sub: str | None,
    idp_sid: str | None,
    accepted_at: datetime,
    reason: str,
    now: datetime,
    client_ip: str | None = None,
    user_agent: str | None = None,
    detail: dict[str, Any] | None = None,
) -> LogoutResult:
    """Remember ``jti`` (until ``jti_expires_at``, when the token could no longer pass validation),
    revoke the sessions the logout names (of a logout by ``sub`` alone, those signed in by
    ``accepted_at``), notify every replica and write the ``backchannel_logout`` audit row (with
    ``detail`` added to it); all or nothing. Expired jtis are pruned on the way."""
    with failing("record a back-channel logout"):
        async with _transaction(db) as conn:
            await conn.execute("DELETE FROM logout_jtis WHERE expires_at <= $1", now)
            inserted = await conn.fetchrow(
                "INSERT INTO logout_jtis (jti, issuer, expires_at, entry) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (issuer, jti) DO NOTHING RETURNING 1",
                jti,
                issuer,
                jti_expires_at,
                entry,
            )
            if inserted is None:
                # The row lock taken by the conflicting insert makes a concurrent writer of the same
                # entry wait for this one's commit, so the entry read here is final.
                seen = await conn.fetchval(
                    "SELECT entry FROM logout_jtis WHERE issuer = $1 AND jti = $2", issuer, jti
                )
                return LogoutResult("already_applied" if seen == entry else "replay")
            revoked = await revoke_sessions_by_idp(
                conn, sub=sub, idp_sid=idp_sid, reason=reason, now=now, signed_in_by=accepted_at
            )
            await audit(
                conn,
                kind="backchannel_logout",
                outcome="ok",
                session_id=revoked[0] if len(revoked) == 1 else None,
                client_ip=client_ip,
                user_agent=user_agent,
                detail={"sessions": len(revoked), "by": "sid" if idp_sid else "sub", **(detail or {})},
                now=now,
            )
    return LogoutResult("applied", tuple(revoked))
