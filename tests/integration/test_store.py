"""The store against a real PostgreSQL: migrations, the ledger's batching, and surviving outages."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from authz.configtypes import Store
from authz.errors import StoreError
from authz.store.db import connect, connect_pool, redact_url
from authz.store.embedded import EmbeddedPostgres
from authz.store.ledger import Ledger
from authz.store.migrate import migrate, migrations
from authz.store.queries import recent_usage
from authz.store.spool import Spool
from authz.store.usagerow import UsageRow

pytestmark = pytest.mark.integration


def make_row(i: int, **changes: object) -> UsageRow:
    row = UsageRow(
        request_id=f"req-{i:06d}",
        started_at=datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC) + timedelta(seconds=i),
        user_sub="00u1abcd",
        user_email="ada@example.com",
        groups=("eng", "platform-admins"),
        session_id="sess-1",
        cc_session_id="8c1f0d3e-cc",
        agent_id="agent-2",
        parent_agent_id="agent-1",
        user_agent="claude-cli/2.1.0 (external, cli)",
        ingress_format="bedrock",
        operation="stream",
        upstream="bedrock-us",
        policy=None,
        requested_model="us.anthropic.claude-opus-5-5",
        upstream_model="us.anthropic.claude-opus-5-5-20260101-v1:0",
        status=200,
        outcome="complete",
        reason=None,
        input_tokens=1200,
        input_tokens_estimated=False,
        output_tokens=345,
        output_tokens_estimated=False,
        cache_write_tokens=3000,
        cache_write_5m_tokens=1000,
        cache_write_1h_tokens=2000,
        cache_read_tokens=45000,
        cost_usd=Decimal("0.04567891"),
        latency_ms=1234.5,
        ttfb_ms=321.125,
    )
    return replace(row, **changes)  # type: ignore[arg-type]


def settings(url: str, spool_dir: Path, **changes: object) -> Store:
    base = Store(
        url=url,
        spool_dir=str(spool_dir),
        batch_size=50,
        flush_interval=0.05,
        replay_interval=0.2,
        connect_timeout=2.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def count(dsn: str, sql: str = "SELECT count(*) FROM usage_events") -> int:
    conn = await connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Poll ``check`` until it is true or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def migrated(dsn: str) -> None:
    conn = await connect(dsn, timeout=10)
    try:
        await migrate(conn)
    finally:
        await conn.close()


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A server of our own that the outage tests may stop and start again."""
    # Outside pytest's basetemp for the reason given in conftest.pg_dsn.
    base = Path(tempfile.mkdtemp(prefix="authz-pg-"))
    server = EmbeddedPostgres()
    try:
        server.start(base / "data")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def own_db(own_pg: EmbeddedPostgres) -> AsyncIterator[str]:
    """A fresh database on the stoppable server; the server is running again when the test ends."""
    name = f"t_{secrets.token_hex(6)}"
    admin = await connect(own_pg.dsn, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(own_pg.dsn, name)
    finally:
        try:
            conn = await connect(own_pg.dsn, timeout=2)
        except StoreError:
            own_pg.start_again()
        else:
            await conn.close()


# --- migrations -----------------------------------------------------------------------------------


async def test_migrations_apply_once_and_are_idempotent(fresh_db: str) -> None:
    """The first migrate() applies every migration; a second one applies nothing."""
    conn = await connect(fresh_db, timeout=10)
    try:
        shipped = [version for version, _ in migrations()]
        assert shipped[0] == "0001_usage"
        assert await migrate(conn) == shipped
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(shipped)
        assert await conn.fetchval("SELECT to_regclass('usage_events') IS NOT NULL")
    finally:
        await conn.close()


async def test_concurrent_migrations_from_several_replicas_apply_each_migration_once(fresh_db: str) -> None:
    """Six connections migrating at once all succeed and between them apply each migration exactly once."""
    conns = [await connect(fresh_db, timeout=10) for _ in range(6)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        shipped = [version for version, _ in migrations()]
        assert sorted(results) == [[]] * 5 + [shipped]
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == shipped
        # Every advisory lock was released.
        assert await conns[0].fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        for c in conns:
            await c.close()


async def test_connect_errors_are_store_errors_without_the_password(tmp_path: Path) -> None:
    """An unreachable server raises StoreError whose message hides the password."""
    url = f"postgresql://gw:s3cr3t-pw@/postgres?host={tmp_path}"
    with pytest.raises(StoreError) as info:
        await connect_pool(url, timeout=1)
    assert "s3cr3t-pw" not in str(info.value)
    assert "gw:***@" in str(info.value)
    assert redact_url("postgresql://gw:pw@db:5432/x") == "postgresql://gw:***@db:5432/x"


# --- the ledger against a healthy server ----------------------------------------------------------


async def test_rows_round_trip_exactly_through_the_ledger(clean_db: str, tmp_path: Path) -> None:
    """Every column written by the ledger reads back equal, nulls and non-ASCII text included."""
    full = make_row(1, reason="upstream said: Input is too long.", user_email="zoë@example.com")
    sparse = make_row(
        2,
        user_sub=None,
        user_email=None,
        groups=(),
        session_id=None,
        cc_session_id=None,
        agent_id=None,
        parent_agent_id=None,
        user_agent=None,
        ingress_format="messages",
        operation="count_tokens",
        upstream=None,
        policy=None,
        requested_model=None,
        upstream_model=None,
        status=403,
        outcome="denied",
        reason="model not allowed",
        input_tokens=0,
        input_tokens_estimated=False,
        output_tokens=0,
        output_tokens_estimated=True,
        cache_write_tokens=0,
        cache_write_5m_tokens=0,
        cache_write_1h_tokens=0,
        cache_read_tokens=0,
        cost_usd=Decimal(0),
        latency_ms=None,
        ttfb_ms=None,
    )
    ledger = Ledger(settings(clean_db, tmp_path))
    await ledger.start()
    ledger.record(full)
    ledger.record(sparse)
    await ledger.flush()
    await ledger.aclose()
    pool = await connect_pool(clean_db, timeout=10)
    try:
        assert await recent_usage(pool) == [sparse, full]
        groups = await pool.fetchval("SELECT groups FROM usage_events WHERE request_id = $1", full.request_id)
        assert groups == ["eng", "platform-admins"]
    finally:
        await pool.close()
    assert (ledger.rows_written, ledger.rows_spooled) == (2, 0)


async def test_batching_writes_many_rows_without_waiting_for_the_interval(
    clean_db: str, tmp_path: Path
) -> None:
    """A full batch wakes the flusher early, and 1000 rows arrive in batches of batch_size."""
    ledger = Ledger(settings(clean_db, tmp_path, batch_size=100, flush_interval=30.0))
    await ledger.start()
    try:
        for i in range(1000):
            ledger.record(make_row(i))
        # Far sooner than the 30-second interval: full batches trigger the flush.
        await eventually(lambda: _equals(count(clean_db), 1000), within=10)
        assert ledger.rows_written == 1000
        assert ledger.pending == 0
    finally:
        await ledger.aclose()
    assert not os.listdir(tmp_path)


async def test_refused_rows_are_set_aside_and_the_rest_of_the_batch_is_written(
    clean_db: str, tmp_path: Path
) -> None:
    """A row PostgreSQL refuses goes to a rejected file; its batch-mates are still written."""
    bad = make_row(5, cost_usd=Decimal("1e12"))  # overflows numeric(18, 8)
    ledger = Ledger(settings(clean_db, tmp_path))
    await ledger.start()
    for i in range(10):
        ledger.record(bad if i == 5 else make_row(i))
    await ledger.aclose()
    assert await count(clean_db) == 9
    assert (ledger.rows_written, ledger.rows_rejected) == (9, 1)
    [rejected] = [tmp_path / n for n in os.listdir(tmp_path) if n.startswith("rejected-")]
    assert Spool(tmp_path).read(rejected) == [bad]
    assert Spool(tmp_path).segments() == []


# --- outages ----------------------------------------------------------------------------------------


async def test_a_hung_insert_times_out_and_the_batch_is_spooled(clean_db: str, tmp_path: Path) -> None:
    """A batch stuck behind a lock hits the batch timeout and is spooled; nothing wedges or doubles."""
    ledger = Ledger(settings(clean_db, tmp_path), batch_timeout=0.5)
    await ledger.start()
    locker = await connect(clean_db, timeout=10)
    try:
        ledger.record(make_row(0))
        await ledger.flush()
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
        for i in range(1, 21):
            ledger.record(make_row(i))
        async with asyncio.timeout(5):
            await ledger.flush()
        assert ledger.rows_spooled >= 20
        assert ledger.pending == 0
        await lock.rollback()
        await eventually(lambda: _equals(count(clean_db), 21))
        # Every segment, the open one included, is sealed and replayed.
        await eventually(lambda: _is(not [n for n in os.listdir(tmp_path) if n.startswith("seg-")]))
        assert ledger.rows_replayed == ledger.rows_spooled
    finally:
        await locker.close()
        await ledger.aclose()
    # A timed-out insert may still have committed server-side: the replay must not double it.
    assert await count(clean_db, "SELECT count(DISTINCT request_id) FROM usage_events") == 21
    assert await count(clean_db) == 21


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_outage_spools_rows_and_replays_them_when_postgres_returns(
    own_pg: EmbeddedPostgres, own_db: str, tmp_path: Path
) -> None:
    """Rows recorded while PostgreSQL is stopped are spooled, then replayed once, with no duplicates."""
    await migrated(own_db)
    spool = Spool(tmp_path / "spool")
    ledger = Ledger(settings(own_db, tmp_path / "spool"), spool=spool, batch_timeout=3.0)
    await ledger.start()
    recorded = 0

    def record(n: int) -> None:
        nonlocal recorded
        for _ in range(n):
            ledger.record(make_row(recorded))
            recorded += 1

    try:
        record(120)
        await eventually(lambda: _equals(count(own_db), 120))

        own_pg.stop_server()
        # Traffic keeps flowing during the outage: record() neither blocks nor raises.
        for _ in range(10):
            started = time.monotonic()
            record(30)
            assert time.monotonic() - started < 0.05
            await asyncio.sleep(0.05)
        await ledger.flush()
        assert not ledger.database_ok
        assert ledger.rows_spooled == 300
        assert ledger.pending == 0

        # Keep a copy of what was spooled, to replay it a second time later.
        spool.seal()
        backup = tmp_path / "backup"
        backup.mkdir()
        for segment in spool.segments():
            shutil.copy(segment, backup / segment.name)
        assert sum(len(spool.read(s)) for s in spool.segments()) == 300

        own_pg.start_again()
        await eventually(lambda: _is(ledger.database_ok))
        record(80)  # written directly now that the probe has seen the server again
        await eventually(lambda: _equals(count(own_db), recorded))
        await eventually(lambda: _no_segments(spool))
        assert ledger.database_ok
        assert ledger.rows_replayed == 300

        # Replaying the same segments again (by us or by the background task) inserts nothing new.
        for copy in backup.iterdir():
            shutil.copy(copy, spool.directory / copy.name)
        await ledger.replay()
        await eventually(lambda: _no_segments(spool))
        assert ledger.rows_replayed == 600
    finally:
        await ledger.aclose()

    assert recorded == 500
    assert await count(own_db) == 500
    assert await count(own_db, "SELECT count(DISTINCT request_id) FROM usage_events") == 500
    assert ledger.rows_written + ledger.rows_spooled == 500


async def _is(value: bool) -> bool:
    return value


async def _no_segments(spool: Spool) -> bool:
    return not await asyncio.to_thread(spool.segments)


async def test_aclose_while_postgres_is_down_spools_everything_for_the_next_ledger(
    own_pg: EmbeddedPostgres, own_db: str, tmp_path: Path
) -> None:
    """aclose() with the server stopped spools every queued row; a new ledger replays them on start."""
    await migrated(own_db)
    conf = settings(own_db, tmp_path, flush_interval=30.0)
    first = Ledger(conf)
    await first.start()
    first.record(make_row(0))
    await first.flush()
    own_pg.stop_server()
    for i in range(1, 150):
        first.record(make_row(i))
    await first.aclose()
    assert (first.rows_written, first.rows_spooled, first.pending) == (1, 149, 0)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".open")]
    assert len(Spool(tmp_path).segments()) == 1

    own_pg.start_again()
    second = Ledger(conf)
    await second.start()
    try:
        await eventually(lambda: _equals(count(own_db), 150))
        assert second.rows_replayed == 149
    finally:
        await second.aclose()
    assert Spool(tmp_path).segments() == []


