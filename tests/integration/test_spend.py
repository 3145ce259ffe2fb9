"""Spend caps and rate limits against a real PostgreSQL: settlement in the ledger's insert, leases
shared by several workers, the gate's refusals and standing, period resets, the spool, store
outages, rate counters shared between workers, and the audited caps set at run time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from authz.billing.leases import Admitted, LeaseBook, Short
from authz.billing.periods import period_start
from authz.billing.pricing import PriceBook
from authz.billing.ratelimit import RateLimiter
from authz.configtypes import (
    GatewayConfig,
    GroupBudget,
    Policy,
    Price,
    Pricing,
    RateLimits,
    Spend,
    SpendCap,
    Store,
)
from authz.gateway.authorize import Allow, Deny
from authz.gateway.limits import LimitGate
from authz.identity import Caller, RequestIdentity, Reservation
from authz.store.db import Pool, connect_pool
from authz.store.ledger import Ledger
from authz.store.migrate import migrate
from authz.store.spend import Bucket, delete_limit, set_limit, spent_in, track_group
from authz.store.spool import Spool
from authz.store.usagerow import UsageRow
from tests.integration.test_store import make_row

pytestmark = pytest.mark.integration

# Today: a group's counters are filled from the rows of the current periods when it starts counting.
DAY = period_start("daily", datetime.now(UTC))
U = "anthropic-ratelimit-unified-"


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator[Pool]:
    pool = await connect_pool(fresh_db, min_size=1, max_size=4, timeout=5)
    async with pool.acquire() as conn:
        await migrate(conn)
    try:
        yield pool
    finally:
        await pool.close()


def ledger(pool: Pool, spool_dir: Path) -> Ledger:
    settings = Store(
        url="", spool_dir=str(spool_dir), batch_size=50, flush_interval=0.05, replay_interval=0.2
    )
    return Ledger(settings, pool=pool, migrate=False)


def row(i: int, cost: str, *, at: datetime = DAY, email: str = "ada@example.com", **changes: Any) -> UsageRow:
    return make_row(
        i, started_at=at + timedelta(hours=10, seconds=i), user_email=email, cost_usd=Decimal(cost), **changes
    )


def user_bucket(period: str, start: datetime, name: str = "ada@example.com") -> Bucket:
    return Bucket("user", name, period, start)  # type: ignore[arg-type]


# --- settlement --------------------------------------------------------------------------------------


async def test_rows_settle_into_user_org_and_tracked_group_counters(db: Pool, tmp_path: Path) -> None:
    """Each written row adds its cost to the user's and the organisation's day, week and month, and
    to a group's only once the group is counted; the backfill counts earlier rows of the group."""
    async with ledger(db, tmp_path) as led:
        led.record(row(1, "1.25"))
        led.record(row(2, "0.50", email="Bob@Example.com"))
        await led.flush()
        assert await track_group(db, "eng") is True
        assert await track_group(db, "eng") is False
        led.record(row(3, "2.00"))
        led.record(row(4, "0", outcome="denied"))
        await led.flush()
    week, month = period_start("weekly", DAY), period_start("monthly", DAY)
    spent = await spent_in(
        db,
        [
            user_bucket("daily", DAY),
            user_bucket("weekly", week),
            user_bucket("monthly", month),
            user_bucket("daily", DAY, "bob@example.com"),
            Bucket("org", "*", "monthly", month),
            Bucket("group_pool", "eng", "daily", DAY),
            Bucket("group_pool", "platform-admins", "daily", DAY),
        ],
    )
    assert list(spent.values()) == [
        Decimal("3.25"),
        Decimal("3.25"),
        Decimal("3.25"),
        Decimal("0.50"),
        Decimal("3.75"),
        Decimal("3.75"),
        Decimal("0"),
    ]


