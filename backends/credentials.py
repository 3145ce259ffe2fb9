"""An async cache for credentials that expire: refreshed ahead of expiry, fetched off the event loop.

Cloud credentials (STS sessions, Google access tokens) come from blocking SDK calls that may take
hundreds of milliseconds. :class:`RefreshingCache` runs those calls in a worker thread, shares one
fetch among concurrent callers of the same key, refreshes a value ``refresh_margin`` seconds before
it expires so no request ever carries a credential about to lapse, and keeps serving a still-valid
value when a refresh fails (an STS or Google outage should not fail requests while the credential
in hand still works).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from cachetools import LRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger(__name__)

DEFAULT_REFRESH_MARGIN = 300.0
"""Seconds before expiry at which a value is refreshed (5 minutes, as the AWS SDKs do)."""

NEVER = math.inf
"""``expires_at`` for a value that does not expire (long-term access keys)."""


@dataclass(frozen=True, slots=True)
class Expiring(Generic[V]):
    """A value and the time (seconds since the epoch, on the cache's clock) at which it expires."""

    value: V
    expires_at: float


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires_at: float
    # After a failed refresh, the time before which no new refresh is attempted, so an outage
    # costs one upstream call per backoff period instead of one per request.
    retry_at: float = 0.0


@runtime_checkable
class ReportsRefreshFailures(Protocol):
    """An upstream whose credential refreshes can fail, and that says so (for the gateway's metrics)."""

    def on_credential_refresh_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(upstream name)`` on the event loop after each failed refresh."""


class RefreshingCache(Generic[K, V]):
    """Caches expiring values per key; ``await cache.get(key, fetch)`` returns a usable value.

    ``fetch`` is a blocking callable returning :class:`Expiring`; it runs via
    :func:`asyncio.to_thread`, at most once at a time per key. The cache holds at most ``maxsize``
    keys (least recently used dropped first). ``clock`` returns seconds since the epoch (expiries
    from AWS and Google are absolute times) and is injectable for tests.
    """

    def __init__(
        self,
        *,
        name: str = "credentials",
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        maxsize: int = 10_000,
        failure_backoff: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if refresh_margin < 0 or failure_backoff < 0 or maxsize < 1:
            raise ValueError("refresh_margin and failure_backoff must be >= 0 and maxsize >= 1")
        self._name = name
        self._margin = refresh_margin
        self._backoff = failure_backoff
        self._clock = clock
        self._entries: LRUCache[K, _Entry[V]] = LRUCache(maxsize=maxsize)
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self._on_failure: Callable[[], None] | None = None

    def on_refresh_failure(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each failed fetch (whether or not a cached value is served)."""
        self._on_failure = callback

    async def get(self, key: K, fetch: Callable[[], Expiring[V]]) -> V:
        """Return the value for ``key``, fetching or refreshing it first when due.

        Raises whatever ``fetch`` raised when there is no unexpired value to fall back on.
        """
        now = self._clock()
        entry = self._entries.get(key)
        # Serve an unexpired value that is fresh enough, or whose last refresh failed so recently
        # that the backoff has not elapsed.
        if (
            entry is not None
            and now < entry.expires_at
            and (now < entry.expires_at - self._margin or now < entry.retry_at)
        ):
            return entry.value
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(key, fetch), name=f"refresh {self._name}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # shield: a caller that gives up (client disconnect) must not cancel the fetch the other
        # callers of this key are waiting on.
        return await asyncio.shield(task)

    def invalidate(self, key: K) -> None:
        """Drop the value for ``key`` (for example after the upstream rejected it)."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    async def aclose(self) -> None:
        """Cancel in-flight fetches and drop every cached value."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self._entries.clear()

    async def _refresh(self, key: K, fetch: Callable[[], Expiring[V]]) -> V:
        try:
            fresh = await asyncio.to_thread(fetch)
        except Exception as exc:
            if self._on_failure is not None:
                self._on_failure()
            old = self._entries.get(key)
            now = self._clock()
            if old is None or now >= old.expires_at:
                raise
            old.retry_at = now + self._backoff
            # The exception text is logged, not its traceback locals: backends raise BackendError
            # whose messages carry no secrets by contract.
            logger.warning(
                "refreshing %s failed (%s: %s); serving the cached value for %.0f s more until it expires",
                self._name,
                type(exc).__name__,
                exc,
                old.expires_at - now,
            )
            return old.value
        self._entries[key] = _Entry(fresh.value, fresh.expires_at)
        return fresh.value

    def _forget(self, key: K, done: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        # Retrieve the outcome so a fetch whose every waiter was cancelled does not log
        # "Task exception was never retrieved".
        if not done.cancelled():
            done.exception()
