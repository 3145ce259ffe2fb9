"""Spend caps and rate limits at admission: what ext_authz does after policy allowed a request.

:meth:`LimitGate.admit` takes the policy's :class:`~authz.gateway.authorize.Allow` and either keeps
it (with the caller's standing headers and the spend reservation in the request identity) or turns
it into a :class:`~authz.gateway.authorize.Deny`: 429 ``billing_error`` over a spend cap, 429
``rate_limit_error`` over a rate limit. A caller without caps or limits costs a dictionary lookup.

Caps and limits live in the configuration (the policies and the ``spend`` section) and in
PostgreSQL (``spend_limits``, read at every sync), never in module state, so a new configuration or
a changed cap takes effect without a restart: :meth:`LimitGate.configure` swaps the rules whole
(:class:`_Rules`), and each admission reads them once when it starts, so one that waits on
PostgreSQL finishes under the rules it started with.

Each worker runs one sync task (every ``spend.sync_interval`` seconds): lease renewal and release
(:class:`~authz.billing.leases.LeaseBook`), the caps set at run time, the groups whose shared spend
is counted, and the rate counters (:class:`~authz.billing.ratelimit.RateLimiter`).

When PostgreSQL cannot be reached, budget already leased keeps admitting (it is reserved); a request
that needs more gets ``spend.on_store_error``: ``closed`` (the default) refuses capped callers with
the ``fetch_error`` shape, ``open`` admits them for at most ``spend.open_grace`` seconds from the
first failure while the last known spend plus what was admitted since stays under each cap. Rows
of requests admitted that way are counted when they are written (from the spool, if need be).
Rate limits keep counting locally meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from authz.billing.caps import Cap, CapIndex, StoredLimit, stored_limits, user_key
from authz.billing.estimate import dearest_model, estimate_usd, max_tokens_of
from authz.billing.leases import Admitted, LeaseBook, Short
from authz.billing.periods import PeriodClock
from authz.billing.pricing import PriceBook
from authz.billing.ratelimit import RateLimiter, RateRefusal
from authz.billing.standing import (
    FETCH_ERROR,
    Standing,
    describe_cap,
    fetch_error_message,
    refusal_headers,
    refusal_message,
    standing_headers,
)
from authz.configtypes import GatewayConfig, Policy, RateLimits
from authz.envoy.names import AUTHZ_BODY_BYTES
from authz.errors import StoreError
from authz.gateway.authorize import Allow, Deny, deny_with_row
from authz.identity import RequestIdentity, Reservation
from authz.store.db import Pool
from authz.store.spend import Bucket, load_limits, prune, track_group, tracked_groups
from authz.translate.envelope import ErrorReply, error_reply

log = logging.getLogger("authz.gateway.limits")

# Operations that name no model and cost nothing: never reserved for, never refused by a cap.
FREE_OPERATIONS = frozenset({"count_tokens", "list_profiles", "list_models"})
# How long a refusal caused by budget held in flight asks the client to wait.
HELD_RETRY_AFTER = 2
# Spend state the sync prunes about once a minute (any worker may; the deletes are idempotent).
_PRUNE_EVERY = 60.0
_ZERO = Decimal(0)


# Callers whose caps are kept computed (the cache is emptied when full, and at every change of caps).
_PLAN_CACHE = 10_000


@dataclass(frozen=True, slots=True)
class _Plan:
    """What admission checks for one caller on one UTC day: the caps, each one's bucket (with the
    cap) and reset, and the policy's rate limits (None: none)."""

    caps: tuple[Cap, ...]
    needs: tuple[tuple[Bucket, Decimal], ...]
    resets: tuple[datetime, ...]
    limits: RateLimits | None
    day: float


@dataclass(slots=True)
class _Rules:
    """What admission reads from one configuration and one read of the caps set at run time,
    replaced whole when either changes. ``plans`` is its cache of callers' plans."""

    config: GatewayConfig
    prices: PriceBook
    policies: dict[str, Policy]
    index: CapIndex
    anything: bool
    plans: dict[tuple[str | None, str | None, tuple[str, ...]], _Plan]