async def test_a_replayed_spool_counts_once(db: Pool, tmp_path: Path) -> None:
    """Rows that waited in the spool count when replayed, and replaying the segment again (another
    worker, a crash before its removal) counts nothing more."""
    spool = Spool(str(tmp_path))
    spool.append([row(1, "1.00"), row(2, "2.00")])
    spool.seal()
    segment = spool.segments()[0]
    kept = await asyncio.to_thread(Path(segment).read_bytes)
    async with ledger(db, tmp_path) as led:
        assert await led.replay() == 2
        await asyncio.to_thread(Path(segment).write_bytes, kept)
        await led.replay()
    assert (await spent_in(db, [user_bucket("daily", DAY)]))[user_bucket("daily", DAY)] == Decimal("3.00")


async def test_a_merged_report_adds_only_the_difference(db: Pool, tmp_path: Path) -> None:
    """A cut stream's partial row and Envoy's later report of it merge; the counter moves by the
    difference, and the lease is settled once."""
    async with ledger(db, tmp_path) as led:
        led.record(row(1, "0.40", recorded_by="ext_proc_cut", reserved_usd=Decimal("1"), leases=("L1",)))
        await led.flush()
        led.record(row(1, "0.10", recorded_by="access_log", reserved_usd=Decimal("1"), leases=("L1",)))
        await led.flush()
    assert (await spent_in(db, [user_bucket("daily", DAY)]))[user_bucket("daily", DAY)] == Decimal("0.40")
    async with ledger(db, tmp_path) as led:
        led.record(row(2, "0.40", recorded_by="access_log"))
        await led.flush()
        led.record(row(2, "0.55", recorded_by="ext_proc_cut"))
        await led.flush()
    merged = await db.fetchval("SELECT cost_usd FROM usage_events WHERE request_id = $1", "req-000002")
    spent = (await spent_in(db, [user_bucket("daily", DAY)]))[user_bucket("daily", DAY)]
    assert spent == Decimal("0.40") + merged


# --- leases --------------------------------------------------------------------------------------------


def book(db: Pool, holder: str, fraction: str = "0.1") -> LeaseBook:
    return LeaseBook(
        db, holder, fraction=Decimal(fraction), lease_ttl=60, idle_release=600, top_up_timeout=10
    )


async def leased(db: Pool, holder: str) -> Decimal:
    return Decimal(
        await db.fetchval("SELECT COALESCE(sum(amount), 0) FROM spend_leases WHERE holder = $1", holder)
    )


async def test_far_from_the_cap_a_slice_admits_many_requests_without_a_round_trip(db: Pool) -> None:
    """The first request leases its need plus a tenth of the room; the next ones are admitted from
    it locally (the lease in PostgreSQL does not move)."""
    leases = book(db, "w1")
    bucket = user_bucket("daily", DAY)
    needs = [(bucket, Decimal("100"))]
    now = DAY.timestamp() + 3600
    first = await leases.reserve(needs, Decimal("1"), now)
    assert isinstance(first, Admitted)
    # The need (1) and a tenth of the other 99 in whole requests (9).
    assert await leased(db, "w1") == Decimal("10")
    for _ in range(9):
        assert leases.reserve_local(needs, Decimal("1"), now) is not None
    assert await leased(db, "w1") == Decimal("10")
    assert leases.reserve_local(needs, Decimal("1"), now) is None  # used up: the next one asks


async def test_two_workers_never_admit_more_estimates_than_the_cap(db: Pool) -> None:
    """Three hundred concurrent requests on two workers against a cap covering ten admit exactly ten
    estimates; the others learn the cap is held by requests in flight, then used up once written."""
    cap = Decimal("10")
    bucket = user_bucket("daily", DAY)
    workers = [book(db, "w1"), book(db, "w2")]
    now = DAY.timestamp() + 3600
    results = await asyncio.gather(
        *(workers[i % 2].reserve([(bucket, cap)], Decimal("1"), now) for i in range(300))
    )
    admitted = [r for r in results if isinstance(r, Admitted)]
    assert len(admitted) == 10
    assert all(isinstance(r, Short) and not r.hard for r in results if not isinstance(r, Admitted))
    # The rows are written: the estimates come off the leases and the costs count.
    async with ledger(db, Path("/nonexistent-spool")) as led:
        for i, result in enumerate(admitted):
            led.record(row(i, "1", reserved_usd=Decimal("1"), leases=result.leases))
        await led.flush()
    assert await leased(db, "w1") + await leased(db, "w2") == 0
    await workers[0].sync(now + 1)
    short = await workers[0].reserve([(bucket, cap)], Decimal("1"), now + 1)
    assert isinstance(short, Short) and short.hard and short.spent == cap


