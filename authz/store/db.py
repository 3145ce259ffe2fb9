"""Connections to PostgreSQL, with asyncpg's errors wrapped into :class:`~authz.errors.StoreError`.

Error messages carry the URL with its password replaced, since they end up in logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from authz.errors import StoreError

Pool: TypeAlias = asyncpg.Pool
Connection: TypeAlias = asyncpg.Connection

# What a failed connection attempt raises: socket errors (refused, missing unix socket), the
# connect timeout, server refusals (bad password, "the database system is starting up") and
# client-side DSN problems (asyncpg raises ValueError subclasses for those).
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    ValueError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

# What a query on an open pool raises when PostgreSQL or the connection fails.
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)


@contextlib.contextmanager
def failing(action: str) -> Iterator[None]:
    """Turn a database failure inside the block into a :class:`StoreError` saying what could not be
    done (``action``)."""
    try:
        yield
    except DB_ERRORS as exc:
        raise StoreError(f"cannot {action}: {exc}; check that PostgreSQL is reachable and migrated") from exc


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to log."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # An unparsable URL may still hold a secret: say nothing about it.
        return "<unparsable database URL>"
    if not password:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def _describe(url: str, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        # asyncpg does not put the password in its messages today; make sure it never does here.
        text = text.replace(password, "***")
    return text


async def connect_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    timeout: float,  # noqa: ASYNC109 - asyncpg's per-connection connect timeout, not a call deadline
) -> Pool:
    """Open a connection pool to ``url``; ``timeout`` bounds each connection attempt.

    Raises :class:`StoreError` (without the password) when PostgreSQL cannot be reached or refuses
    the connection. The pool reconnects by itself after PostgreSQL restarts: a connection found
    closed is replaced on the next acquire.
    """
    try:
        return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, timeout=timeout)
    except CONNECT_ERRORS as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {_describe(url, exc)}; "
            "check store.url and that the server is running"
        ) from exc


async def connect(url: str, *, timeout: float) -> Connection:  # noqa: ASYNC109 - asyncpg connect timeout
    """Open one connection to ``url`` (migrations, the CLI, tests); :class:`StoreError` on failure."""
    try:
        return await asyncpg.connect(url, timeout=timeout)
    except CONNECT_ERRORS as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {_describe(url, exc)}; "
            "check store.url and that the server is running"
        ) from exc
