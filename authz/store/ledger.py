"""The usage ledger: rows recorded on the hot path, written to PostgreSQL in batches off it.

``record()`` only appends to an in-memory queue. A flusher task writes the queue in batches with
one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT (request_id) DO NOTHING`` per batch. When
PostgreSQL cannot be reached the batch goes to the local :class:`~authz.store.spool.Spool`
instead, and a replay task writes spooled segments back once the database answers again
(DESIGN.md, Inference path, step 5: usage is never silently dropped).

Failure handling, by what went wrong:

* PostgreSQL unreachable, restarting, timing out, or any unexpected error: the batch is spooled and
  the ledger stops trying PostgreSQL until the replay task's probe succeeds, so the flusher never
  waits on a dead server batch after batch.
* PostgreSQL refuses a row's values (class 22 or 23): the batch is retried row by row and only the
  refused rows go to a ``rejected-*.jsonl`` file for an operator, since retrying them cannot help.
* The spool itself fails (disk full): rows stay in memory and are retried on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

import asyncpg

from authz.configtypes import Store
from authz.errors import StoreError
from authz.store.db import Connection, Pool, connect_pool
from authz.store.migrate import migrate as apply_migrations
from authz.store.queries import insert_rows
from authz.store.spool import Spool
from authz.store.usagerow import UsageRow

log = logging.getLogger("authz.store.ledger")

T = TypeVar("T")

# Errors caused by the rows themselves: the server (class 22 data exception, class 23 integrity
# violation) or asyncpg's encoder (a ValueError subclass) refused a value. Retrying cannot help.
_ROW_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
)

# Server errors that mean "this connection is gone" (class 08, or the server shut down under it).
_DEAD_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


def _stale_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says a pooled connection died since it was last used (PostgreSQL restarted,
    a proxy dropped it): worth one immediate retry on fresh connections. Timeouts are not: a server
    that hangs would just hang again."""
    if isinstance(exc, (*_ROW_ERRORS, TimeoutError)):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, _DEAD_CONNECTION_ERRORS)
    # asyncpg reports a connection closed under it as InterfaceError or InternalClientError
    # ("another operation is in progress"), the kernel as a ConnectionError.
    return isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError | ConnectionError)