async def test_settled_spend_below_the_estimate_frees_room_again(db: Pool, tmp_path: Path) -> None:
    """A request that cost less than reserved gives the difference back to the cap."""
    leases = book(db, "w1", fraction="0")
    needs = [(user_bucket("daily", DAY), Decimal("2"))]
    now = DAY.timestamp() + 3600
    first = await leases.reserve(needs, Decimal("2"), now)
    assert isinstance(first, Admitted)
    assert isinstance(await leases.reserve(needs, Decimal("1"), now), Short)
    async with ledger(db, tmp_path) as led:
        led.record(row(1, "0.25", reserved_usd=Decimal("2"), leases=first.leases))
        await led.flush()
    assert isinstance(await leases.reserve(needs, Decimal("1.75"), now + 2), Admitted)


async def test_a_lapsed_lease_is_never_revived(db: Pool) -> None:
    """A lease that expired while its worker could not renew it loses its unused budget; the worker
    starts a new lease rather than count the old one again."""
    leases = book(db, "w1")
    bucket = user_bucket("daily", DAY)
    needs = [(bucket, Decimal("100"))]
    now = DAY.timestamp() + 3600
    first = await leases.reserve(needs, Decimal("1"), now)
    assert isinstance(first, Admitted)
    await db.execute("UPDATE spend_leases SET expires_at = now() - interval '1 second'")
    await leases.sync(now + 1)
    assert leases.reserve_local(needs, Decimal("1"), now + 1) is None
    again = await leases.reserve(needs, Decimal("1"), now + 1)
    assert isinstance(again, Admitted) and again.leases != first.leases
    assert await db.fetchval("SELECT count(*) FROM spend_leases WHERE expires_at > now()") == 1


async def test_idle_budget_goes_back_at_sync(db: Pool) -> None:
    """A lease unused for longer than idle_release gives its free budget back to the cap."""
    leases = LeaseBook(db, "w1", fraction=Decimal("0.5"), lease_ttl=60, idle_release=5)
    needs = [(user_bucket("daily", DAY), Decimal("10"))]
    now = DAY.timestamp() + 3600
    assert isinstance(await leases.reserve(needs, Decimal("1"), now), Admitted)
    assert await leased(db, "w1") == Decimal("5")
    await leases.sync(now + 10)
    assert await leased(db, "w1") == Decimal("1")  # the request in flight stays reserved


# --- the gate ------------------------------------------------------------------------------------------

HAIKU = "claude-haiku-4-5-20251001"
BODY = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":1000,"messages":[]}'
SMALL = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":100,"messages":[]}'


def config(**spend: Any) -> GatewayConfig:
    policies = (
        Policy(
            name="eng",
            groups=("eng",),
            upstreams=("b",),
            spend_caps=(SpendCap("daily", 0.012),),
            rate_limits=RateLimits(requests_per_minute=1000),
        ),
        Policy(name="free", groups=("free",), upstreams=("b",)),
    )
    return GatewayConfig(policies=policies, spend=Spend(**spend))


def allow(
    at: datetime,
    *,
    email: str = "ada@example.com",
    groups: tuple[str, ...] = ("eng",),
    i: int = 0,
    body: bytes = BODY,
) -> Allow:
    identity = RequestIdentity(
        request_id=f"r-{at.timestamp()}-{i}",
        started_at=at.timestamp(),
        client_format="bedrock",
        operation="invoke",
        caller=Caller(sub=email, email=email, groups=groups, session_id="s"),
        policy="eng" if "eng" in groups else "free",
        upstream="b",
        model=HAIKU,
        request_bytes=len(body),
    )
    return Allow(set_headers=(), remove_headers=(), identity=identity)