async def test_pool_survives_a_quick_restart_between_batches(
    own_pg: EmbeddedPostgres, own_db: str, tmp_path: Path
) -> None:
    """After PostgreSQL restarts while the ledger is idle, the next batch goes straight to the new server."""
    await migrated(own_db)
    ledger = Ledger(settings(own_db, tmp_path, replay_interval=60.0))
    await ledger.start()
    try:
        ledger.record(make_row(0))
        await ledger.flush()
        own_pg.stop_server()
        own_pg.start_again()
        ledger.record(make_row(1))
        await ledger.flush()
        assert (ledger.rows_written, ledger.rows_spooled) == (2, 0)
    finally:
        await ledger.aclose()
    assert await count(own_db) == 2


async def test_ledger_started_while_postgres_is_down_connects_and_migrates_later(
    own_pg: EmbeddedPostgres, own_db: str, tmp_path: Path
) -> None:
    """Started with the server down, the ledger spools, then creates its pool, migrates and replays."""
    own_pg.stop_server()
    ledger = Ledger(settings(own_db, tmp_path))
    await ledger.start()
    try:
        for i in range(40):
            ledger.record(make_row(i))
        await ledger.flush()
        assert ledger.rows_spooled == 40
        own_pg.start_again()
        # The fresh database has no schema yet: the lazily created pool applies the migrations.
        await eventually(lambda: _table_has(own_db, 40))
        ledger.record(make_row(40))
        await eventually(lambda: _table_has(own_db, 41))
    finally:
        await ledger.aclose()
    assert (ledger.rows_replayed, ledger.rows_written) == (40, 1)


