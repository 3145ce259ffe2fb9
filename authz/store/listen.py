"""One dedicated PostgreSQL connection LISTENing on a channel, for :mod:`authz.signin.revocation`.

A pooled connection cannot LISTEN: the pool would hand it to someone else, and a LISTEN lives only
as long as its session. So the listener owns a plain connection, reports each notification's
payload to a callback and tells its owner when the connection is lost. Reconnecting is the owner's
job; this module only opens, pings and closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from authz.errors import StoreError
from authz.store.db import DB_ERRORS, Connection, connect

log = logging.getLogger("authz.store.listen")

# A failed query or connection, or a probe or close that ran out of time.
_FAILURES: tuple[type[BaseException], ...] = (*DB_ERRORS, TimeoutError)


class Listener:
    """An open connection LISTENing on one channel. Build it with :func:`listen`."""

    def __init__(self, conn: Connection, channel: str) -> None:
        self._conn = conn
        self._channel = channel

    @property
    def connection(self) -> Connection:
        """The connection itself, for queries between notifications (a resync, a ping)."""
        return self._conn

    def is_closed(self) -> bool:
        """True once the connection was closed by either side; it never reopens."""
        return bool(self._conn.is_closed())

    async def ping(self, timeout: float) -> None:  # noqa: ASYNC109 - bounds a liveness probe, by design
        """Round-trip a trivial query; :class:`StoreError` if it fails or takes over ``timeout`` seconds.

        An idle socket to a host that vanished (no FIN, no RST) looks healthy until something is sent:
        this is that something.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._conn.fetchval("SELECT 1")
        except _FAILURES as exc:
            raise StoreError(f"the LISTEN connection on {self._channel!r} is not answering: {exc}") from exc

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 - bounds the polite close
        """Close the connection, politely if the server answers within ``timeout``, else abruptly."""
        if self._conn.is_closed():
            return
        try:
            async with asyncio.timeout(timeout):
                await self._conn.close()
        except _FAILURES:
            # The server is gone or hung: drop the socket without the goodbye round trip.
            self._conn.terminate()


async def listen(
    url: str,
    channel: str,
    on_payload: Callable[[str], None],
    *,
    on_lost: Callable[[], None],
    timeout: float,  # noqa: ASYNC109 - asyncpg's connect timeout, also bounding the LISTEN
    application_name: str = "authz-listen",
) -> Listener:
    """Connect to ``url`` and LISTEN on ``channel``; :class:`StoreError` if either fails.

    ``on_payload`` gets each notification's payload on the event loop; ``on_lost`` is called once
    the connection closes for any reason (server restart, network loss, :meth:`Listener.close`).
    ``application_name`` labels the connection in ``pg_stat_activity``.
    """
    conn = await connect(url, timeout=timeout)

    def deliver(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # asyncpg runs this as a bare loop callback: an exception would only reach the loop's handler.
        try:
            on_payload(payload)
        except Exception:
            log.exception("LISTEN %s: the handler failed on payload %r", channel, payload)

    def lost(_conn: Any) -> None:
        on_lost()

    try:
        async with asyncio.timeout(timeout):
            await conn.execute("SELECT set_config('application_name', $1, false)", application_name)
            await conn.add_listener(channel, deliver)
    except BaseException as exc:
        conn.terminate()
        if isinstance(exc, _FAILURES):
            raise StoreError(f"cannot LISTEN on {channel!r}: {exc}") from exc
        raise
    # Registered only now, so that a failed attempt above never reports a loss. A loss between the
    # LISTEN completing and this line would have no listener left to tell: check for it instead.
    conn.add_termination_listener(lost)
    if conn.is_closed():
        raise StoreError(f"the connection closed right after LISTEN on {channel!r}")
    return Listener(conn, channel)
