"""SQL over ``service_tokens`` (migration ``0005_service_tokens``): create, list, revoke, and the
revoked ids every replica's revocation set holds.

A revocation notifies :data:`~authz.store.sessions.REVOCATION_CHANNEL` with the token's ``sid``
(``svc:<id>``, :mod:`authz.serviceid`) in the revoking transaction, so it reaches every replica
exactly like a session's revocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from authz.serviceid import SID_PREFIX
from authz.store.db import Connection, Pool, failing
from authz.store.sessions import REVOCATION_CHANNEL


@dataclass(frozen=True, slots=True)
class ServiceToken:
    """One row of ``service_tokens`` (never the token itself)."""

    id: str
    name: str
    groups: tuple[str, ...]
    models: tuple[str, ...] | None
    created_at: datetime
    expires_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    revoked_reason: str | None

    def state(self, now: datetime) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "active"


def _row(r: Any) -> ServiceToken:
    return ServiceToken(
        id=r["id"],
        name=r["name"],
        groups=tuple(r["groups"] or ()),
        models=None if r["models"] is None else tuple(r["models"]),
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        created_by=r["created_by"],
        revoked_at=r["revoked_at"],
        revoked_reason=r["revoked_reason"],
    )


async def insert_service_token(
    db: Pool | Connection,
    *,
    token_id: str,
    name: str,
    token_hash: bytes,
    groups: Sequence[str],
    models: Sequence[str] | None,
    created_at: datetime,
    expires_at: datetime,
    created_by: str | None,
) -> ServiceToken:
    """Record a newly minted service token (by hash only)."""
    with failing("record a service token"):
        record = await db.fetchrow(
            "INSERT INTO service_tokens (id, name, token_hash, groups, models, created_at, expires_at,"
            " created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
            token_id,
            name,
            token_hash,
            list(groups),
            None if models is None else list(models),
            created_at,
            expires_at,
            created_by,
        )
    return _row(record)


async def list_service_tokens(
    db: Pool | Connection, *, name: str | None, active_only: bool, now: datetime
) -> list[ServiceToken]:
    """Service tokens, newest first: of ``name`` or all, and only active ones when ``active_only``."""
    with failing("list service tokens"):
        records = await db.fetch(
            "SELECT * FROM service_tokens WHERE ($1::text IS NULL OR name = $1)"
            " AND (NOT $2 OR (revoked_at IS NULL AND expires_at > $3))"
            " ORDER BY created_at DESC, id",
            name,
            active_only,
            now,
        )
    return [_row(r) for r in records]


async def find_service_token(
    db: Pool | Connection, *, token_id: str | None, token_hash: bytes | None
) -> ServiceToken | None:
    """The token with ``token_id`` (or whose SHA-256 is ``token_hash``), if any."""
    with failing("look up a service token"):
        record = await db.fetchrow(
            "SELECT * FROM service_tokens WHERE id = $1 OR token_hash = $2", token_id, token_hash
        )
    return None if record is None else _row(record)


async def revoke_service_tokens(
    db: Pool | Connection, *, token_id: str | None, name: str | None, reason: str, now: datetime
) -> list[ServiceToken]:
    """Revoke the active token ``token_id``, or every active token of ``name``; notify every replica
    in the same statement (so the NOTIFY is delivered if, and only if, the revocation commits)."""
    if (token_id is None) == (name is None):
        raise ValueError("name exactly one of token_id and name")
    column = "id" if token_id is not None else "name"
    sql = (
        "WITH revoked AS (UPDATE service_tokens SET revoked_at = $1, revoked_reason = $2"  # noqa: S608
        f" WHERE {column} = $3 AND revoked_at IS NULL AND expires_at > $1 RETURNING *)"
        f" SELECT revoked.*, pg_notify('{REVOCATION_CHANNEL}', '{SID_PREFIX}' || id) FROM revoked"
        " ORDER BY created_at, id"
    )
    with failing("revoke service tokens"):
        records = await db.fetch(sql, now, reason, token_id if token_id is not None else name)
    return [_row(r) for r in records]


async def revoked_service_token_sids(db: Pool | Connection, now: datetime) -> set[str]:
    """The ``sid`` (``svc:<id>``) of every revoked, unexpired service token."""
    with failing("read the revoked service tokens"):
        records = await db.fetch(
            "SELECT id FROM service_tokens WHERE revoked_at IS NOT NULL AND expires_at > $1", now
        )
    return {SID_PREFIX + r["id"] for r in records}
