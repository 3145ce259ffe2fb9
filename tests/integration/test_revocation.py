"""The revocation set kept current from PostgreSQL: NOTIFY, periodic resync, and surviving a lost database."""

from __future__ import annotations

import asyncio
import functools
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from authz.errors import GatewayError, StoreError
from authz.signin.revocation import RevocationSet, RevocationWatcher
from authz.store import sessions as store
from authz.store.db import Pool, connect, connect_pool
from authz.store.embedded import EmbeddedPostgres
from authz.store.migrate import migrate

pytestmark = pytest.mark.integration

TABLES = "sessions, refresh_tokens, device_codes, auth_requests, audit_events, logout_jtis"


def now() -> datetime:
    return datetime.now(UTC)


async def wait_for(check: Callable[[], bool], within: float) -> float:
    """Seconds until ``check()`` holds; fail after ``within`` seconds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def add_session(db: Pool, session_id: str) -> None:
    """An active session, signed in now and living a day."""
    await store.create_session(
        db,
        session_id=session_id,
        sub="00u-ada",
        email="ada@example.com",
        groups=("eng",),
        idp_sid=None,
        idp_refresh_token_enc=None,
        surface=None,
        user_agent=None,
        lifetime=timedelta(days=1),
        now=now(),
        refresh_token_hash=None,
    )


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@pytest.fixture
async def pool(clean_db: str) -> AsyncIterator[Pool]:
    """A pool on the migrated test database with every session table emptied."""
    pool = await connect_pool(clean_db, timeout=10)
    try:
        await pool.execute(f"TRUNCATE {TABLES}")
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def watcher() -> AsyncIterator[Callable[[], RevocationWatcher]]:
    """Builds watchers with short timeouts and closes each at the end of the test."""
    made: list[RevocationWatcher] = []

    def make() -> RevocationWatcher:
        w = RevocationWatcher(RevocationSet(), timeout=2.0, keepalive_interval=0.5, backoff_max=0.5)
        made.append(w)
        return w

    yield make
    for w in made:
        await w.aclose()


# --- the set itself -----------------------------------------------------------------------------------


def test_the_set_answers_membership_and_is_replaced_whole() -> None:
    """add marks one id revoked; replace makes the given ids the whole set."""
    revoked = RevocationSet(["a"])
    assert revoked.is_revoked("a") and not revoked.is_revoked("b")
    revoked.add("b")
    assert revoked.is_revoked("b") and len(revoked) == 2
    revoked.replace(["c"])
    assert (revoked.is_revoked("a"), revoked.is_revoked("b"), revoked.is_revoked("c")) == (False, False, True)


# --- against the shared server ----------------------------------------------------------------------


async def test_start_loads_the_revocations_already_committed(
    pool: Pool, clean_db: str, watcher: Callable[[], RevocationWatcher]
) -> None:
    """start() returns after a full resync, so sessions revoked earlier are refused from the first request."""
    await add_session(pool, "old-revoked")
    await add_session(pool, "live")
    assert await store.revoke_session(pool, "old-revoked", "admin_revoke", now())
    w = watcher()
    assert await w.start(clean_db, resync_interval=3600)
    assert w.revocations.is_revoked("old-revoked")
    assert not w.revocations.is_revoked("live")
    assert w.connected
    with pytest.raises(GatewayError):
        await w.start(clean_db, resync_interval=3600)


async def test_a_revocation_committed_on_another_connection_is_seen_within_two_seconds(
    pool: Pool, clean_db: str, watcher: Callable[[], RevocationWatcher]
) -> None:
    """With resync far away, NOTIFY alone brings each revocation to is_revoked within 2 seconds of commit."""
    for i in range(3):
        await add_session(pool, f"s{i}")
    w = watcher()
    assert await w.start(clean_db, resync_interval=3600)
    for i in range(3):
        await store.revoke_session(pool, f"s{i}", "admin_revoke", now())
        assert await wait_for(functools.partial(w.revocations.is_revoked, f"s{i}"), within=2.0) < 2.0
    revoked = await store.revoke_sessions_for_user(pool, "ada@example.com", "admin_revoke", now())
    assert revoked == []  # all three were already revoked
    assert w.resyncs == 1


async def test_a_periodic_resync_catches_a_revocation_whose_notification_was_lost(
    pool: Pool, clean_db: str, watcher: Callable[[], RevocationWatcher]
) -> None:
    """A revocation written without NOTIFY still reaches the set at the next periodic resync."""
    await add_session(pool, "silent")
    w = watcher()
    assert await w.start(clean_db, resync_interval=0.3)
    await pool.execute(
        "UPDATE sessions SET revoked_at = $2, revoked_reason = 'test' WHERE id = $1", "silent", now()
    )
    await wait_for(lambda: w.revocations.is_revoked("silent"), within=3.0)


async def test_a_start_against_an_unreachable_database_returns_and_keeps_trying(
    tmp_path: Path, watcher: Callable[[], RevocationWatcher]
) -> None:
    """start() gives up waiting after first_sync_timeout and reports False; aclose() still ends cleanly."""
    w = watcher()
    dsn = f"postgresql://postgres@/postgres?host={tmp_path}"
    started = time.monotonic()
    assert not await w.start(dsn, resync_interval=1, first_sync_timeout=0.5)
    assert time.monotonic() - started < 2
    assert not w.connected and w.resyncs == 0
    await w.aclose()


@pytest.fixture
async def own_database(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database on the shared server, which a test may close to new connections."""
    name = f"t_{secrets.token_hex(6)}"
    admin = await connect(pg_dsn, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(pg_dsn, name)
        conn = await connect(dsn, timeout=10)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_a_resync_after_reconnecting_picks_up_revocations_made_while_disconnected(
    pg_dsn: str, own_database: str, watcher: Callable[[], RevocationWatcher]
) -> None:
    """Revoked while the watcher's connection was down (its NOTIFY lost): seen right after it reconnects."""
    name = urlsplit(own_database).path.lstrip("/")
    db = await connect_pool(own_database, timeout=10)
    admin = await connect(pg_dsn, timeout=10)
    try:
        await add_session(db, "before")
        await add_session(db, "during")
        w = watcher()
        assert await w.start(own_database, resync_interval=3600)
        await store.revoke_session(db, "before", "admin_revoke", now())
        await wait_for(lambda: w.revocations.is_revoked("before"), within=2.0)

        # Cut the watcher off and keep it off: no new connections to the database, its own killed.
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name = 'authz-revocations'",
            name,
        )
        assert killed == 1
        await wait_for(lambda: not w.connected, within=2.0)
        # The pool's connection predates the lock-out, so this revocation commits; its NOTIFY has no
        # listener.
        assert await store.revoke_session(db, "during", "admin_revoke", now())
        await asyncio.sleep(0.5)
        assert not w.revocations.is_revoked("during")
        assert w.revocations.is_revoked("before")  # the last known set stays in force

        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await wait_for(lambda: w.revocations.is_revoked("during"), within=3.0)
        assert w.connected and w.resyncs == 2
    finally:
        await admin.close()
        await db.close()


