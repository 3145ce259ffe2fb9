"""The retention schedule: worker 0 of each replica prunes old rows every ``retention.interval``.

What goes and when is in ``docs/configuration.md`` (``retention``); how (bounded batches, one
replica at a time) in :mod:`authz.store.retention`. A failed round is logged and retried at the
next interval: pruning is housekeeping and never stops the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from authz.configtypes import Retention
from authz.errors import StoreError
from authz.store.db import Pool
from authz.store.retention import Cutoffs, PruneReport, prune

log = logging.getLogger("authz.ops.retention")

# The first round waits this long after start-up, so a fleet restarting together does not prune
# while it is also warming caches and migrating.
FIRST_ROUND_DELAY = 60.0


def cutoffs(retention: Retention, now: datetime) -> Cutoffs:
    """The cutoffs ``retention`` sets at ``now``."""
    return Cutoffs.at(
        now,
        expired_session_days=retention.expired_session_days,
        usage_days=retention.usage_days,
        audit_days=retention.audit_days,
    )


async def prune_once(pool: Pool, retention: Retention, now: datetime) -> PruneReport:
    """One round on a connection of ``pool``."""
    async with pool.acquire() as conn:
        return await prune(conn, cutoffs(retention, now), batch_size=retention.batch_size)


class Pruner:
    """Runs :func:`prune_once` every ``retention.interval`` seconds until :meth:`aclose`."""

    def __init__(
        self,
        pool: Pool,
        retention: Retention,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        first_delay: float = FIRST_ROUND_DELAY,
    ) -> None:
        self._pool = pool
        self._retention = retention
        self._clock = clock
        self._first_delay = first_delay
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        """Start the schedule in the background."""
        self._task = asyncio.create_task(self._run(), name="retention-pruner")

    async def aclose(self) -> None:
        """Stop the schedule (a round in progress is cancelled between statements)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        await asyncio.sleep(self._first_delay)
        while True:
            try:
                report = await prune_once(self._pool, self._retention, self._clock())
            except StoreError as exc:
                log.warning("retention: %s; trying again in %gs", exc, self._retention.interval)
            except Exception:
                log.exception("retention: unexpected error; trying again later")
            else:
                self.rounds += 1
                if report.skipped:
                    log.debug("retention: another replica is pruning")
                elif report.total:
                    log.info(
                        "retention: deleted %s",
                        ", ".join(f"{n} {name}" for name, n in report.deleted.items() if n),
                    )
            await asyncio.sleep(self._retention.interval)
