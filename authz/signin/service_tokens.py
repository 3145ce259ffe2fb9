"""Service identities: ``authz service-tokens create|list|revoke``.

A CI job or a batch agent has no person to sign in. An administrator creates a token for it: a
gateway access token (:func:`authz.signin.tokens.mint`) whose ``sub`` is ``service:NAME`` and whose
``sid`` is ``svc:<id>`` (:mod:`authz.serviceid`), with the groups the policies match on, optionally
limited to some model patterns (the ``models`` claim, intersected with the policy's models), and a
lifetime of at most ``service_tokens.max_ttl``. ext_authz verifies it like any access token, with
no database round trip; its SHA-256 and attributes are stored in ``service_tokens``; revoking it
notifies every replica's revocation set; creation and revocation are audited; the usage rows of
its requests name the service identity.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from authz.configtypes import GatewayConfig
from authz.errors import GatewayError
from authz.serviceid import service_sid, service_sub
from authz.signin.tokens import KeySet, mint
from authz.store.db import Pool
from authz.store.migrate import open_migrated_pool
from authz.store.service_tokens import (
    ServiceToken,
    find_service_token,
    insert_service_token,
    list_service_tokens,
    revoke_service_tokens,
)
from authz.store.sessions import audit
from authz.store.sessions.audit_log import operator

AUDIT_CREATE = "service_token_create"
AUDIT_REVOKE = "service_token_revoke"

# Lower-case names that read well in usage reports and in a `sub` claim: letters, digits, and
# . _ - inside, at most 64 characters.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class Created:
    """A new service token: the token itself (shown once) and its row."""

    token: str
    row: ServiceToken


def validate_request(
    config: GatewayConfig, *, name: str, groups: Sequence[str], models: Sequence[str] | None, ttl: int
) -> None:
    """Refuse a bad name, no groups, an empty model pattern, or a lifetime over the maximum."""
    if not _NAME.fullmatch(name):
        raise GatewayError(
            f"--name {name!r}: use lower-case letters, digits, '.', '_' or '-' (at most 64 characters)"
        )
    if not groups or any(not g for g in groups):
        raise GatewayError("--groups: name at least one group; policies admit service identities by group")
    if models is not None and (not models or any(not m for m in models)):
        raise GatewayError("--models: give comma-separated model patterns such as claude-haiku-*")
    maximum = config.service_tokens.max_ttl
    if ttl <= 0:
        raise GatewayError("--ttl must be a positive number of seconds")
    if ttl > maximum:
        raise GatewayError(
            f"--ttl {ttl} exceeds service_tokens.max_ttl ({maximum} seconds); create a shorter-lived "
            "token and rotate it, or raise service_tokens.max_ttl in the configuration"
        )


async def create_service_token(
    pool: Pool,
    config: GatewayConfig,
    keyset: KeySet,
    *,
    name: str,
    groups: Sequence[str],
    models: Sequence[str] | None,
    ttl: int,
    now: datetime,
    created_by: str,
) -> Created:
    """Mint, record (by hash) and audit a service token."""
    validate_request(config, name=name, groups=groups, models=models, ttl=ttl)
    token_id = secrets.token_urlsafe(16)
    token = mint(
        keyset,
        issuer=config.sessions.issuer,
        audience=config.sessions.audience,
        sub=service_sub(name),
        email="",
        groups=groups,
        sid=service_sid(token_id),
        ttl=ttl,
        now=now.timestamp(),
        jti=token_id,
        models=models,
    )
    issued = datetime.fromtimestamp(int(now.timestamp()), UTC)
    async with pool.acquire() as conn, conn.transaction():
        row = await insert_service_token(
            conn,
            token_id=token_id,
            name=name,
            token_hash=hashlib.sha256(token.encode("utf-8")).digest(),
            groups=groups,
            models=models,
            created_at=issued,
            expires_at=issued + timedelta(seconds=ttl),
            created_by=created_by,
        )
        await audit(
            conn,
            kind=AUDIT_CREATE,
            outcome="ok",
            session_id=service_sid(token_id),
            detail={
                "by": created_by,
                "name": name,
                "id": token_id,
                "groups": list(groups),
                "models": None if models is None else list(models),
                "ttl": ttl,
            },
            now=now,
        )
    return Created(token, row)


async def revoke(
    pool: Pool, *, token_id: str | None, name: str | None, reason: str, now: datetime, revoked_by: str
) -> list[ServiceToken]:
    """Revoke one token (by id) or every active token of a service identity, auditing each."""
    async with pool.acquire() as conn, conn.transaction():
        revoked = await revoke_service_tokens(conn, token_id=token_id, name=name, reason=reason, now=now)
        for row in revoked:
            await audit(
                conn,
                kind=AUDIT_REVOKE,
                outcome="ok",
                reason=reason,
                session_id=service_sid(row.id),
                detail={"by": revoked_by, "name": row.name, "id": row.id},
                now=now,
            )
    return revoked


# --- the commands --------------------------------------------------------------------------------


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


async def create_command(
    config: GatewayConfig, *, name: str, groups: str, models: str | None, ttl: int
) -> int:
    """Create a token; print it alone on stdout (for a secret store) and what it is on stderr."""
    group_list = _split(groups) or ()
    model_list = _split(models)
    validate_request(config, name=name, groups=group_list, models=model_list, ttl=ttl)
    if config.sessions.signing_key is None:
        raise GatewayError("sessions.signing_key is not configured: cannot issue service tokens")
    keyset = KeySet.from_config(config.sessions)
    pool = await open_migrated_pool(config.store, "service tokens")
    try:
        created = await create_service_token(
            pool,
            config,
            keyset,
            name=name,
            groups=group_list,
            models=model_list,
            ttl=ttl,
            now=datetime.now(UTC),
            created_by=operator(),
        )
    finally:
        await pool.close()
    row = created.row
    limit = ", models " + ",".join(row.models) if row.models is not None else ""
    print(
        f"Created service token {row.id} for {row.name} (groups {','.join(row.groups)}{limit}), "
        f"valid until {_when(row.expires_at)} UTC. It is shown once: store it now.",
        file=sys.stderr,
    )
    print(created.token)
    return 0


def format_tokens(rows: Sequence[ServiceToken], now: datetime) -> str:
    """A table of service tokens for a terminal, times in UTC."""
    if not rows:
        return "No service tokens.\n"
    lines = [f"{'id':24}  {'name':24} {'groups':20} {'models':20} {'created':16}  {'expires':16}  state"]
    for r in rows:
        models = ",".join(r.models) if r.models is not None else "(policy)"
        state = r.state(now)
        if r.revoked_at is not None:
            state = f"revoked {_when(r.revoked_at)}: {r.revoked_reason or '-'}"
        lines.append(
            f"{r.id:24}  {r.name[:24]:24} {','.join(r.groups)[:20]:20} {models[:20]:20} "
            f"{_when(r.created_at):16}  {_when(r.expires_at):16}  {state}"
        )
    return "\n".join(lines) + "\n"


async def list_command(config: GatewayConfig, *, name: str | None, include_inactive: bool) -> int:
    """Print the service tokens (active ones unless ``include_inactive``)."""
    now = datetime.now(UTC)
    pool = await open_migrated_pool(config.store, "service tokens")
    try:
        rows = await list_service_tokens(pool, name=name, active_only=not include_inactive, now=now)
    finally:
        await pool.close()
    print(format_tokens(rows, now), end="")
    return 0


async def revoke_command(
    config: GatewayConfig, *, token_id: str | None, name: str | None, token: str | None, reason: str
) -> int:
    """Revoke by id, by name (every active token), or by the token itself; 1 if nothing matched."""
    if sum(x is not None for x in (token_id, name, token)) != 1:
        raise GatewayError("name exactly one of --id, --name and --token")
    now = datetime.now(UTC)
    pool = await open_migrated_pool(config.store, "service tokens")
    try:
        if token is not None:
            found = await find_service_token(
                pool, token_id=None, token_hash=hashlib.sha256(token.strip().encode("utf-8")).digest()
            )
            if found is None:
                print("authz: that token is not a service token of this gateway", file=sys.stderr)
                return 1
            token_id = found.id
        revoked = await revoke(
            pool, token_id=token_id, name=name, reason=reason, now=now, revoked_by=operator()
        )
    finally:
        await pool.close()
    if not revoked:
        which = f"token {token_id}" if token_id is not None else f"service identity {name}"
        print(
            f"authz: no active service token matches {which}; `authz service-tokens list --all` shows them",
            file=sys.stderr,
        )
        return 1
    for row in revoked:
        print(f"Revoked service token {row.id} of {row.name}")
    return 0