# --- against a server that is stopped and started again -----------------------------------------------


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A server of our own that the restart test may stop and start again."""
    # Outside pytest's basetemp for the reason given in conftest.pg_dsn.
    base = Path(tempfile.mkdtemp(prefix="authz-pg-"))
    server = EmbeddedPostgres()
    try:
        server.start(base / "data")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def connect_pool_when_up(dsn: str, within: float = 30.0) -> Pool:
    """A pool on ``dsn`` as soon as the server accepts connections."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await connect_pool(dsn, timeout=2)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_revocations_still_arrive_after_postgres_restarts(
    own_pg: EmbeddedPostgres, watcher: Callable[[], RevocationWatcher]
) -> None:
    """The watcher keeps its set while the server is down, then reconnects and sees new revocations."""
    dsn = own_pg.dsn
    conn = await connect(dsn, timeout=10)
    try:
        await migrate(conn)
        await conn.execute(f"TRUNCATE {TABLES}")
    finally:
        await conn.close()
    db = await connect_pool(dsn, timeout=10)
    try:
        for sid in ("before", "after-restart", "after-reconnect"):
            await add_session(db, sid)
        w = watcher()
        assert await w.start(dsn, resync_interval=3600)
        await store.revoke_session(db, "before", "admin_revoke", now())
        await wait_for(lambda: w.revocations.is_revoked("before"), within=2.0)
    finally:
        await db.close()

    own_pg.stop_server()
    try:
        await wait_for(lambda: not w.connected, within=5.0)
        await asyncio.sleep(0.5)
        assert w.revocations.is_revoked("before")
    finally:
        own_pg.start_again()

    db = await connect_pool_when_up(dsn)
    try:
        # Committed as soon as the server is back: seen by NOTIFY or by the reconnect's resync.
        await store.revoke_session(db, "after-restart", "admin_revoke", now())
        await wait_for(lambda: w.revocations.is_revoked("after-restart"), within=5.0)
        await wait_for(lambda: w.connected, within=5.0)
        await store.revoke_session(db, "after-reconnect", "admin_revoke", now())
        assert await wait_for(lambda: w.revocations.is_revoked("after-reconnect"), within=2.0) < 2.0
        assert w.revocations.is_revoked("before")
    finally:
        await db.close()
