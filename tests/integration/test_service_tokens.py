"""Service tokens against a real PostgreSQL: stored hashed, capped lifetime, audited, and revoked
into every replica's revocation set (LISTEN/NOTIFY and resync)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from authz.configtypes import GatewayConfig, ServiceTokens, Sessions, Store
from authz.errors import GatewayError
from authz.signin.revocation import RevocationSet, RevocationWatcher
from authz.signin.service_tokens import AUDIT_CREATE, AUDIT_REVOKE, create_service_token, revoke
from authz.signin.tokens import KeySet, TokenVerifier, generate_signing_key
from authz.store.db import Pool, connect_pool
from authz.store.service_tokens import list_service_tokens, revoked_service_token_sids
from tests.integration.test_revocation import wait_for

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = 24 * 3600


@pytest.fixture
async def pool(clean_db: str) -> AsyncIterator[Pool]:
    """A pool on the migrated database with no service tokens and no audit rows."""
    pool = await connect_pool(clean_db, timeout=10)
    try:
        await pool.execute("TRUNCATE service_tokens, audit_events")
        yield pool
    finally:
        await pool.close()


def _config(dsn: str) -> GatewayConfig:
    return GatewayConfig(
        sessions=Sessions(issuer="https://gw.test", signing_key=generate_signing_key("k1")),
        store=Store(url=dsn),
        service_tokens=ServiceTokens(max_ttl=7 * DAY),
    )


async def test_created_token_verifies_is_stored_hashed_and_audited(pool: Pool, clean_db: str) -> None:
    """A created token verifies as the service identity with its groups and models; the database
    holds its SHA-256 but not the token; an audit row records who created what."""
    config = _config(clean_db)
    keyset = KeySet.from_config(config.sessions)
    created = await create_service_token(
        pool,
        config,
        keyset,
        name="ci-nightly",
        groups=("ci",),
        models=("claude-haiku-*",),
        ttl=DAY,
        now=NOW,
        created_by="ops",
    )
    verifier = TokenVerifier(keyset, issuer="https://gw.test", audience="claude-gateway", clock_skew=0)
    claims = verifier.verify(created.token, NOW.timestamp())
    assert (claims.service, claims.groups, claims.models) == ("ci-nightly", ("ci",), ("claude-haiku-*",))
    assert claims.sid == f"svc:{created.row.id}" and claims.exp - claims.iat == DAY
    stored = await pool.fetchrow("SELECT * FROM service_tokens")
    assert bytes(stored["token_hash"]) == hashlib.sha256(created.token.encode()).digest()
    assert created.token not in {str(v) for v in dict(stored).values()}
    assert stored["expires_at"] == NOW + timedelta(seconds=DAY)
    audit = await pool.fetchrow("SELECT * FROM audit_events WHERE kind = $1", AUDIT_CREATE)
    assert audit["session_id"] == claims.sid and '"by": "ops"' in audit["detail"]
    assert [t.name for t in await list_service_tokens(pool, name=None, active_only=True, now=NOW)] == [
        "ci-nightly"
    ]


async def test_a_lifetime_over_the_maximum_is_refused(pool: Pool, clean_db: str) -> None:
    """--ttl over service_tokens.max_ttl is refused naming the setting, and nothing is stored."""
    config = _config(clean_db)
    with pytest.raises(GatewayError, match=r"service_tokens\.max_ttl"):
        await create_service_token(
            pool,
            config,
            KeySet.from_config(config.sessions),
            name="ci",
            groups=("ci",),
            models=None,
            ttl=7 * DAY + 1,
            now=NOW,
            created_by="ops",
        )
    assert await pool.fetchval("SELECT count(*) FROM service_tokens") == 0
    assert await pool.fetchval("SELECT count(*) FROM audit_events") == 0


async def test_revocation_reaches_a_watching_replica_and_is_audited(pool: Pool, clean_db: str) -> None:
    """Revoking every token of a service identity puts their sids into a running watcher's set
    (NOTIFY) and into the resync query, with an audit row per token; other tokens stay valid."""
    config = _config(clean_db)
    keyset = KeySet.from_config(config.sessions)

    async def make(name: str) -> str:
        created = await create_service_token(
            pool, config, keyset, name=name, groups=("ci",), models=None, ttl=DAY, now=NOW, created_by="ops"
        )
        return f"svc:{created.row.id}"

    first, second, other = await make("batch"), await make("batch"), await make("other")
    watcher = RevocationWatcher(RevocationSet(), timeout=2.0, keepalive_interval=0.5)
    assert await watcher.start(clean_db, resync_interval=60)
    try:
        revoked = await revoke(pool, token_id=None, name="batch", reason="rotated", now=NOW, revoked_by="ops")
        assert len(revoked) == 2
        revoked_set = watcher.revocations
        await wait_for(lambda: revoked_set.is_revoked(first) and revoked_set.is_revoked(second), within=5)
        assert not watcher.revocations.is_revoked(other)
    finally:
        await watcher.aclose()
    assert await revoked_service_token_sids(pool, NOW) == {first, second}
    rows = await pool.fetch("SELECT session_id, reason FROM audit_events WHERE kind = $1", AUDIT_REVOKE)
    assert sorted((r["session_id"], r["reason"]) for r in rows) == sorted(
        [(first, "rotated"), (second, "rotated")]
    )
    again = await revoke(pool, token_id=None, name="batch", reason="again", now=NOW, revoked_by="ops")
    assert again == []