def written(decision: Allow | Deny, cost: str) -> UsageRow:
    """The row of an admitted request costing ``cost``, as the ledger of any worker writes it."""
    assert isinstance(decision, Allow) and decision.identity.caller is not None
    identity, caller = decision.identity, decision.identity.caller
    assert identity.reservation is not None
    return replace(
        make_row(0),
        request_id=identity.request_id,
        started_at=datetime.fromtimestamp(identity.started_at, UTC),
        user_email=caller.email,
        groups=caller.groups,
        cost_usd=Decimal(cost),
        reserved_usd=identity.reservation.usd,
        leases=identity.reservation.leases,
    )


async def settle(pool: Pool, tmp_path: Path, decisions: list[Allow | Deny], cost: str) -> None:
    """Write the rows of admitted requests, each costing ``cost``."""
    async with ledger(pool, tmp_path) as led:
        for decision in decisions:
            led.record(written(decision, cost))
        await led.flush()


async def test_the_gate_admits_until_the_cap_then_refuses_with_the_unified_shape(
    db: Pool, tmp_path: Path
) -> None:
    """Admitted requests carry their reservation and their standing (a warning past 75% and 95%);
    once the written rows leave no room for the next estimate it is a 429 billing_error with
    retry-after to midnight UTC and the unified headers, its denied row names the cap, and the next
    UTC day admits again."""
    gate = LimitGate(config(increase_url="https://it.example.com/more"), PriceBook(), db, holder="g1")
    await gate.sync()
    t = DAY + timedelta(hours=23, minutes=59)
    seen: list[tuple[str, str | None]] = []
    decision: Allow | Deny = await gate.admit(allow(t, body=SMALL), SMALL)
    async with ledger(db, tmp_path) as led:
        while isinstance(decision, Allow):
            headers = dict(decision.response_headers)
            seen.append((headers[f"{U}status"], headers.get(f"{U}overage-surpassed-threshold")))
            assert decision.identity.reservation is not None
            # 18 input tokens at $2/M (1-hour cache write) and max_tokens 100 at $5/M.
            assert decision.identity.reservation.usd == Decimal("0.00053600")
            led.record(written(decision, "0.0003"))
            await led.flush()
            await gate.sync()
            decision = await gate.admit(allow(t, i=len(seen), body=SMALL), SMALL)
    # $0.012 at $0.0003 a row: 75% after 30 rows, 95% after 38, no room for an estimate after 39.
    assert seen == [("allowed", None)] * 30 + [("allowed_warning", "0.75")] * 8 + [
        ("allowed_warning", "0.95")
    ]
    assert decision.row is not None
    reply = decision.reply
    headers = dict(reply.headers)
    assert reply.status == 429 and headers["x-should-retry"] == "false" and headers["retry-after"] == "60"
    assert headers[f"{U}status"] == "rejected" and headers[f"{U}overage-period"] == "daily"
    message = json.loads(reply.body)["error"]
    assert message["type"] == "billing_error"
    assert (DAY + timedelta(days=1)).strftime("%Y-%m-%d 00:00 UTC") in message["message"]
    assert "https://it.example.com/more" in message["message"]
    assert decision.row.outcome == "denied" and decision.row.reason == "spend_cap: user daily 0.012 USD"
    tomorrow = await gate.admit(allow(DAY + timedelta(days=1), body=SMALL), SMALL)
    assert isinstance(tomorrow, Allow)
    assert dict(tomorrow.response_headers)[f"{U}overage-utilization"] == "0.00"