def _rules(config: GatewayConfig, prices: PriceBook, stored: tuple[StoredLimit, ...]) -> _Rules:
    return _Rules(
        config=config,
        prices=prices,
        policies={p.name: p for p in config.policies},
        index=CapIndex(config.policies, config.spend, stored),
        anything=bool(
            stored
            or config.spend.org_caps
            or config.spend.group_budgets
            or any(p.spend_caps or p.rate_limits.any for p in config.policies)
        ),
        plans={},
    )


def holder_name() -> str:
    """How this worker is named on its leases: host, process and a random suffix (a restarted
    process never adopts a dead one's leases)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class LimitGate:
    """Spend caps and rate limits for one worker."""

    def __init__(
        self,
        config: GatewayConfig,
        prices: PriceBook,
        db: Pool | None,
        *,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
        on_reserved: Callable[[float, str], None] = lambda _usd, _scope: None,
        on_refused: Callable[[str], None] = lambda _scope: None,
    ) -> None:
        # Telemetry hooks: USD reserved per kind of cap it counts against; a refusal by the kind
        # of cap that blocked ("store" when the spend store was unreachable).
        self._on_reserved = on_reserved
        self._on_refused = on_refused
        self._db = db
        self._clock = clock
        self._stored: tuple[StoredLimit, ...] = ()
        self._periods = PeriodClock()
        self._rates = RateLimiter()
        spend = config.spend
        self._leases = (
            LeaseBook(
                db,
                holder or holder_name(),
                fraction=Decimal(str(spend.lease_fraction)),
                lease_ttl=spend.lease_ttl,
                idle_release=5 * spend.sync_interval,
                top_up_timeout=max(0.2, min(1.0, config.limits.ext_authz_timeout / 2)),
            )
            if db is not None
            else None
        )
        self._down_since: float | None = None
        self._unleased: dict[Bucket, Decimal] = {}
        self._tracked: set[str] = set()
        self._pruned_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._rules = _rules(config, prices, self._stored)

    @property
    def _config(self) -> GatewayConfig:
        return self._rules.config

    def configure(self, config: GatewayConfig, prices: PriceBook | None = None) -> None:
        """Apply a reloaded configuration: its policies, ``spend`` section and prices (``None``:
        the current ones). Admissions under way finish under the rules they started with; leases
        already granted keep their budget and take the new ``spend.lease_ttl`` at their renewal."""
        self._rules = _rules(config, prices or self._rules.prices, self._stored)
        leases = self._leases
        if leases is not None:
            spend = config.spend
            leases.fraction = Decimal(str(spend.lease_fraction))
            leases.lease_ttl = spend.lease_ttl
            leases.idle_release = 5 * spend.sync_interval

    # --- admission ---------------------------------------------------------------------------

    async def admit(self, allow: Allow, body: bytes) -> Allow | Deny:
        """Apply the caller's rate limits and spend caps to an allowed request."""
        rules = self._rules
        if not rules.anything:
            return allow
        identity = allow.identity
        caller = identity.caller
        if caller is None:
            return allow
        user = user_key(caller.email, caller.sub)
        now = identity.started_at
        plan = self._plan(rules, identity.policy, user, caller.groups, now)
        caps = plan.caps
        limits = plan.limits
        if not caps and (limits is None or not limits.any):
            return allow
        if user is not None and limits is not None and limits.any:
            refused = self._rates.admit(user, limits, now)
            if refused is not None:
                return self._deny(
                    rules, identity, _rate_reply(refused), f"rate_limit: {refused.limit} {refused.value}"
                )
        if not caps or identity.operation in FREE_OPERATIONS:
            return allow
        decision = await self._spend(rules, allow, plan, body, now)
        if isinstance(decision, Deny) and user is not None and limits is not None and limits.any:
            self._rates.forget(user, now)
        return decision

    def _plan(
        self, rules: _Rules, policy: str | None, user: str | None, groups: tuple[str, ...], now: float
    ) -> _Plan:
        """The caller's caps with their buckets for the day of ``now`` and rate limits, cached: the
        same caller asks again and again, and only a new UTC day (or a new configuration or set of
        caps, which empties the cache) changes the answer."""
        key = (policy, user, groups)
        plan = rules.plans.get(key)
        if plan is not None and plan.day <= now < plan.day + 86400.0:
            return plan
        caps = rules.index.caps(policy, user, groups)
        bounds = [self._periods.bounds(cap.period, now) for cap in caps]
        found = rules.policies.get(policy or "")
        plan = _Plan(
            caps=caps,
            needs=tuple(
                (Bucket(cap.scope, cap.name, cap.period, start), cap.usd)
                for cap, (start, _end) in zip(caps, bounds, strict=True)
            ),
            resets=tuple(end for _start, end in bounds),
            limits=found.rate_limits if found is not None and found.rate_limits.any else None,
            day=self._periods.bounds("daily", now)[0].timestamp(),
        )
        if len(rules.plans) >= _PLAN_CACHE:
            rules.plans.clear()
        rules.plans[key] = plan
        return plan

    async def _spend(self, rules: _Rules, allow: Allow, plan: _Plan, body: bytes, now: float) -> Allow | Deny:
        identity = allow.identity
        caps = plan.caps
        whole = identity.request_bytes <= len(body) < AUTHZ_BODY_BYTES
        model = identity.model
        if model is None:
            # A Messages request names its model in the body (the exchange checks it there).
            model = dearest_model(rules.prices, body, regional=identity.regional)
        usd = estimate_usd(
            rules.prices,
            model,
            regional=identity.regional,
            request_bytes=max(identity.request_bytes, len(body)),
            # Only a whole body says what max_tokens is: past ext_authz's share of a large body the
            # top-level key may follow a smaller nested one, so a prefix gets the largest output.
            max_tokens=max_tokens_of(body) if whole else None,
        )
        needs = plan.needs
        buckets = [bucket for bucket, _usd in needs]
        leases = self._leases
        result: Admitted | Short | None = None
        if leases is not None and self._down_since is None:
            try:
                result = await leases.reserve(needs, usd, now)
            except (StoreError, TimeoutError) as exc:
                self._store_failed(now, exc)
        elif leases is not None:
            # PostgreSQL is known to be down: budget already leased still admits (it is reserved);
            # the sync task notices when it is back.
            result = leases.reserve_local(needs, usd, now)
        if result is None:
            return self._store_down(rules, allow, caps, buckets, usd, now)
        if isinstance(result, Short):
            cap = caps[buckets.index(result.bucket)]
            return self._refuse(rules, identity, cap, result, now)
        assert leases is not None
        standings = [
            Standing(cap, leases.spent(bucket) or _ZERO, reset)
            for cap, bucket, reset in zip(caps, buckets, plan.resets, strict=True)
        ]
        for scope in {cap.scope for cap in caps}:
            self._on_reserved(float(usd), scope)
        return Allow(
            allow.set_headers,
            allow.remove_headers,
            replace(identity, reservation=Reservation(usd, result.leases)),
            standing_headers(standings),
        )

    def _reset(self, cap: Cap, now: float) -> datetime:
        return self._periods.bounds(cap.period, now)[1]

    def _refuse(self, rules: _Rules, identity: RequestIdentity, cap: Cap, short: Short, now: float) -> Deny:
        self._on_refused(cap.scope)
        reset = self._reset(cap, now)
        if not short.hard:
            reply = error_reply(
                "rate_limit_error",
                f"The rest of {describe_cap(cap)} is held by requests still in flight; retry in a moment.",
                retry_after=HELD_RETRY_AFTER,
            )
            return self._deny(rules, identity, reply, f"spend_cap_held: {cap.label}")
        reply = error_reply(
            "billing_error",
            refusal_message(cap, reset, rules.config.spend.increase_url),
            should_retry=False,
            retry_after=max(1, int(reset.timestamp() - now + 0.999)),
            headers=refusal_headers(cap, reset),
        )
        return self._deny(rules, identity, reply, f"spend_cap: {cap.label}")

    def _store_down(
        self,
        rules: _Rules,
        allow: Allow,
        caps: tuple[Cap, ...],
        buckets: Sequence[Bucket],
        usd: Decimal,
        now: float,
    ) -> Allow | Deny:
        identity = allow.identity
        spend = rules.config.spend
        since = self._down_since if self._down_since is not None else now
        if spend.on_store_error == "open" and now - since <= spend.open_grace:
            for cap, bucket in zip(caps, buckets, strict=True):
                known = self._leases.spent(bucket) if self._leases is not None else None
                unleased = self._unleased.get(bucket, _ZERO)
                if known is not None and known + unleased + usd > cap.usd:
                    return self._refuse(rules, identity, cap, Short(bucket, known + unleased, hard=True), now)
            for bucket in buckets:
                self._unleased[bucket] = self._unleased.get(bucket, _ZERO) + usd
            # No lease: the row still adds its cost to the counters when it is written.
            return replace(allow, identity=replace(identity, reservation=Reservation(usd)))
        cap = caps[0]
        reset = self._reset(cap, now)
        reply = error_reply(
            "billing_error",
            fetch_error_message(),
            should_retry=False,
            retry_after=30,
            headers=refusal_headers(cap, reset, reason=FETCH_ERROR),
        )
        self._on_refused("store")
        return self._deny(rules, identity, reply, "spend_cap: the spend store is unreachable")

    def _deny(self, rules: _Rules, identity: RequestIdentity, reply: ErrorReply, reason: str) -> Deny:
        return deny_with_row(identity, reply, reason, rules.prices)

    # --- store health and the sync task ------------------------------------------------------

    def _store_failed(self, now: float, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "spend store unreachable (%s); spend.on_store_error is %s",
                exc or type(exc).__name__,
                self._config.spend.on_store_error,
            )

    def _store_back(self) -> None:
        if self._down_since is not None:
            log.warning("spend store reachable again")
        self._down_since = None
        self._unleased.clear()

    async def sync(self) -> None:
        """One sync pass: leases, caps set at run time, counted groups, rate counters, pruning."""
        db = self._db
        if db is None or self._leases is None:
            return
        now = self._clock()
        try:
            await self._leases.sync(now)
            stored = stored_limits(await load_limits(db))
            if stored != self._stored:
                self._stored = stored
                rules = self._rules
                self._rules = _rules(rules.config, rules.prices, stored)
            await self._track(db)
            await self._rates.sync(db, now)
            if now - self._pruned_at > _PRUNE_EVERY:
                await prune(db)
                self._pruned_at = now
        except (StoreError, TimeoutError) as exc:
            self._store_failed(now, exc)
            return
        self._store_back()

    async def _track(self, db: Pool) -> None:
        pooled = self._rules.index.pooled_groups - self._tracked
        if not pooled:
            return
        self._tracked = await tracked_groups(db)
        for group in sorted(pooled - self._tracked):
            await track_group(db, group)
            self._tracked.add(group)

    async def start(self, first_sync_timeout: float = 2.0) -> None:
        """Run a first sync (briefly awaited, so caps set at run time apply from the first request),
        then sync every ``spend.sync_interval`` seconds in the background."""
        if self._db is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_sync_timeout):
                await self.sync()
        self._task = asyncio.create_task(self._loop(), name="spend-sync")

    async def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.spend.sync_interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                async with asyncio.timeout(max(5.0, self._config.spend.sync_interval)):
                    await self.sync()
            except TimeoutError as exc:
                self._store_failed(self._clock(), exc)
            except Exception:
                # The loop must outlive any bug in one pass, or leases would lapse unseen.
                log.exception("spend sync pass failed")

    async def aclose(self) -> None:
        """Stop syncing and give back every unused lease (best effort: otherwise it lapses)."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._leases is not None and self._down_since is None:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._leases.release_unused()


def _rate_reply(refused: RateRefusal) -> ErrorReply:
    what = "requests" if refused.limit == "requests_per_minute" else "tokens"
    return error_reply(
        "rate_limit_error",
        f"Rate limit: your policy allows {refused.value} {what} per minute; "
        f"retry in {refused.retry_after} s.",
        retry_after=refused.retry_after,
    )
