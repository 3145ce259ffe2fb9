"""Retention against a real PostgreSQL with an injected clock: what is past its retention goes, in
bounded batches; what is fresh stays; only one replica prunes at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from authz.configtypes import Retention
from authz.ops.retention import prune_once
from authz.store.db import Pool, connect, connect_pool
from authz.store.retention import PRUNE_LOCK_KEY, TARGET_NAMES

pytestmark = pytest.mark.integration

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
RETENTION = Retention(usage_days=400, audit_days=90, expired_session_days=7, batch_size=2)


@pytest.fixture
async def pool(clean_db: str) -> AsyncIterator[Pool]:
    """A pool on the migrated test database with every pruned table emptied."""
    pool = await connect_pool(clean_db, timeout=10)
    try:
        await pool.execute(
            "TRUNCATE usage_events, sessions, refresh_tokens, device_codes, auth_requests, audit_events,"
            " logout_jtis, service_tokens"
        )
        yield pool
    finally:
        await pool.close()


async def _usage(pool: Pool, request_id: str, started_at: datetime) -> None:
    await pool.execute(
        "INSERT INTO usage_events (request_id, started_at, ingress_format, operation, status, outcome)"
        " VALUES ($1, $2, 'bedrock', 'invoke', 200, 'complete')",
        request_id,
        started_at,
    )


async def _session(pool: Pool, session_id: str, expires_at: datetime, refresh_tokens: int) -> None:
    created = expires_at - 7 * DAY
    await pool.execute(
        "INSERT INTO sessions (id, sub, email, created_at, last_refresh_at, expires_at)"
        " VALUES ($1, 'sub', 'ada@example.com', $2, $2, $3)",
        session_id,
        created,
        expires_at,
    )
    for i in range(refresh_tokens):
        await pool.execute(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)",
            f"{session_id}-{i}".encode().ljust(32, b"."),
            session_id,
            created,
        )


async def _ids(pool: Pool, sql: str) -> list[str]:
    return sorted(str(r[0]) for r in await pool.fetch(sql))


async def test_expired_rows_pruned_and_fresh_kept_in_batches(pool: Pool) -> None:
    """At an injected "now", usage rows older than usage_days, audit events older than audit_days,
    expired sign-in state and sessions expired longer than expired_session_days (with their refresh
    tokens) are deleted two rows per statement; everything younger stays."""
    for i in range(5):
        await _usage(pool, f"old-{i}", NOW - 401 * DAY - i * timedelta(hours=1))
    await _usage(pool, "fresh", NOW - 399 * DAY)
    for i in range(3):
        await pool.execute(
            "INSERT INTO audit_events (at, kind, outcome) VALUES ($1, 'login', 'ok')", NOW - 91 * DAY
        )
    await pool.execute("INSERT INTO audit_events (at, kind, outcome) VALUES ($1, 'recent', 'ok')", NOW - DAY)
    await _session(pool, "long-expired", NOW - 8 * DAY, refresh_tokens=3)
    await _session(pool, "just-expired", NOW - DAY, refresh_tokens=1)
    await _session(pool, "live", NOW + DAY, refresh_tokens=1)
    for code, expires in (("EXPIRED1", NOW - timedelta(minutes=1)), ("PENDING1", NOW + timedelta(minutes=5))):
        await pool.execute(
            "INSERT INTO device_codes (device_code_hash, user_code, created_at, expires_at, poll_interval)"
            " VALUES ($1, $2, $3, $4, 5)",
            code.encode().ljust(32, b"."),
            code,
            expires - timedelta(minutes=10),
            expires,
        )
    await pool.execute(
        "INSERT INTO logout_jtis (jti, issuer, expires_at) VALUES ('old', 'iss', $1), ('new', 'iss', $2)",
        NOW - DAY,
        NOW + DAY,
    )

    report = await prune_once(pool, RETENTION, NOW)

    assert not report.skipped
    assert report.deleted["usage_events"] == 5 and report.batches["usage_events"] == 3
    assert report.deleted["audit_events"] == 3 and report.batches["audit_events"] == 2
    assert report.deleted["refresh_tokens"] == 3 and report.deleted["sessions"] == 1
    assert report.deleted["device_codes"] == 1 and report.deleted["logout_jtis"] == 1
    assert await _ids(pool, "SELECT request_id FROM usage_events") == ["fresh"]
    assert await _ids(pool, "SELECT kind FROM audit_events") == ["recent"]
    assert await _ids(pool, "SELECT id FROM sessions") == ["just-expired", "live"]
    assert await _ids(pool, "SELECT session_id FROM refresh_tokens") == ["just-expired", "live"]
    assert await _ids(pool, "SELECT user_code FROM device_codes") == ["PENDING1"]
    assert await _ids(pool, "SELECT jti FROM logout_jtis") == ["new"]

    again = await prune_once(pool, RETENTION, NOW)
    assert again.total == 0 and set(again.deleted) == set(TARGET_NAMES)


async def test_a_replica_holding_the_lock_makes_the_others_skip(pool: Pool, clean_db: str) -> None:
    """While another connection holds the prune lock, a round deletes nothing and says it skipped."""
    await _usage(pool, "old", NOW - 500 * DAY)
    other = await connect(clean_db, timeout=10)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", PRUNE_LOCK_KEY)
        report = await prune_once(pool, RETENTION, NOW)
        assert report.skipped and report.total == 0
        assert await _ids(pool, "SELECT request_id FROM usage_events") == ["old"]
    finally:
        await other.close()
    assert (await prune_once(pool, RETENTION, NOW)).deleted["usage_events"] == 1