async def test_a_body_seen_in_part_is_reserved_at_the_largest_output(db: Pool) -> None:
    """When ext_authz got only the start of a large body, its max_tokens is not trusted (a nested
    one may come first): the reservation assumes the largest output."""
    gate = LimitGate(
        config(group_budgets=(GroupBudget("big", "daily", 100.0),)), PriceBook(), db, holder="g1"
    )
    whole = allow(DAY + timedelta(hours=1), groups=("free", "big"), body=SMALL)
    partial = replace(whole, identity=replace(whole.identity, request_bytes=len(SMALL) + 500_000))
    seen = await gate.admit(whole, SMALL)
    cut = await gate.admit(partial, SMALL)
    assert isinstance(seen, Allow) and seen.identity.reservation is not None
    assert isinstance(cut, Allow) and cut.identity.reservation is not None
    assert seen.identity.reservation.usd == Decimal("0.00053600")
    # 125,018 input tokens at $2/M and 128,000 output tokens at $5/M.
    assert cut.identity.reservation.usd == Decimal("0.89003600")


async def test_a_reloaded_configuration_applies_from_the_next_admission(db: Pool) -> None:
    """configure() swaps the policies, the spend section and the prices whole: an organisation cap
    a reload adds refuses the next request of a user who had no cap, doubled prices double the
    next reservation, and a reload without caps lets requests pass untouched again."""
    gate = LimitGate(config(), PriceBook(), db, holder="g1")
    await gate.sync()
    t = DAY + timedelta(hours=1)
    free = allow(t, email="f@example.com", groups=("free",))
    assert await gate.admit(free, BODY) is free

    gate.configure(config(org_caps=(SpendCap("daily", 0.0),)))
    refused = await gate.admit(allow(t, email="f@example.com", groups=("free",), i=1), BODY)
    assert isinstance(refused, Deny) and refused.reason.startswith("spend_cap: org daily")

    before = await gate.admit(allow(t, i=2, body=SMALL), SMALL)
    assert isinstance(before, Deny)  # the organisation's cap binds the capped user too
    doubled = Pricing(models=(("claude-haiku-4-5", Price(2.0, 10.0, 2.5, 4.0, 0.2)),))
    gate.configure(config(), PriceBook(doubled))
    admitted = await gate.admit(allow(t, i=3, body=SMALL), SMALL)
    assert isinstance(admitted, Allow) and admitted.identity.reservation is not None
    # Twice the 0.000536 USD the built-in haiku prices reserve for this body.
    assert admitted.identity.reservation.usd == Decimal("0.00107200")
    again = allow(t, email="f@example.com", groups=("free",), i=4)
    assert await gate.admit(again, BODY) is again


async def test_callers_without_caps_pass_untouched(db: Pool) -> None:
    """No cap and no rate limit: the Allow comes back as it was (no headers, no reservation)."""
    gate = LimitGate(config(), PriceBook(), db, holder="g1")
    original = allow(DAY, email="bob@example.com", groups=("free",))
    assert await gate.admit(original, BODY) is original


async def test_a_shared_group_budget_blocks_every_member(db: Pool, tmp_path: Path) -> None:
    """When the group's budget is spent by one member, another member is refused with
    -overage-scope: group_pool; the telemetry hooks hear the reservation and the refusal by scope."""
    reserved: list[tuple[float, str]] = []
    refused: list[str] = []
    gate = LimitGate(
        config(group_budgets=(GroupBudget("pool", "monthly", 0.01),)),
        PriceBook(),
        db,
        holder="g1",
        on_reserved=lambda usd, scope: reserved.append((usd, scope)),
        on_refused=refused.append,
    )
    await gate.sync()
    t = DAY + timedelta(hours=1)
    a = await gate.admit(allow(t, email="a@example.com", groups=("free", "pool")), BODY)
    assert isinstance(a, Allow)
    await settle(db, tmp_path, [a], "0.01")
    await gate.sync()
    b = await gate.admit(allow(t, email="b@example.com", groups=("free", "pool"), i=1), BODY)
    assert isinstance(b, Deny)
    assert dict(b.reply.headers)[f"{U}overage-scope"] == "group_pool"
    assert a.identity.reservation is not None
    assert reserved == [(float(a.identity.reservation.usd), "group_pool")] and refused == ["group_pool"]
    assert "pool group's shared monthly budget" in json.loads(b.reply.body)["error"]["message"]


