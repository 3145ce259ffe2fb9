"""A worker's leases on spend budget: admission without a PostgreSQL round trip far from a cap, and
exact reservations near it.

Each capped spend (a :class:`~authz.store.spend.Bucket`: a user's, a group's shared or everyone's
spend in one period) has at most one lease per worker. A request is admitted when every bucket it
spends from has its estimate free in this worker's lease: the estimate is taken off locally, no
I/O. When a lease runs short, one transaction tops the short leases up (:func:`authz.store.spend.top_up`):
the shortfall plus ``lease_fraction`` of the room left, so far from the cap one top-up admits many
requests, and near it each request asks for exactly its own estimate. PostgreSQL grants only what
fits under the cap beside the settled spend and every worker's live leases, so the estimates
admitted never add up to more than the cap.

Settlement happens elsewhere (the ledger of whichever worker writes the row): the row carries the
lease ids and the estimate, and its insert takes the estimate back off those leases while adding the
real cost to the counters. A lease's central amount is thus always this worker's free budget plus
its admitted requests not yet written.

The worker's sync (:meth:`LeaseBook.sync`) renews its leases (an expired one is never revived: its
budget may have been granted elsewhere), gives back budget unused for a while, and refreshes the
settled spend it reports in the standing headers.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from authz.billing.periods import PeriodClock
from authz.store.db import Pool
from authz.store.spend import Bucket, TopUp, release, renew_leases, spent_in, top_up

_ZERO = Decimal(0)
# After a refused top-up, requests that would need more than the room PostgreSQL reported are
# refused locally for this long instead of asking again (a flood of refused requests must not load
# the database); a smaller request, or one after it, asks again.
REFUSAL_HOLD = 1.0


@dataclass(slots=True)
class _Lease:
    lease_id: str
    free: Decimal = _ZERO
    cap: Decimal | None = None
    spent: Decimal | None = None  # settled spend, as of the last top-up or sync
    last_used: float = 0.0
    room: Decimal | None = None  # room PostgreSQL reported when it last refused a top-up
    refused_at: float = float("-inf")
    release: Decimal = _ZERO  # budget to give back at the next sync (the cap went down)
    unit: Decimal = _ZERO  # the last request's estimate: free budget below it is of no use here


@dataclass(frozen=True, slots=True)
class Admitted:
    """The estimate was reserved on these leases (one per bucket, in the order asked)."""

    leases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Short:
    """No room for the estimate in ``bucket``: ``hard`` when its settled ``spent`` plus the estimate
    passes the cap (the cap is used up), otherwise the room is held by requests still in flight or by
    other workers' leases, and will come back as their rows are written or their leases lapse."""

    bucket: Bucket
    spent: Decimal
    hard: bool


def new_lease_id() -> str:
    """A lease id no other worker will ever use."""
    return secrets.token_hex(8)


