"""RefreshingCache: expiry-aware caching, single-flight fetches, fallback on failed refresh."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import pytest

from backends.base import BackendError
from backends.credentials import NEVER, Expiring, RefreshingCache

T0 = 1_900_000_000.0


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a network connection (unit tests must not)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


class Clock:
    """A settable clock in seconds since the epoch."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """A blocking fetch that counts calls, records its thread, and returns scripted results."""

    def __init__(self, *results: Expiring[str] | Exception) -> None:
        self.results = list(results)
        self.calls = 0
        self.threads: list[int] = []
        self.gate: threading.Event | None = None

    def __call__(self) -> Expiring[str]:
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self.gate is not None:
            assert self.gate.wait(5)
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def make_cache(
    clock: Clock, *, maxsize: int = 100, failure_backoff: float = 10.0
) -> RefreshingCache[str, str]:
    return RefreshingCache(name="test value", clock=clock, maxsize=maxsize, failure_backoff=failure_backoff)


async def test_value_is_cached_until_the_refresh_margin() -> None:
    """A value is fetched once and served from cache until refresh_margin before its expiry."""
    clock = Clock()
    fetch = Fetcher(Expiring("v1", T0 + 3600), Expiring("v2", T0 + 7200))
    cache = make_cache(clock)

    assert await cache.get("k", fetch) == "v1"
    clock.now = T0 + 3600 - 301
    assert await cache.get("k", fetch) == "v1"
    assert fetch.calls == 1


async def test_value_is_refreshed_five_minutes_before_expiry() -> None:
    """At 300 seconds (the default margin) before expiry the value is fetched again."""
    clock = Clock()
    fetch = Fetcher(Expiring("v1", T0 + 3600), Expiring("v2", T0 + 7200))
    cache = make_cache(clock)

    await cache.get("k", fetch)
    clock.now = T0 + 3600 - 300
    assert await cache.get("k", fetch) == "v2"
    assert fetch.calls == 2


async def test_value_that_never_expires_is_fetched_once() -> None:
    """A value whose expiry is NEVER (long-term keys) is not fetched again."""
    clock = Clock()
    fetch = Fetcher(Expiring("forever", NEVER))
    cache = make_cache(clock)

    await cache.get("k", fetch)
    clock.now = T0 + 10 * 365 * 86400
    assert await cache.get("k", fetch) == "forever"
    assert fetch.calls == 1


async def test_keys_are_cached_independently() -> None:
    """Each key has its own value and its own fetch."""
    clock = Clock()
    cache = make_cache(clock)

    assert await cache.get("a", Fetcher(Expiring("A", T0 + 3600))) == "A"
    assert await cache.get("b", Fetcher(Expiring("B", T0 + 3600))) == "B"
    assert await cache.get("a", Fetcher()) == "A"


async def test_concurrent_gets_share_one_fetch() -> None:
    """Concurrent callers of the same key wait on a single fetch and all receive its value."""
    clock = Clock()
    fetch = Fetcher(Expiring("shared", T0 + 3600))
    fetch.gate = threading.Event()
    cache = make_cache(clock)

    waiters = [asyncio.create_task(cache.get("k", fetch)) for _ in range(20)]
    await asyncio.sleep(0.01)
    fetch.gate.set()
    assert await asyncio.gather(*waiters) == ["shared"] * 20
    assert fetch.calls == 1


async def test_fetch_runs_off_the_event_loop_thread() -> None:
    """The blocking fetch runs in a worker thread, never on the thread running the event loop."""
    fetch = Fetcher(Expiring("v", T0 + 3600))
    cache = make_cache(Clock())

    await cache.get("k", fetch)
    assert fetch.threads and fetch.threads[0] != threading.get_ident()


async def test_failed_refresh_keeps_serving_the_unexpired_value(caplog: pytest.LogCaptureFixture) -> None:
    """A failed refresh while the old value is unexpired serves the old value and logs a warning."""
    clock = Clock()
    fetch = Fetcher(Expiring("old", T0 + 3600), BackendError("sts:AssumeRole failed (Throttling)"))
    cache = make_cache(clock)
    await cache.get("k", fetch)

    clock.now = T0 + 3600 - 60
    with caplog.at_level(logging.WARNING, logger="backends.credentials"):
        assert await cache.get("k", fetch) == "old"
    assert fetch.calls == 2
    assert any("Throttling" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_failed_refresh_backs_off_before_retrying() -> None:
    """After a failed refresh the old value is served without a new fetch until the backoff elapses."""
    clock = Clock()
    fetch = Fetcher(Expiring("old", T0 + 3600), BackendError("down"), Expiring("new", T0 + 7200))
    cache = make_cache(clock, failure_backoff=10.0)
    await cache.get("k", fetch)

    clock.now = T0 + 3600 - 100
    assert await cache.get("k", fetch) == "old"
    clock.now += 5
    assert await cache.get("k", fetch) == "old"
    assert fetch.calls == 2
    clock.now += 5
    assert await cache.get("k", fetch) == "new"
    assert fetch.calls == 3


async def test_failed_fetch_without_a_valid_value_raises() -> None:
    """A failed fetch raises when there is no value, or only an expired one, to fall back on."""
    clock = Clock()
    cache = make_cache(clock)
    with pytest.raises(BackendError, match="first"):
        await cache.get("k", Fetcher(BackendError("first")))

    await cache.get("k", Fetcher(Expiring("old", T0 + 3600)))
    clock.now = T0 + 3600
    with pytest.raises(BackendError, match="expired"):
        await cache.get("k", Fetcher(BackendError("expired")))


async def test_cache_is_bounded() -> None:
    """The cache holds at most maxsize keys, dropping the least recently used."""
    cache = make_cache(Clock(), maxsize=2)
    for key in "abc":
        await cache.get(key, Fetcher(Expiring(key, T0 + 3600)))
    assert len(cache) == 2
    refetch = Fetcher(Expiring("a2", T0 + 3600))
    assert await cache.get("a", refetch) == "a2"
    assert refetch.calls == 1


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    """A caller that gives up does not cancel the fetch other callers of the key are waiting on."""
    fetch = Fetcher(Expiring("v", T0 + 3600))
    fetch.gate = threading.Event()
    cache = make_cache(Clock())

    quitter = asyncio.create_task(cache.get("k", fetch))
    stayer = asyncio.create_task(cache.get("k", fetch))
    await asyncio.sleep(0.01)
    quitter.cancel()
    fetch.gate.set()
    assert await stayer == "v"
    assert quitter.cancelled()
    assert fetch.calls == 1


async def test_invalidate_forces_a_new_fetch() -> None:
    """After invalidate the next get fetches again."""
    cache = make_cache(Clock())
    await cache.get("k", Fetcher(Expiring("v1", T0 + 3600)))
    cache.invalidate("k")
    assert await cache.get("k", Fetcher(Expiring("v2", T0 + 3600))) == "v2"


async def test_aclose_drops_values() -> None:
    """aclose empties the cache."""
    cache = make_cache(Clock())
    await cache.get("k", Fetcher(Expiring("v", T0 + 3600)))
    await cache.aclose()
    assert len(cache) == 0


def test_invalid_settings_are_refused() -> None:
    """A negative margin or a zero size is refused at construction."""
    with pytest.raises(ValueError):
        RefreshingCache[str, str](refresh_margin=-1)
    with pytest.raises(ValueError):
        RefreshingCache[str, str](maxsize=0)