class Ledger:
    """Batches usage rows into PostgreSQL, spooling them locally while it is unreachable.

    ``settings`` is the ``store`` configuration section. ``pool`` shares an existing pool (the
    ledger then never closes it); otherwise the ledger opens its own on first use and keeps
    retrying while PostgreSQL is down. With ``migrate`` the schema is brought up to date whenever
    the ledger opens a pool. ``batch_timeout`` bounds one batch (acquire plus insert) and defaults
    to ``connect_timeout + 10`` seconds.
    """

    def __init__(
        self,
        settings: Store,
        *,
        pool: Pool | None = None,
        spool: Spool | None = None,
        migrate: bool = True,
        batch_timeout: float | None = None,
        max_pool_size: int = 2,
    ) -> None:
        self._url = settings.url
        self._batch_size = max(1, settings.batch_size)
        self._flush_interval = settings.flush_interval
        self._replay_interval = settings.replay_interval
        self._connect_timeout = settings.connect_timeout
        self._batch_timeout = batch_timeout if batch_timeout is not None else settings.connect_timeout + 10.0
        self._migrate = migrate
        self._max_pool_size = max_pool_size
        self._spool = spool if spool is not None else Spool(settings.spool_dir)
        self._pool: Pool | None = pool
        self._owns_pool = pool is None

        self._queue: deque[UsageRow] = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._replay_lock = asyncio.Lock()
        self._pool_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Optimistic: the first batch finds out. Flipped off by a failed write, on by the probe.
        self._db_ok = True

        self._rows_written = 0
        self._rows_spooled = 0
        self._rows_replayed = 0
        self._rows_rejected = 0

    # --- the hot path ------------------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue ``row`` for writing. Never blocks, never raises; call it from the event loop thread."""
        try:
            if self._closed:
                self._record_after_close(row)
                return
            self._queue.append(row)
            if len(self._queue) >= self._batch_size:
                self._wake.set()
        except Exception:
            # Accounting must never fail a request; the log line is the last trace of the row.
            log.exception("could not queue usage row %s", getattr(row, "request_id", "?"))

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the flush and replay tasks. Returns at once, whether or not PostgreSQL is up."""
        if self._tasks or self._closed:
            raise StoreError("the ledger was already started")
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="ledger-flush"),
            asyncio.create_task(self._replay_loop(), name="ledger-replay"),
        ]

    async def aclose(self) -> None:
        """Stop the tasks and write every queued row: to PostgreSQL, or to the spool if unreachable.

        Rows recorded after this returns are appended to the spool directly.
        """
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        # The loops finish their current batch and exit; cancelling them mid-write would leave a
        # pool connection half-used.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.flush()
        self._closed = True
        if self._queue:
            log.error("%d usage rows could not be written or spooled and are lost", len(self._queue))
            self._queue.clear()
        try:
            await asyncio.to_thread(self._spool.close)
        except OSError:
            log.exception("could not seal the usage spool segment")
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await _close_pool(pool, self._batch_timeout)

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- counters ----------------------------------------------------------------------------

    @property
    def rows_written(self) -> int:
        """Rows written to PostgreSQL straight from the queue."""
        return self._rows_written

    @property
    def rows_spooled(self) -> int:
        """Rows appended to the local spool because PostgreSQL was unreachable."""
        return self._rows_spooled

    @property
    def rows_replayed(self) -> int:
        """Spooled rows later accepted by PostgreSQL (rows already present count too)."""
        return self._rows_replayed

    @property
    def rows_rejected(self) -> int:
        """Rows PostgreSQL refused, set aside in ``rejected-*.jsonl`` files."""
        return self._rows_rejected

    @property
    def pending(self) -> int:
        """Rows queued in memory, not yet written or spooled."""
        return len(self._queue)

    def spooled_bytes(self) -> int:
        """Bytes of rows in the spool waiting for PostgreSQL (blocking file I/O: a metrics thread)."""
        return self._spool.pending_bytes()

    @property
    def database_ok(self) -> bool:
        """False while the ledger believes PostgreSQL is unreachable and spools every batch."""
        return self._db_ok

    # --- flushing ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every queued row now, to PostgreSQL or else to the spool."""
        async with self._flush_lock:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
                try:
                    disposed = await self._dispose(batch)
                except BaseException:
                    # Cancelled or failed mid-batch: the rows go back so a later flush has them.
                    self._queue.extendleft(reversed(batch))
                    raise
                if disposed:
                    continue
                # Neither PostgreSQL nor the disk took the batch: keep it at the head of the queue
                # and try again next tick rather than spin.
                self._queue.extendleft(reversed(batch))
                return

    async def _dispose(self, batch: list[UsageRow]) -> bool:
        if self._db_ok:
            accepted = await self._store(batch)
            if accepted is not None:
                self._rows_written += accepted
                return True
        try:
            await asyncio.to_thread(self._spool.append, batch)
        except OSError as exc:
            log.error("cannot spool %d usage rows to %s: %s", len(batch), self._spool.directory, exc)
            return False
        self._rows_spooled += len(batch)
        return True

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                # The loop must outlive any bug in one pass, or rows would pile up unseen.
                log.exception("usage flush pass failed")

    # --- replay ------------------------------------------------------------------------------

    async def replay(self) -> int:
        """Write spooled segments to PostgreSQL if it answers; return the rows replayed."""
        async with self._replay_lock:
            if (self._pool is None or not self._db_ok) and not await self._probe():
                return 0
            # Seal what this process spooled during the outage so it is replayed too.
            await asyncio.to_thread(self._spool.seal)
            segments = await asyncio.to_thread(self._spool.segments)
            total = 0
            for segment in segments:
                rows = await asyncio.to_thread(self._spool.read, segment)
                for start in range(0, len(rows), self._batch_size):
                    if self._stop.is_set():
                        return total  # shutting down: the segment stays for the next start
                    accepted = await self._store(rows[start : start + self._batch_size])
                    if accepted is None:
                        return total
                    total += accepted
                    self._rows_replayed += accepted
                await asyncio.to_thread(self._spool.remove, segment)
            if segments:
                log.info("replayed %d spooled usage rows from %d segments", total, len(segments))
            return total

    async def _replay_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.replay()
            except Exception:
                log.exception("usage replay pass failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._replay_interval):
                    await self._stop.wait()

    async def _probe(self) -> bool:
        try:
            await self._with_connection(lambda conn: conn.fetchval("SELECT 1", timeout=self._batch_timeout))
        except Exception as exc:
            self._mark_down(exc)
            return False
        if not self._db_ok:
            log.warning("PostgreSQL is reachable again; writing usage rows to it")
        self._db_ok = True
        return True

    # --- writing -----------------------------------------------------------------------------

    async def _store(self, rows: Sequence[UsageRow]) -> int | None:
        """Write ``rows``; the number accepted (refused rows are set aside), or None if unreachable."""
        try:
            await self._insert(rows)
            return len(rows)
        except _ROW_ERRORS as exc:
            if len(rows) == 1:
                return 0 if await self._reject(rows, exc) else None
            first_error: BaseException = exc
        except Exception as exc:
            self._mark_down(exc)
            return None
        # One bad value fails the whole statement: find the culprits one row at a time.
        refused: list[UsageRow] = []
        for row in rows:
            try:
                await self._insert([row])
            except _ROW_ERRORS:
                refused.append(row)
            except Exception as exc:
                self._mark_down(exc)
                return None
        if refused and not await self._reject(refused, first_error):
            return None
        return len(rows) - len(refused)

    async def _reject(self, rows: Sequence[UsageRow], exc: BaseException) -> bool:
        try:
            path = await asyncio.to_thread(self._spool.reject, rows)
        except Exception:
            log.exception("cannot set aside %d refused usage rows", len(rows))
            return False
        self._rows_rejected += len(rows)
        log.error(
            "PostgreSQL refused %d usage rows (%s: %s); kept in %s for inspection",
            len(rows),
            type(exc).__name__,
            exc,
            path,
        )
        return True

    async def _insert(self, rows: Sequence[UsageRow]) -> None:
        await self._with_connection(lambda conn: insert_rows(conn, rows))

    async def _with_connection(self, use: Callable[[Connection], Awaitable[T]]) -> T:
        pool = await self._get_pool()
        try:
            return await self._once(pool, use)
        except Exception as exc:
            if not _stale_connection(exc):
                raise
            log.debug("retrying on fresh connections after %s: %s", type(exc).__name__, exc)
        # After a restart every idle connection in the pool is dead, not just the one we drew:
        # have the pool replace them all rather than discover them one failed batch at a time.
        await pool.expire_connections()
        return await self._once(pool, use)

    async def _once(self, pool: Pool, use: Callable[[Connection], Awaitable[T]]) -> T:
        conn = await pool.acquire(timeout=self._batch_timeout)
        try:
            async with asyncio.timeout(self._batch_timeout):
                return await use(conn)
        except BaseException as exc:
            # A server error leaves the connection usable, unless it says the connection is gone.
            # After a timeout, a cancellation or a broken socket its state is unknown: dropping it
            # makes the release below immediate (no reset round trip that could hang) and lets the
            # pool open a fresh connection next time.
            if not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, _DEAD_CONNECTION_ERRORS):
                conn.terminate()
            raise
        finally:
            await pool.release(conn, timeout=self._batch_timeout)

    async def _get_pool(self) -> Pool:
        async with self._pool_lock:
            if self._pool is not None:
                return self._pool
            pool = await connect_pool(
                self._url, min_size=1, max_size=self._max_pool_size, timeout=self._connect_timeout
            )
            if self._migrate:
                try:
                    # Bounded, or a server that hangs mid-migration would hold the pool lock and
                    # wedge the flusher; the advisory lock may make replicas wait on each other.
                    async with asyncio.timeout(max(60.0, self._batch_timeout)):
                        async with pool.acquire(timeout=self._batch_timeout) as conn:
                            await apply_migrations(conn)
                except BaseException:
                    await _close_pool(pool, self._batch_timeout)
                    raise
            self._pool = pool
            return pool

    def _mark_down(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self._batch_timeout:g}s"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        if self._db_ok:
            log.warning(
                "PostgreSQL unreachable (%s); spooling usage rows to %s until it is back",
                reason,
                self._spool.directory,
            )
        else:
            log.debug("PostgreSQL still unreachable (%s)", reason)
        self._db_ok = False

    def _record_after_close(self, row: UsageRow) -> None:
        # Late rows (a stream that outlived the shutdown grace period) still must not be lost; the
        # blocking write is acceptable once the ledger is closed.
        try:
            self._spool.append([row])
            self._spool.seal()
        except OSError:
            log.exception("usage row %s recorded after close could not be spooled", row.request_id)
            return
        self._rows_spooled += 1


async def _close_pool(pool: Pool, grace: float) -> None:
    try:
        async with asyncio.timeout(grace):
            await pool.close()
    except Exception:
        # A connection stuck on a dead server must not hold up shutdown.
        pool.terminate()