async def test_a_cap_set_at_run_time_applies_at_the_next_sync_and_is_audited(
    db: Pool, tmp_path: Path
) -> None:
    """spend-limits set reaches the gate at its next sync (no restart); the audit rows say who, the
    old and the new amount; delete lifts it."""
    gate = LimitGate(config(), PriceBook(), db, holder="g1")
    t = DAY + timedelta(hours=1)
    assert isinstance(await gate.admit(allow(t, email="c@example.com", groups=("free",)), BODY), Allow)
    assert (
        await set_limit(db, scope="user", name="c@example.com", period="daily", usd=Decimal("0"), by="ops")
        is None
    )
    assert await set_limit(
        db, scope="user", name="c@example.com", period="daily", usd=Decimal("0.001"), by="ops2"
    ) == Decimal("0")
    await gate.sync()
    refused = await gate.admit(allow(t, email="c@example.com", groups=("free",), i=1), BODY)
    assert isinstance(refused, Deny) and refused.reply.status == 429
    assert await delete_limit(db, scope="user", name="c@example.com", period="daily", by="ops") == Decimal(
        "0.001"
    )
    await gate.sync()
    assert isinstance(await gate.admit(allow(t, email="c@example.com", groups=("free",), i=2), BODY), Allow)
    audit = await db.fetch("SELECT kind, detail FROM audit_events ORDER BY id")
    details = [(r["kind"], json.loads(r["detail"])) for r in audit]
    assert [(k, d["old_usd"], d["new_usd"], d["by"]) for k, d in details] == [
        ("spend_limit_set", None, "0E-8", "ops"),
        ("spend_limit_set", "0E-8", "0.00100000", "ops2"),
        ("spend_limit_delete", "0.00100000", None, "ops"),
    ]


async def test_closed_store_errors_refuse_capped_callers_with_fetch_error(fresh_db: str) -> None:
    """PostgreSQL gone and no budget leased: a capped caller gets the fetch_error shape, an
    uncapped one passes."""
    pool = await connect_pool(
        fresh_db.replace(fresh_db.rsplit("/", 1)[1], "no_such_db"), min_size=0, max_size=1, timeout=1
    )
    try:
        gate = LimitGate(config(), PriceBook(), pool, holder="g1")
        refused = await gate.admit(allow(DAY), BODY)
        assert isinstance(refused, Deny)
        headers = dict(refused.reply.headers)
        assert headers[f"{U}overage-disabled-reason"] == "fetch_error"
        assert json.loads(refused.reply.body)["error"]["type"] == "billing_error"
        free = allow(DAY, email="bob@example.com", groups=("free",))
        assert await gate.admit(free, BODY) is free
    finally:
        await pool.close()


async def test_open_store_errors_admit_for_the_grace_then_refuse(fresh_db: str) -> None:
    """on_store_error open admits capped callers without a lease during open_grace (the rows will
    count when written), then refuses like closed."""
    pool = await connect_pool(
        fresh_db.replace(fresh_db.rsplit("/", 1)[1], "no_such_db"), min_size=0, max_size=1, timeout=1
    )
    try:
        gate = LimitGate(config(on_store_error="open", open_grace=30), PriceBook(), pool, holder="g1")
        first = await gate.admit(allow(DAY), BODY)
        assert isinstance(first, Allow) and first.identity.reservation == Reservation(Decimal("0.00503600"))
        inside = await gate.admit(allow(DAY + timedelta(seconds=29), i=1), BODY)
        assert isinstance(inside, Allow)
        after = await gate.admit(allow(DAY + timedelta(seconds=31), i=2), BODY)
        assert isinstance(after, Deny)
        assert dict(after.reply.headers)[f"{U}overage-disabled-reason"] == "fetch_error"
    finally:
        await pool.close()


# --- rate limits shared between workers -------------------------------------------------------------------


