"""The revocation set every replica's ext_authz consults, and the watcher that keeps it current.

:class:`RevocationSet` is plain data: ``blocks`` is a few dictionary lookups, synchronous and O(1),
since ext_authz calls it on every request. Besides revoked gateway sessions it holds back-channel
logouts accepted while PostgreSQL was unreachable (:mod:`authz.signin.backchannel`), matched on the
token's IdP claims. :class:`RevocationWatcher` fills it from PostgreSQL
(DESIGN.md, Sessions): one dedicated connection LISTENs on ``gateway_revocations``, where every
revoking transaction notifies the session id as it commits, so a revocation reaches every replica
in milliseconds. A full resync (the revoked, unexpired sessions) runs once LISTEN is in place, every
``resync_interval`` seconds, and after every reconnect, which catches whatever was revoked while
the connection was down. While disconnected, the last known set stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from authz.errors import GatewayError, StoreError
from authz.signin.tokens import Claims
from authz.store.listen import Listener, listen
from authz.store.service_tokens import revoked_service_token_sids
from authz.store.sessions import REVOCATION_CHANNEL, revoked_session_ids

log = logging.getLogger("authz.signin.revocation")


@dataclass(frozen=True, slots=True)
class IdpLogout:
    """A back-channel logout enforced from memory: it names the IdP's ``sub`` and/or ``sid``
    (Back-Channel Logout 1.0 §2.4) rather than gateway sessions, since mapping one to the other
    needs PostgreSQL. By ``sid`` it ends every session of that IdP session; by ``sub`` alone, the
    subject's sessions signed in at or before ``at`` (Unix seconds), not later sign-ins.

    ``pending`` while its journal entry waits for PostgreSQL; once written through it is kept
    until ``hold_until``, when every access token minted before ``at`` has expired (and later
    ones need a refresh, which PostgreSQL refuses for the revoked sessions).
    """

    entry: str
    sub: str | None
    sid: str | None
    at: float
    hold_until: float
    pending: bool = True

    def matches(self, sub: str, idp_sid: str | None, signed_in_at: float) -> bool:
        """Whether a session of IdP subject ``sub`` and IdP session ``idp_sid``, signed in at
        ``signed_in_at``, is one this logout ends (the rule of
        :func:`authz.store.sessions.revoke_sessions_by_idp`)."""
        if self.sid is not None:
            return idp_sid == self.sid and (self.sub is None or self.sub == sub)
        return self.sub == sub and signed_in_at <= self.at


class RevocationSet:
    """The ids of revoked gateway sessions and service tokens (the access token's ``sid`` claim;
    a service token's is ``svc:<id>``, :mod:`authz.serviceid`), plus the
    back-channel logouts not yet resolved to session ids (:class:`IdpLogout`)."""

    __slots__ = ("_by_idp_sid", "_by_sub", "_logouts", "_sids")

    def __init__(self, sids: Iterable[str] = ()) -> None:
        self._sids: set[str] = set(sids)
        self._logouts: dict[str, IdpLogout] = {}
        # Indexes over _logouts, rebuilt whole on every change: lookups never see one half-built.
        self._by_sub: dict[str, tuple[IdpLogout, ...]] = {}
        self._by_idp_sid: dict[str, tuple[IdpLogout, ...]] = {}

    def is_revoked(self, sid: str) -> bool:
        """Whether the session ``sid`` is known to be revoked."""
        return sid in self._sids

    def blocks(self, claims: Claims) -> bool:
        """Whether an access token with these verified claims must be refused: its session is
        revoked, or a back-channel logout names its IdP subject or IdP session."""
        if claims.sid in self._sids:
            return True
        if not self._logouts:
            return False
        # Tokens minted before auth_time existed fall back to iat, which is no later.
        signed_in_at = claims.auth_time if claims.auth_time is not None else claims.iat
        return self.logged_out(claims.sub, claims.idp_sid, signed_in_at)

    def logged_out(self, sub: str, idp_sid: str | None, signed_in_at: float) -> bool:
        """Whether a back-channel logout held here ends the session of IdP subject ``sub`` and IdP
        session ``idp_sid`` signed in at ``signed_in_at`` (Unix seconds)."""
        for logout in self._by_sub.get(sub, ()):
            if logout.matches(sub, idp_sid, signed_in_at):
                return True
        if idp_sid is not None:
            for logout in self._by_idp_sid.get(idp_sid, ()):
                if logout.matches(sub, idp_sid, signed_in_at):
                    return True
        return False

    def add(self, sid: str) -> None:
        """Mark one session revoked."""
        self._sids.add(sid)

    def replace(self, sids: Iterable[str]) -> None:
        """Make ``sids`` the whole set of revoked sessions (a full resync); ids no longer listed are
        forgotten. Back-channel logouts are kept: they are not in PostgreSQL until replayed."""
        # A new set swapped in whole: a lookup never sees one half-rebuilt.
        self._sids = set(sids)

    def add_logout(self, logout: IdpLogout) -> None:
        """Enforce a back-channel logout (or update the one with the same entry id)."""
        self._logouts[logout.entry] = logout
        self._reindex()

    def settle_logouts(self, pending: Iterable[str], now: float) -> None:
        """Mark the logouts whose entries are in ``pending`` as waiting and the others as written
        through, and forget those written through whose ``hold_until`` has passed."""
        waiting = set(pending)
        kept: dict[str, IdpLogout] = {}
        for entry, logout in self._logouts.items():
            is_pending = entry in waiting
            if not is_pending and now >= logout.hold_until:
                continue
            kept[entry] = logout if logout.pending == is_pending else replace(logout, pending=is_pending)
        if kept != self._logouts:
            self._logouts = kept
            self._reindex()

    @property
    def logouts(self) -> tuple[IdpLogout, ...]:
        """The back-channel logouts enforced from memory."""
        return tuple(self._logouts.values())

    def _reindex(self) -> None:
        by_sub: dict[str, list[IdpLogout]] = {}
        by_idp_sid: dict[str, list[IdpLogout]] = {}
        for logout in self._logouts.values():
            if logout.sid is not None:
                by_idp_sid.setdefault(logout.sid, []).append(logout)
            elif logout.sub is not None:
                by_sub.setdefault(logout.sub, []).append(logout)
        self._by_sub = {k: tuple(v) for k, v in by_sub.items()}
        self._by_idp_sid = {k: tuple(v) for k, v in by_idp_sid.items()}

    def __len__(self) -> int:
        return len(self._sids)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RevocationWatcher:
    """Keeps a :class:`RevocationSet` current from PostgreSQL until :meth:`aclose`.

    ``timeout`` bounds a connection attempt and each query; ``keepalive_interval`` is how often an
    idle connection is probed, so a silently dead one is noticed; reconnects back off from
    ``backoff_min`` to ``backoff_max`` seconds. ``clock`` says what "now" is for the resync (which
    leaves out expired sessions).
    """

    def __init__(
        self,
        revocations: RevocationSet,
        *,
        timeout: float = 5.0,
        keepalive_interval: float = 5.0,
        backoff_min: float = 0.1,
        backoff_max: float = 2.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._revocations = revocations
        self._timeout = timeout
        self._keepalive = keepalive_interval
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._clock = clock
        self._dsn = ""
        self._resync_interval = 30.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Set on stop and on connection loss, to end a wait early; the loop checks which one it was.
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        # Ids notified while a resync query is in flight: its snapshot may predate their commit.
        self._notified_during_resync: set[str] | None = None
        self._connected = False
        self._outage_logged = False
        self._resyncs = 0
        # When the set was last known current (monotonic): the revocation feed's lag starts there.
        self._current_at = time.monotonic()

    @property
    def revocations(self) -> RevocationSet:
        """The set this watcher keeps current."""
        return self._revocations

    @property
    def connected(self) -> bool:
        """True while the LISTEN connection is up and has been resynced."""
        return self._connected

    @property
    def lag(self) -> float:
        """Seconds by which the set may trail PostgreSQL: 0 while LISTEN is up (revocations arrive
        as they commit), else the time since it last was."""
        if self._connected:
            return 0.0
        return max(0.0, time.monotonic() - self._current_at)

    @property
    def resyncs(self) -> int:
        """Full resyncs completed so far."""
        return self._resyncs

    async def start(self, dsn: str, resync_interval: float, *, first_sync_timeout: float = 10.0) -> bool:
        """Start watching ``dsn``; return whether the first full resync finished within
        ``first_sync_timeout`` seconds. Either way the watcher keeps (re)trying in the background."""
        if self._task is not None:
            raise GatewayError("the revocation watcher was already started")
        self._dsn = dsn
        self._resync_interval = resync_interval
        self._task = asyncio.create_task(self._run(), name="revocation-watcher")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_sync_timeout):
                await self._synced.wait()
        if not self._synced.is_set():
            log.warning("revocations: no full resync within %gs; still trying", first_sync_timeout)
        return self._synced.is_set()

    async def aclose(self) -> None:
        """Stop watching and close the connection. The set keeps its last contents."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            async with asyncio.timeout(self._timeout + 1.0):
                await asyncio.shield(task)
        except TimeoutError:
            # Stuck in a connection attempt or a query: cancelling is safe, its finally closes.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff_min
        while not self._stopping:
            self._wake.clear()
            try:
                listener = await listen(
                    self._dsn,
                    REVOCATION_CHANNEL,
                    self._on_notify,
                    on_lost=self._wake.set,
                    timeout=self._timeout,
                    application_name="authz-revocations",
                )
            except (StoreError, TimeoutError) as exc:
                self._report_down(exc)
                await self._pause(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            except Exception as exc:
                # The watcher must outlive any surprise, or revocations would silently stop arriving.
                log.exception("revocations: unexpected error while connecting")
                self._report_down(exc)
                await self._pause(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            try:
                # LISTEN is already active, so nothing revoked from here on can be missed.
                await self._resync(listener)
                backoff = self._backoff_min
                self._connected = True
                if self._outage_logged:
                    log.warning(
                        "revocations: PostgreSQL is back; %d revoked sessions", len(self._revocations)
                    )
                    self._outage_logged = False
                await self._serve(listener)
            except (StoreError, TimeoutError) as exc:
                self._report_down(exc)
            except Exception as exc:
                log.exception("revocations: unexpected error while listening")
                self._report_down(exc)
            finally:
                if self._connected:
                    self._current_at = time.monotonic()
                self._connected = False
                await listener.close(self._timeout)
            if not self._stopping:
                await self._pause(backoff)

    async def _serve(self, listener: Listener) -> None:
        """Wait on the connection until it is lost or the watcher stops; resync and ping meanwhile."""
        next_resync = time.monotonic() + self._resync_interval
        while True:
            delay = max(0.0, min(self._keepalive, next_resync - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            if self._stopping:
                return
            if listener.is_closed():
                raise StoreError("the LISTEN connection was closed")
            # A late loss report from the previous connection may have woken us: nothing to do.
            self._wake.clear()
            if time.monotonic() >= next_resync:
                await self._resync(listener)
                next_resync = time.monotonic() + self._resync_interval
            else:
                await listener.ping(self._timeout)

    async def _resync(self, listener: Listener) -> None:
        self._notified_during_resync = set()
        try:
            async with asyncio.timeout(self._timeout):
                now = self._clock()
                # Service tokens are revoked by their sid (svc:<id>, authz.serviceid) on the same channel.
                fetched = await revoked_session_ids(listener.connection, now)
                fetched |= await revoked_service_token_sids(listener.connection, now)
        finally:
            during, self._notified_during_resync = self._notified_during_resync, None
        self._revocations.replace(fetched | during)
        self._resyncs += 1
        self._synced.set()
        log.debug("revocations: resynced, %d revoked sessions", len(fetched))

    def _on_notify(self, sid: str) -> None:
        self._revocations.add(sid)
        if self._notified_during_resync is not None:
            self._notified_during_resync.add(sid)

    async def _pause(self, delay: float) -> None:
        # Jitter spreads the replicas' reconnects after a database restart.
        jittered = delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(jittered):
                while not self._stopping:
                    await self._wake.wait()
                    self._wake.clear()

    def _report_down(self, exc: BaseException) -> None:
        if self._stopping:
            return
        reason = f"no answer within {self._timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
        if not self._outage_logged:
            log.warning(
                "revocations: lost PostgreSQL (%s); keeping the last %d revoked sessions and reconnecting",
                reason,
                len(self._revocations),
            )
            self._outage_logged = True
        else:
            log.debug("revocations: PostgreSQL still unreachable (%s)", reason)