@dataclass
class LeaseBook:
    """One worker's leases. ``db`` is its pool; ``holder`` names the worker in ``spend_leases``."""

    db: Pool
    holder: str
    fraction: Decimal
    lease_ttl: float
    idle_release: float
    top_up_timeout: float = 1.0
    _leases: dict[Bucket, _Lease] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _renewed_at: float = float("-inf")
    _periods: PeriodClock = field(default_factory=PeriodClock)

    def spent(self, bucket: Bucket) -> Decimal | None:
        """The settled spend last seen for ``bucket``, or None if never seen."""
        lease = self._leases.get(bucket)
        return None if lease is None else lease.spent

    def usable(self, now: float) -> bool:
        """Whether the leases were renewed recently enough to admit from them: a worker cut off from
        PostgreSQL longer than most of a lease's life stops using it (its budget may be granted
        elsewhere once it lapses)."""
        return now - self._renewed_at < self.lease_ttl * 0.8

    def reserve_local(
        self, needs: Sequence[tuple[Bucket, Decimal]], usd: Decimal, now: float
    ) -> Admitted | None:
        """Take ``usd`` off this worker's lease on every bucket (with its cap), or None when one of them
        lacks it, its cap changed, or the leases are stale. No I/O."""
        leases = []
        for bucket, cap in needs:
            lease = self._leases.get(bucket)
            if lease is None or lease.free < usd or lease.cap != cap:
                return None
            leases.append(lease)
        if not self.usable(now):
            return None
        for lease in leases:
            lease.free -= usd
            lease.last_used = now
            lease.unit = usd
        return Admitted(tuple(lease.lease_id for lease in leases))

    def refused_locally(
        self, needs: Sequence[tuple[Bucket, Decimal]], usd: Decimal, now: float
    ) -> Short | None:
        """A recent refusal that still stands for a request of ``usd``, without asking PostgreSQL."""
        for bucket, cap in needs:
            lease = self._leases.get(bucket)
            if (
                lease is not None
                and lease.cap == cap
                and lease.free < usd
                and lease.room is not None
                and now - lease.refused_at < REFUSAL_HOLD
                and lease.free + lease.room < usd
            ):
                return self._short(bucket, lease, usd)
        return None

    async def reserve(
        self, needs: Sequence[tuple[Bucket, Decimal]], usd: Decimal, now: float
    ) -> Admitted | Short:
        """Reserve ``usd`` on every bucket, topping leases up in PostgreSQL when they run short.

        Raises :class:`~authz.errors.StoreError` when PostgreSQL cannot be reached in time.
        """
        admitted = self.reserve_local(needs, usd, now)
        if admitted is not None:
            return admitted
        refused = self.refused_locally(needs, usd, now)
        if refused is not None:
            return refused
        async with self._lock:
            # Another request may have topped the leases up while this one waited.
            admitted = self.reserve_local(needs, usd, now)
            if admitted is not None:
                return admitted
            async with asyncio.timeout(self.top_up_timeout):
                if not self.usable(now):
                    await self._sync(now)
                for _attempt in range(2):
                    wants = [
                        TopUp(bucket, lease.lease_id, cap, usd - lease.free, usd, self.fraction)
                        for bucket, cap in needs
                        if (lease := self._adopt(bucket, cap)).free < usd
                    ]
                    if not wants:
                        break
                    lost = False
                    for grant in await top_up(self.db, self.holder, wants, self.lease_ttl):
                        lease = self._leases[grant.bucket]
                        lease.spent = grant.spent
                        if grant.lost:
                            # Its budget lapsed centrally: start a fresh lease and ask once more.
                            lease.lease_id, lease.free, lost = new_lease_id(), _ZERO, True
                        elif grant.granted == 0:
                            lease.room, lease.refused_at = grant.room, now
                        else:
                            lease.free += grant.granted
                    if not lost:
                        break
            admitted = self.reserve_local(needs, usd, now)
            if admitted is not None:
                return admitted
            bucket = next((b for b, _cap in needs if self._leases[b].free < usd), needs[0][0])
            return self._short(bucket, self._leases[bucket], usd)

    def _adopt(self, bucket: Bucket, cap: Decimal) -> _Lease:
        lease = self._leases.get(bucket)
        if lease is None:
            lease = self._leases[bucket] = _Lease(new_lease_id(), cap=cap)
        elif lease.cap != cap:
            if lease.cap is not None and cap < lease.cap:
                # A lowered cap: what this worker holds unused goes back, and is asked for again
                # under the new cap.
                lease.release += lease.free
                lease.free = _ZERO
            lease.cap, lease.room = cap, None
        return lease

    @staticmethod
    def _short(bucket: Bucket, lease: _Lease, usd: Decimal) -> Short:
        spent = lease.spent if lease.spent is not None else _ZERO
        cap = lease.cap if lease.cap is not None else _ZERO
        return Short(bucket, spent, hard=spent + usd > cap)

    async def release_unused(self) -> None:
        """Give back every lease's unused budget (the worker is stopping)."""
        async with self._lock:
            giving = [(lease.lease_id, lease.free + lease.release) for lease in self._leases.values()]
            for lease in self._leases.values():
                lease.free = lease.release = _ZERO
            await release(self.db, [(i, a) for i, a in giving if a > 0])

    async def sync(self, now: float) -> None:
        """Renew the leases, give back idle and released budget, refresh the settled spend, and
        forget buckets of periods that ended. Raises StoreError when PostgreSQL does not answer."""
        async with self._lock:
            await self._sync(now)

    async def _sync(self, now: float) -> None:
        alive = await renew_leases(self.db, self.holder, self.lease_ttl)
        self._renewed_at = now
        giving: list[tuple[str, Decimal]] = []
        for lease in self._leases.values():
            if lease.lease_id not in alive and lease.free > 0:
                # Lapsed while this worker could not renew it: its budget is no longer ours.
                lease.lease_id, lease.free, lease.release = new_lease_id(), _ZERO, _ZERO
                continue
            amount = lease.release
            # Unused for a while, or a fragment smaller than the last request: better given back to
            # the workers that can use it.
            if lease.free > 0 and (now - lease.last_used > self.idle_release or lease.free < lease.unit):
                amount += lease.free
                lease.free = _ZERO
            if amount > 0:
                giving.append((lease.lease_id, amount))
                lease.release = _ZERO
        try:
            await release(self.db, giving)
        except BaseException:
            # Still held centrally: keep it to give back next time.
            for lease_id, amount in giving:
                for lease in self._leases.values():
                    if lease.lease_id == lease_id:
                        lease.release += amount
            raise
        current = [b for b in self._leases if b.start == self._periods.bounds(b.period, now)[0]]
        for bucket in set(self._leases) - set(current):
            del self._leases[bucket]
        for bucket, spent in (await spent_in(self.db, current)).items():
            self._leases[bucket].spent = spent
