"""OIDC back-channel logouts that take effect whether or not PostgreSQL answers.

The IdP sends a logout once and does not retry (Back-Channel Logout 1.0 §2.8 lets it give up), so
a validated logout is accepted as soon as it is durable, in this order:

1. written to the local journal (:class:`~authz.store.logout_spool.LogoutSpool`, fsynced); the
   same token's entry already there is a replay (§2.6 step 7), even with PostgreSQL down;
2. written to PostgreSQL within :data:`DIRECT_WRITE_TIMEOUT` seconds: the jti remembered, the
   sessions revoked and NOTIFYed to every replica, the entry removed;
3. failing that, enforced from memory at once (the :class:`IdpLogout` in this worker's
   :class:`RevocationSet`, matched on the access token's ``sub``, ``idp_sid`` and ``auth_time``),
   and the entry stays in the journal.

Every worker sharing the journal directory scans it every :data:`SCAN_INTERVAL` seconds and
enforces what it finds the same way, so sibling workers (and replicas whose journal is on a shared
volume) refuse the session within about a second. Whoever finds PostgreSQL answering again writes
the entries through, every ``replay_interval`` seconds; the revocations then reach the remaining
replicas by NOTIFY and resync. A replayed entry is recognised by its random entry id, so an entry
whose first write did commit is never refused as a replay of itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

from authz.errors import StoreError
from authz.signin.revocation import IdpLogout, RevocationSet
from authz.store import sessions as store
from authz.store.db import Connection, Pool, connect
from authz.store.logout_spool import LogoutSpool, SpooledLogout

log = logging.getLogger("authz.signin.backchannel")

T = TypeVar("T")

# How long the endpoint waits on PostgreSQL before answering from the journal. IdPs give an RP a few
# seconds (oidc-provider 2.5 s) and do not retry, so the answer must come well within that.
DIRECT_WRITE_TIMEOUT = 1.0
# How often every worker looks for entries its siblings wrote: the bound on how late they learn.
SCAN_INTERVAL = 0.5

LOGOUT_REASON = "backchannel_logout"
"""``revoked_reason`` of the sessions a back-channel logout ended."""

AcceptStatus = Literal["applied", "spooled", "replay"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """The outcome of :meth:`BackchannelLogouts.accept`.

    ``applied``: written to PostgreSQL now (``session_ids`` revoked). ``spooled``: durable in the
    journal and enforced from memory, written to PostgreSQL later. ``replay``: this logout token
    was acted on before; nothing was done.
    """

    status: AcceptStatus
    session_ids: tuple[str, ...] = ()


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def write_logout(
    db: Pool | Connection, logout: SpooledLogout, *, now: float, spooled: bool = False
) -> store.LogoutResult:
    """Write one logout to PostgreSQL: its jti, the sessions it revokes and, when it revoked
    anything new, its audit row (one transaction). ``spooled`` marks a replay from the journal."""
    detail = {"spooled": True, "accepted_at": _utc(logout.accepted_at).isoformat()} if spooled else None
    return await store.record_backchannel_logout(
        db,
        entry=logout.entry,
        issuer=logout.issuer,
        jti=logout.jti,
        jti_expires_at=_utc(logout.jti_expires_at),
        sub=logout.sub,
        idp_sid=logout.sid,
        accepted_at=_utc(logout.accepted_at),
        reason=LOGOUT_REASON,
        now=_utc(now),
        client_ip=logout.client_ip,
        user_agent=logout.user_agent,
        detail=detail,
    )


class BackchannelLogouts:
    """Accepts back-channel logouts and keeps the journal, the revocation set and PostgreSQL agreed.

    ``hold`` is how long a written-through logout stays enforced from memory (the access token
    lifetime plus clock skew: after that no token minted before it is valid). ``clock`` returns
    Unix seconds.
    """

    def __init__(
        self,
        spool: LogoutSpool,
        revocations: RevocationSet,
        *,
        dsn: str,
        hold: float,
        replay_interval: float,
        connect_timeout: float,
        scan_interval: float = SCAN_INTERVAL,
        direct_timeout: float = DIRECT_WRITE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._revocations = revocations
        self._dsn = dsn
        self._hold = hold
        self._replay_interval = replay_interval
        self._connect_timeout = connect_timeout
        self._scan_interval = scan_interval
        self._direct_timeout = direct_timeout
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._replay_lock = asyncio.Lock()
        self._outage_logged = False
        self._replayed = 0

    @property
    def revocations(self) -> RevocationSet:
        """The revocation set the logouts are enforced in."""
        return self._revocations

    @property
    def replayed(self) -> int:
        """Journal entries this instance wrote through to PostgreSQL (or found already there)."""
        return self._replayed

    async def start(self) -> None:
        """Enforce what the journal already holds, then keep scanning and replaying until
        :meth:`aclose`. A worker restarted during an outage thus forgets no logout."""
        await self.scan()
        self._tasks = [
            asyncio.create_task(self._every(self._scan_interval, self.scan), name="backchannel-scan"),
            # Apart from the scans: an attempt on an unreachable server may take connect_timeout.
            asyncio.create_task(self._every(self._replay_interval, self.replay), name="backchannel-replay"),
        ]

    async def aclose(self) -> None:
        """Stop scanning and replaying. Entries stay in the journal for the next start."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        self._stop.set()
        try:
            async with asyncio.timeout(self._connect_timeout + 1.0):
                await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        except TimeoutError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the endpoint ------------------------------------------------------------------------

    async def accept(self, logout: SpooledLogout) -> Accepted:
        """Make a validated logout durable and enforce it; see the module docstring for the order.

        Raises :class:`StoreError` only when neither the journal nor PostgreSQL could take it.
        """
        try:
            added = await asyncio.to_thread(self._spool.add, logout)
        except OSError as exc:
            # Without the journal, PostgreSQL is the only durable place left: wait on it as long
            # as any other portal request would.
            log.error("back-channel logout: the journal at %s failed (%s)", self._spool.directory, exc)
            try:
                result = await self._with_connection(
                    self._connect_timeout, lambda conn: write_logout(conn, logout, now=logout.accepted_at)
                )
            except TimeoutError as timeout:
                raise StoreError("PostgreSQL did not answer in time") from timeout
            if result.status == "replay":
                return Accepted("replay")
            self._enforce(logout, pending=False)
            return Accepted("applied", result.session_ids)
        if not added:
            return Accepted("replay")
        try:
            result = await self._with_connection(
                self._direct_timeout, lambda conn: write_logout(conn, logout, now=logout.accepted_at)
            )
        except (StoreError, TimeoutError) as exc:
            self._enforce(logout, pending=True)
            log.warning(
                "back-channel logout: PostgreSQL did not take it (%s); enforced from memory and kept in"
                " the journal until it does",
                "no answer in time" if isinstance(exc, TimeoutError) else exc,
            )
            return Accepted("spooled")
        await asyncio.to_thread(self._spool.remove, self._spool.path_for(logout.issuer, logout.jti))
        if result.status == "replay":
            return Accepted("replay")
        self._enforce(logout, pending=False)
        return Accepted("applied", result.session_ids)

    # --- the journal -------------------------------------------------------------------------

    async def scan(self) -> int:
        """Enforce every journal entry and forget logouts no longer needed; return the entries."""
        entries = await asyncio.to_thread(self._spool.entries)
        known = {logout.entry for logout in self._revocations.logouts}
        for _path, logout in entries:
            if logout.entry not in known:
                self._enforce(logout, pending=True)
        self._revocations.settle_logouts((logout.entry for _path, logout in entries), self._clock())
        return len(entries)

    async def replay(self) -> int:
        """Write the journal's entries to PostgreSQL if it answers; return how many went through."""
        async with self._replay_lock:
            entries = await asyncio.to_thread(self._spool.entries)
            if not entries:
                return 0
            try:
                # Connecting, then a second or so per entry: a long outage may leave many.
                budget = self._connect_timeout + self._direct_timeout * len(entries)
                done = await self._with_connection(budget, lambda conn: self._replay_entries(conn, entries))
            except (StoreError, TimeoutError) as exc:
                if not self._outage_logged:
                    log.warning(
                        "back-channel logout: %d journal entries wait for PostgreSQL (%s)",
                        len(entries),
                        "no answer in time" if isinstance(exc, TimeoutError) else exc,
                    )
                    self._outage_logged = True
                return 0
            if self._outage_logged:
                log.warning("back-channel logout: PostgreSQL is back; journal entries written through")
                self._outage_logged = False
            await self.scan()
            return done

    async def _replay_entries(self, conn: Connection, entries: list[tuple[Path, SpooledLogout]]) -> int:
        done = 0
        for path, logout in entries:
            result = await write_logout(conn, logout, now=self._clock(), spooled=True)
            if result.status == "replay":
                # Another acceptance of the same token got there first; this one changed nothing.
                await store.audit(
                    conn,
                    kind="backchannel_logout",
                    outcome="denied",
                    reason="logout_jti_replay",
                    client_ip=logout.client_ip,
                    user_agent=logout.user_agent,
                    detail={"spooled": True},
                    now=_utc(self._clock()),
                )
            await asyncio.to_thread(self._spool.remove, path)
            done += 1
            self._replayed += 1
        return done

    async def _every(self, interval: float, work: Callable[[], Awaitable[int]]) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await work()
            except Exception:
                # The loop must outlive any surprise, or logouts would stop reaching this worker.
                log.exception("back-channel logout: journal pass failed")

    # --- helpers -----------------------------------------------------------------------------

    def _enforce(self, logout: SpooledLogout, *, pending: bool) -> None:
        self._revocations.add_logout(
            IdpLogout(
                entry=logout.entry,
                sub=logout.sub,
                sid=logout.sid,
                at=logout.accepted_at,
                hold_until=logout.accepted_at + self._hold,
                pending=pending,
            )
        )

    async def _with_connection(self, budget: float, use: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``use`` on a fresh connection, connecting included, within ``budget`` seconds.

        A connection of its own rather than a pooled one: after a timeout its state is unknown,
        and terminating it is the only cleanup that cannot hang on a dead server.
        """
        conn: Connection | None = None
        try:
            async with asyncio.timeout(budget):
                conn = await connect(self._dsn, timeout=min(budget, self._connect_timeout))
                result = await use(conn)
        except BaseException:
            if conn is not None:
                conn.terminate()
            raise
        try:
            async with asyncio.timeout(budget):
                await conn.close()
        except Exception:
            # The work is done; a goodbye the server does not answer only costs the socket.
            conn.terminate()
        return result
