"""Deleting old rows in bounded batches: the SQL behind :mod:`authz.ops.retention`.

Each batch is one ``DELETE ... WHERE ctid = ANY(ARRAY(SELECT ctid ... LIMIT n))`` in its own
transaction (the connection is in autocommit between statements), found through the index on the
column it selects by, so no statement holds row locks for long and the ledger's inserts never wait
behind a prune. A session-level advisory lock lets one replica prune at a time; the others skip
the round. The clock is passed in, so tests move it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from authz.errors import StoreError
from authz.store.db import Connection

# pg_try_advisory_lock key: the ASCII of "cgw:prun", fixed forever (see migrate.MIGRATION_LOCK_KEY).
PRUNE_LOCK_KEY = 0x6367773A7072756E


@dataclass(frozen=True, slots=True)
class Target:
    """One kind of row to prune: ``table`` rows matching ``condition`` (``$1`` is the cutoff)."""

    name: str
    table: str
    condition: str


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """What "old" means for each kind of row, as absolute times."""

    now: datetime
    sessions_before: datetime
    usage_before: datetime
    audit_before: datetime

    @classmethod
    def at(cls, now: datetime, *, expired_session_days: int, usage_days: int, audit_days: int) -> Cutoffs:
        """The cutoffs at ``now`` for the given retention periods."""
        return cls(
            now=now,
            sessions_before=now - timedelta(days=expired_session_days),
            usage_before=now - timedelta(days=usage_days),
            audit_before=now - timedelta(days=audit_days),
        )


# In order: refresh tokens of the sessions about to go before the sessions themselves, so no
# single statement cascades into an unbounded number of rows.
_TARGETS: tuple[tuple[Target, str], ...] = (
    (Target("device_codes", "device_codes", "expires_at <= $1"), "now"),
    (
        Target(
            "auth_requests",
            "auth_requests",
            "expires_at <= $1 AND (approval_expires_at IS NULL OR approval_expires_at <= $1)",
        ),
        "now",
    ),
    (Target("logout_jtis", "logout_jtis", "expires_at <= $1"), "now"),
    (
        Target(
            "refresh_tokens",
            "refresh_tokens",
            "session_id IN (SELECT id FROM sessions WHERE expires_at <= $1)",
        ),
        "sessions_before",
    ),
    (Target("sessions", "sessions", "expires_at <= $1"), "sessions_before"),
    (Target("service_tokens", "service_tokens", "expires_at <= $1"), "sessions_before"),
    (Target("usage_events", "usage_events", "started_at < $1"), "usage_before"),
    (Target("audit_events", "audit_events", "at < $1"), "audit_before"),
)

TARGET_NAMES: tuple[str, ...] = tuple(t.name for t, _ in _TARGETS)


@dataclass
class PruneReport:
    """How many rows went per kind, and in how many statements; ``skipped`` when another replica
    held the prune lock."""

    deleted: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    skipped: bool = False

    @property
    def total(self) -> int:
        """Rows deleted in all."""
        return sum(self.deleted.values())


def _delete_sql(target: Target) -> str:
    # Table and condition come from _TARGETS above; the cutoff and the batch size are parameters.
    return (
        f"DELETE FROM {target.table} WHERE ctid = ANY(ARRAY("  # noqa: S608 - fixed names, see above
        f"SELECT ctid FROM {target.table} WHERE {target.condition} LIMIT $2))"
    )


async def prune(
    conn: Connection, cutoffs: Cutoffs, *, batch_size: int, only: Sequence[str] | None = None
) -> PruneReport:
    """Delete every row older than its cutoff, ``batch_size`` rows per statement, on ``conn``
    (which must not be inside a transaction). Returns at once, ``skipped``, when another process
    holds the prune lock."""
    report = PruneReport()
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PRUNE_LOCK_KEY):
            report.skipped = True
            return report
        try:
            for target, which in _TARGETS:
                if only is not None and target.name not in only:
                    continue
                cutoff: datetime = getattr(cutoffs, which)
                sql = _delete_sql(target)
                deleted = batches = 0
                while True:
                    status: str = await conn.execute(sql, cutoff, batch_size)
                    # The command tag is "DELETE <count>".
                    count = int(status.rsplit(" ", 1)[-1])
                    if count == 0:
                        break
                    deleted += count
                    batches += 1
                    if count < batch_size:
                        break
                report.deleted[target.name] = deleted
                report.batches[target.name] = batches
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", PRUNE_LOCK_KEY)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"pruning old rows failed: {exc}") from exc
    return report