async def _table_has(dsn: str, n: int) -> bool:
    conn = await connect(dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT to_regclass('usage_events') IS NOT NULL"):
            return False
        return bool(await conn.fetchval("SELECT count(*) FROM usage_events") == n)
    finally:
        await conn.close()


# --- the embedded server without pgserver -------------------------------------------------------------


def _local_binaries() -> bool:
    return shutil.which("pg_ctl") is not None or any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@pytest.mark.skipif(not _local_binaries(), reason="no local PostgreSQL binaries")
async def test_local_binaries_backend_starts_stops_and_restarts_on_the_same_socket() -> None:
    """The pg_ctl fallback (run as the postgres user when we are root) serves, stops and comes back."""
    base = Path(tempfile.mkdtemp(prefix="authz-pg-"))
    server = EmbeddedPostgres(backend="binaries")
    try:
        dsn = await asyncio.to_thread(server.start, base / "data")
        assert await count(dsn, "SELECT 1") == 1
        await asyncio.to_thread(server.stop_server)
        with pytest.raises(StoreError):
            await connect(dsn, timeout=2)
        assert await asyncio.to_thread(server.start_again) == dsn
        assert await count(dsn, "SELECT 1") == 1
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(base, ignore_errors=True)


# --- two reports of one request --------------------------------------------------------------------


async def test_partial_reports_of_one_request_merge_and_final_rows_stand(fresh_db: str) -> None:
    """Rows for an existing request id merge as merge_rows says, whether the second report comes
    in the same batch or a later one: a cut row and the access log's report become one row with the
    log's outcome and the cut row's counts; a final row is never replaced by a partial one."""
    from authz.store.queries import insert_rows

    await migrated(fresh_db)
    log = make_row(
        1, recorded_by="access_log", outcome="upstream_error", reason="upstream cut", output_tokens=9999
    )
    cut = make_row(1, recorded_by="ext_proc_cut", outcome="client_aborted", output_tokens=12)
    final = make_row(2, recorded_by="ext_proc")
    late_log = make_row(2, recorded_by="access_log", outcome="unmetered", reason="late", output_tokens=1)
    same_batch_log = make_row(3, recorded_by="access_log", outcome="upstream_error", reason="cut")
    same_batch_cut = make_row(3, recorded_by="ext_proc_cut", outcome="client_aborted", output_tokens=7)
    conn = await connect(fresh_db, timeout=10)
    try:
        assert await insert_rows(conn, [log, final, same_batch_log, same_batch_cut]) == 3
        assert await insert_rows(conn, [cut, late_log]) == 0
        assert await insert_rows(conn, [cut, late_log]) == 0  # a replay changes nothing
        rows = {r.request_id: r for r in await recent_usage(conn, 10)}
    finally:
        await conn.close()
    one, two, three = rows["req-000001"], rows["req-000002"], rows["req-000003"]
    assert (one.outcome, one.reason, one.output_tokens, one.recorded_by) == (
        "upstream_error",
        "upstream cut",
        12,
        "access_log",
    )
    assert two == final
    assert (three.outcome, three.output_tokens) == ("upstream_error", 7)