async def test_rate_counts_are_shared_at_sync(db: Pool, tmp_path: Path) -> None:
    """Two workers' admitted requests and the tokens of written rows reach each other at sync."""
    limits = RateLimits(requests_per_minute=3, tokens_per_minute=10_000)
    a, b = RateLimiter(), RateLimiter()
    now = datetime.now(UTC).timestamp()
    assert a.admit("ada@example.com", limits, now) is None
    assert a.admit("ada@example.com", limits, now) is None
    assert b.admit("ada@example.com", limits, now) is None
    await a.sync(db, now)
    await b.sync(db, now)
    refused = b.admit("ada@example.com", limits, now)
    assert refused is not None and refused.limit == "requests_per_minute"
    async with ledger(db, tmp_path) as led:
        led.record(
            row(
                1, "0.1", at=datetime.fromtimestamp(now, UTC) - timedelta(hours=10, seconds=1), latency_ms=0.0
            )
        )
        await led.flush()
    await a.sync(db, now)
    tokens = a.admit("ada@example.com", RateLimits(tokens_per_minute=49_000), now)
    assert tokens is not None and tokens.limit == "tokens_per_minute"  # make_row's 49,545 tokens


# --- the command line ----------------------------------------------------------------------------------


def test_spend_limits_and_spend_show_commands(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """set, list, show and delete through `authz`: amounts as people read them, the old value on
    change, every cap on the user with what remains, exit 1 deleting a cap that is not there."""
    from authz.cli import main

    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"store: {{url: '{fresh_db}'}}\n"
        "upstreams: {b: {kind: bedrock, region: us-east-1}}\n"
        "policies:\n"
        "  - {name: eng, groups: [eng], upstreams: [b], spend_caps: [{period: monthly, usd: 300}]}\n",
        encoding="utf-8",
    )
    base = ["--config", str(config)]
    assert (
        main(["spend-limits", "set", *base, "--user", "Ada@Example.com", "--period", "daily", "--usd", "5"])
        == 0
    )
    assert "user ada@example.com daily: none -> $5.00" in capsys.readouterr().out
    assert (
        main(["spend-limits", "set", *base, "--user", "ada@example.com", "--period", "daily", "--usd", "7.5"])
        == 0
    )
    assert "$5.00 -> $7.50" in capsys.readouterr().out
    assert (
        main(
            [
                "spend-limits",
                "set",
                *base,
                "--group",
                "eng",
                "--pooled",
                "--period",
                "weekly",
                "--usd",
                "1000",
            ]
        )
        == 0
    )
    assert (
        main(["spend-limits", "set", *base, "--org", "--period", "monthly", "--usd", "0.5", "--pooled"]) == 2
    )
    assert "--pooled goes with --group" in capsys.readouterr().err
    assert main(["spend-limits", "list", *base]) == 0
    listed = capsys.readouterr().out
    assert "group_pool  eng" in listed and "$7.50" in listed and "$1000.00" in listed

    async def spend() -> None:
        pool = await connect_pool(fresh_db, min_size=1, max_size=2, timeout=5)
        try:
            async with ledger(pool, tmp_path / "spool") as led:
                led.record(row(1, "1.25", at=period_start("daily", datetime.now(UTC)), groups=("eng",)))
                await led.flush()
        finally:
            await pool.close()

    asyncio.run(spend())
    assert main(["spend", "show", *base, "--user", "ada@example.com", "--groups", "eng"]) == 0
    shown = capsys.readouterr().out
    lines = [line.split() for line in shown.splitlines()]
    assert "policy: eng)" in shown and ["daily", "$1.25"] == lines[2][:2]
    assert ["group_pool", "eng", "weekly", "$1000.00", "$1.25", "$998.75"] in [line[:6] for line in lines]
    assert ["user", "daily", "$7.50", "$1.25", "$6.25"] in [line[:5] for line in lines]
    assert ["user", "monthly", "$300.00", "$1.25", "$298.75"] in [line[:5] for line in lines]
    assert main(["spend-limits", "delete", *base, "--user", "ada@example.com", "--period", "daily"]) == 0
    assert main(["spend-limits", "delete", *base, "--user", "ada@example.com", "--period", "daily"]) == 1
    assert "no daily spend limit for user ada@example.com" in capsys.readouterr().err
