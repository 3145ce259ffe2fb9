"""Shared fixtures, one self-contained section per component. Add new fixtures in their own section."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from authz.store.db import connect
from authz.store.embedded import EmbeddedPostgres
from authz.store.migrate import migrate

# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """``DATABASE_URL`` when set; otherwise a throwaway embedded server for the whole session."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    # Not under tmp_path: every pytest session start resets /tmp/pytest-of-<user> to 0700, which
    # locks out the unprivileged user the server runs as when the tests run as root.
    base = Path(tempfile.mkdtemp(prefix="authz-pg-"))
    server = EmbeddedPostgres()
    try:
        yield server.start(base / "data")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def fresh_db(pg_dsn: str) -> AsyncIterator[str]:
    """A brand-new, empty database on the session server (dropped afterwards)."""
    name = f"t_{secrets.token_hex(6)}"
    admin = await connect(pg_dsn, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(pg_dsn)._replace(path=f"/{name}"))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def clean_db(pg_dsn: str) -> str:
    """``pg_dsn`` with the schema migrated and ``usage_events`` emptied."""
    conn = await connect(pg_dsn, timeout=10)
    try:
        await migrate(conn)
        await conn.execute("TRUNCATE usage_events")
    finally:
        await conn.close()
    return pg_dsn
