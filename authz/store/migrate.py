"""Schema migrations: the numbered ``.sql`` files in ``authz/store/migrations/``, applied in order.

Every replica runs :func:`migrate` at start-up. A session-level advisory lock serialises them, so
replicas starting together apply each migration exactly once; the others wait for the lock, then
find nothing left to do.
"""

from __future__ import annotations

import logging
import re
from importlib.resources import files

import asyncpg

from authz.configtypes import Store
from authz.errors import GatewayError, StoreError
from authz.store.db import Connection, Pool, connect_pool

log = logging.getLogger("authz.store.migrate")

# pg_advisory_lock takes a bigint; this is the ASCII of "cgw:migr", fixed forever so that old and
# new releases running side by side during a rollout contend for the same lock.
MIGRATION_LOCK_KEY = 0x6367773A6D696772

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[str, str]]:
    """``(version, sql)`` for every migration shipped with the package, oldest first.

    The version is the file name without ``.sql`` (``0001_usage``).
    """
    found: dict[str, tuple[str, str]] = {}
    for entry in files("authz.store").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.match(entry.name)
        if match is None:
            raise StoreError(f"migration file name {entry.name!r} is not NNNN_name.sql")
        number = match.group(1)
        if number in found:
            raise StoreError(f"two migrations are numbered {number}: {found[number][0]} and {entry.name}")
        found[number] = (entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
    return [found[number] for number in sorted(found)]


async def migrate(conn: Connection) -> list[str]:
    """Apply pending migrations on ``conn``, each in its own transaction; return the versions applied.

    ``conn`` must not be inside a transaction. Safe to call from many processes at once.
    """
    wanted = migrations()
    try:
        # Fast path without the lock or any DDL: an up-to-date schema needs nothing, and a role
        # without CREATE privilege can still start against a database migrated by an operator.
        if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            present = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            if all(version in present for version, _ in wanted):
                return []
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            # Created under the lock: concurrent CREATE TABLE IF NOT EXISTS can still collide.
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            done: list[str] = []
            for version, sql in wanted:
                if version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                log.info("applied migration %s", version)
                done.append(version)
            return done
        finally:
            # If the connection died the server has already dropped the lock with the session.
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"database migration failed: {exc}") from exc


async def open_migrated_pool(store: Store, holds: str) -> Pool:
    """A pool for a command-line tool, the schema migrated first (the tool may be the first thing to
    touch a new database). ``holds`` says what lives there, for the error when no database is
    configured."""
    if not store.url:
        raise GatewayError(f"store.url is not configured: {holds} live in PostgreSQL")
    pool = await connect_pool(store.url, timeout=store.connect_timeout)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
    except BaseException:
        await pool.close()
        raise
    return pool
