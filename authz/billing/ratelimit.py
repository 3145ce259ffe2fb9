"""Per-user rate limits (``policies[].rate_limits``): requests and tokens per minute.

Counting is local and shared through PostgreSQL, never a round trip per request. Each worker counts
the requests it admits per user and minute; its sync (every ``spend.sync_interval`` seconds) adds
them to ``rate_counters`` and reads back every worker's totals, requests and tokens (the ledger adds
each row's tokens, input with cache reads and writes plus output, when it writes the row). A worker
decides with its own counts since the last sync plus everyone's as of then.

The window slides: the previous minute's count weighted by the share of it still inside the last
60 seconds, plus the current minute's (the usual two-counter approximation of a sliding window).

Error, documented in docs/architecture.md: a user may get past ``requests_per_minute`` by the
requests other workers admitted for them since this worker's last sync (at most one sync interval of
their traffic), and tokens count from the moment their row is written and synced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from authz.configtypes import RateLimits
from authz.store.db import Pool
from authz.store.spend import push_requests

# Users not seen for this long are no longer read back at sync.
_WATCH_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class RateRefusal:
    """The request is over ``limit`` (``requests_per_minute`` or ``tokens_per_minute``) of ``value``;
    ``retry_after`` whole seconds until the window has room again, if nothing else is admitted."""

    limit: str
    value: int
    retry_after: int


def window(previous: float, current: float, seconds: float) -> float:
    """The sliding-window count ``seconds`` into the current minute."""
    return previous * max(0.0, 60.0 - seconds) / 60.0 + current


def retry_after(previous: float, current: float, seconds: float, fits: Callable[[float], bool]) -> int:
    """The whole seconds until ``fits(window count)``, counting nothing new (at most 120)."""
    for wait in range(1, 121):
        later = seconds + wait
        if later < 60:
            count = window(previous, current, later)
        elif later < 120:
            count = window(current, 0.0, later - 60)
        else:
            count = 0.0
        if fits(count):
            return wait
    return 120


@dataclass
class RateLimiter:
    """One worker's view of every user's request and token rates."""

    _pending: dict[tuple[str, int], int] = field(default_factory=dict)
    _shared: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    _watched: dict[str, float] = field(default_factory=dict)

    def _counts(self, user: str, minute: int) -> tuple[int, int]:
        requests, tokens = self._shared.get((user, minute), (0, 0))
        return requests + self._pending.get((user, minute), 0), tokens

    def admit(self, user: str, limits: RateLimits, now: float) -> RateRefusal | None:
        """Count one request of ``user`` at ``now``, or refuse it when the window is full."""
        minute = int(now // 60)
        seconds = now - minute * 60
        prev_requests, prev_tokens = self._counts(user, minute - 1)
        cur_requests, cur_tokens = self._counts(user, minute)
        self._watched[user] = now
        rpm = limits.requests_per_minute
        if rpm is not None and window(prev_requests, cur_requests, seconds) + 1 > rpm:
            wait = retry_after(prev_requests, cur_requests, seconds, lambda n: n + 1 <= rpm)
            return RateRefusal("requests_per_minute", rpm, wait)
        tpm = limits.tokens_per_minute
        if tpm is not None and window(prev_tokens, cur_tokens, seconds) >= tpm:
            wait = retry_after(prev_tokens, cur_tokens, seconds, lambda n: n < tpm)
            return RateRefusal("tokens_per_minute", tpm, wait)
        self._pending[(user, minute)] = self._pending.get((user, minute), 0) + 1
        return None

    def forget(self, user: str, now: float) -> None:
        """Uncount a request :meth:`admit` counted (it was refused for another reason)."""
        key = (user, int(now // 60))
        if self._pending.get(key, 0) > 0:
            self._pending[key] -= 1

    async def sync(self, db: Pool, now: float) -> None:
        """Push this worker's counts and read back everyone's for the users seen lately."""
        pending, self._pending = self._pending, {}
        minute = int(now // 60)
        self._watched = {u: t for u, t in self._watched.items() if now - t < _WATCH_SECONDS}
        try:
            shared = await push_requests(
                db,
                {(user, _minute_at(m)): n for (user, m), n in pending.items() if n},
                sorted(self._watched),
                _minute_at(minute - 1),
            )
        except BaseException:
            for key, n in pending.items():
                self._pending[key] = self._pending.get(key, 0) + n
            raise
        self._shared = {(user, int(at.timestamp()) // 60): counts for (user, at), counts in shared.items()}


def _minute_at(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, tz=UTC)
