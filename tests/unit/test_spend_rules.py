"""The pure rules behind spend caps and rate limits: periods, which caps apply, estimates, the
standing and refusal headers, the usage document, the sliding window, the lease grant rule."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from authz.billing.caps import Cap, CapIndex, StoredLimit, dollars, user_key
from authz.billing.estimate import FALLBACK_MAX_TOKENS, dearest_model, estimate_usd, max_tokens_of
from authz.billing.periods import PeriodClock, period_end, period_start
from authz.billing.pricing import PriceBook
from authz.billing.ratelimit import RateLimiter, retry_after, window
from authz.billing.standing import (
    Standing,
    refusal_headers,
    refusal_message,
    standing_headers,
    usage_document,
)
from authz.configtypes import GroupBudget, Policy, RateLimits, Spend, SpendCap
from authz.store.spend import grant_for
from backends.usage import Usage

U = "anthropic-ratelimit-unified-"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- periods -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "moment", "start", "end"),
    [
        ("daily", "2026-03-04T23:59:59.999", "2026-03-04T00:00:00", "2026-03-05T00:00:00"),
        ("daily", "2026-03-05T00:00:00", "2026-03-05T00:00:00", "2026-03-06T00:00:00"),
        # 2026-03-04 is a Wednesday: its week began Monday 2 March.
        ("weekly", "2026-03-04T12:00:00", "2026-03-02T00:00:00", "2026-03-09T00:00:00"),
        ("weekly", "2026-03-08T23:59:59", "2026-03-02T00:00:00", "2026-03-09T00:00:00"),
        ("weekly", "2026-03-09T00:00:00", "2026-03-09T00:00:00", "2026-03-16T00:00:00"),
        ("monthly", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("monthly", "2028-02-29T10:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
    ],
)
def test_periods_are_utc_day_week_from_monday_and_month(
    period: str, moment: str, start: str, end: str
) -> None:
    """A period starts at UTC midnight (the week on Monday, the month on the 1st) and ends at the next."""
    assert period_start(period, at(moment)) == at(start)  # type: ignore[arg-type]
    assert period_end(period, at(moment)) == at(end)  # type: ignore[arg-type]


def test_periods_ignore_the_offset_of_the_timestamp() -> None:
    """00:30 at UTC+02:00 is 22:30 UTC the day before: the period is the UTC one."""
    local = datetime.fromisoformat("2026-03-05T00:30:00+02:00")
    assert period_start("daily", local) == at("2026-03-04T00:00:00")


def test_period_clock_moves_to_the_next_day_at_midnight() -> None:
    """The cached bounds switch exactly at the UTC boundary."""
    clock = PeriodClock()
    before = at("2026-03-31T23:59:59").timestamp()
    assert clock.bounds("monthly", before) == (at("2026-03-01T00:00:00"), at("2026-04-01T00:00:00"))
    assert clock.bounds("daily", before + 1)[0] == at("2026-04-01T00:00:00")
    assert clock.bounds("monthly", before + 1)[0] == at("2026-04-01T00:00:00")


# --- which caps apply ----------------------------------------------------------------------------

POLICIES = (
    Policy(name="eng", groups=("eng",), upstreams=("b",), spend_caps=(SpendCap("daily", 10.0),)),
    Policy(name="ops", groups=("ops",), upstreams=("b",)),
)


def test_caps_merge_per_spend_and_keep_the_tightest() -> None:
    """The policy's, per-user and per-member caps on the user's own daily spend merge into the
    smallest; pooled and organisation caps are separate spend and all apply."""
    spend = Spend(
        group_budgets=(GroupBudget("eng", "monthly", 500.0), GroupBudget("other", "daily", 1.0)),
        org_caps=(SpendCap("monthly", 10000.0),),
    )
    stored = [
        StoredLimit("user", "ada@example.com", "daily", Decimal("7.50")),
        StoredLimit("group", "eng", "daily", Decimal("8")),
        StoredLimit("group", "eng", "weekly", Decimal("40")),
        StoredLimit("group_pool", "eng", "monthly", Decimal("450")),
        StoredLimit("org", "*", "monthly", Decimal("20000")),
    ]
    caps = CapIndex(POLICIES, spend, stored).caps("eng", "ada@example.com", ("eng", "x"))
    assert [(c.scope, c.name, c.period, c.usd) for c in caps] == [
        ("group_pool", "eng", "monthly", Decimal("450")),
        ("org", "*", "monthly", Decimal("10000.0")),
        ("user", "ada@example.com", "daily", Decimal("7.50")),
        ("user", "ada@example.com", "weekly", Decimal("40")),
    ]
    assert caps[2].source == "spend-limits user" and caps[0].source == "spend-limits group_pool"


def test_a_user_without_caps_gets_none() -> None:
    """Another policy, no pooled group and no org cap: nothing applies."""
    assert CapIndex(POLICIES, Spend(), ()).caps("ops", "bob@example.com", ("ops",)) == ()


def test_user_key_is_the_lowercased_email_or_the_subject() -> None:
    """People by e-mail (case-insensitively); service identities, which have none, by subject."""
    assert user_key("Ada@Example.COM", "00u1") == "ada@example.com"
    assert user_key("", "service:ci") == "service:ci"
    assert user_key(None, None) is None


# --- estimates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"max_tokens": 32000, "messages": []}', 32000),
        (b'{"messages":[],"max_tokens":64}', 64),
        # A nested max_tokens (a tool's input) can only raise the estimate, never lower it.
        (b'{"max_tokens":100,"tools":[{"input_schema":{"max_tokens":5}}]}', 100),
        (b'{"tools":[{"input":{"max_tokens":9000}}],"max_tokens":100}', 9000),
        # Inside a string the quotes are escaped: not a key.
        (b'{"messages":[{"content":"set \\"max_tokens\\": 1"}],"max_tokens":50}', 50),
        (b'{"messages":[]}', None),
        (b'{"max_tokens":"many"}', None),
        (b"", None),
    ],
)
def test_max_tokens_is_the_largest_numeric_key(body: bytes, expected: int | None) -> None:
    """The scan finds the request's max_tokens, or None when no numeric one is there."""
    assert max_tokens_of(body) == expected


def test_estimate_prices_input_at_the_dearest_rate_and_output_at_max_tokens() -> None:
    """Input (body bytes / 4) at the 1-hour cache-write rate, output at max_tokens, premium included."""
    prices = PriceBook()
    usd = estimate_usd(prices, "claude-haiku-4-5", regional=False, request_bytes=4000, max_tokens=1000)
    # 1000 input tokens at $2/M (1-hour write) + 1000 output tokens at $5/M.
    assert usd == Decimal("0.00700000")
    regional = estimate_usd(prices, "claude-haiku-4-5", regional=True, request_bytes=4000, max_tokens=1000)
    assert regional == Decimal("0.00770000")


def test_estimate_covers_any_real_cost_of_the_same_request() -> None:
    """Whatever the upstream caches, a request of that size and max_tokens never costs more."""
    prices = PriceBook()
    usd = estimate_usd(prices, "claude-opus-5-5", regional=True, request_bytes=8000, max_tokens=500)
    for usage in (
        Usage(input_tokens=2000, output_tokens=500),
        Usage(cache_creation_input_tokens=2000, cache_creation_1h_input_tokens=2000, output_tokens=500),
        Usage(cache_creation_input_tokens=2000, output_tokens=500),
        Usage(input_tokens=10, cache_read_input_tokens=1990, output_tokens=500),
    ):
        assert prices.cost_usd("claude-opus-5-5", usage, regional=True) <= usd


def test_estimate_without_max_tokens_assumes_the_largest_output() -> None:
    """No max_tokens found: the fallback output keeps the estimate an upper bound."""
    prices = PriceBook()
    unknown = estimate_usd(prices, "claude-haiku-4-5", regional=False, request_bytes=0, max_tokens=None)
    assert unknown == Decimal(FALLBACK_MAX_TOKENS) * 5 / 1_000_000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"claude-haiku-4-5","max_tokens":10}', "claude-haiku-4-5"),
        (b'{"model" : "claude-haiku-4-5-20251001","messages":[]}', "claude-haiku-4-5-20251001"),
        # A nested "model" (in a tool's input) can only make the estimate dearer.
        (b'{"model":"claude-haiku-4-5","tools":[{"input":{"model":"claude-opus-4-5"}}]}', "claude-opus-4-5"),
        (b'{"messages":[]}', None),
        (b'{"model":42}', None),
    ],
)
def test_a_messages_body_is_priced_at_the_dearest_model_it_names(body: bytes, expected: str | None) -> None:
    """The Messages API names the model in the body: the estimate takes the dearest one named
    there (a nested key never makes it cheaper), else the fallback price."""
    assert dearest_model(PriceBook(), body, regional=False) == expected


# --- standing and refusal headers ----------------------------------------------------------------

RESET = at("2026-03-05T00:00:00")
DAILY = Cap("user", "ada@example.com", "daily", Decimal("10"), "policy eng")
POOL = Cap("group_pool", "eng", "monthly", Decimal("100"), "spend.group_budgets")


@pytest.mark.parametrize(
    ("spent", "status", "utilization", "threshold"),
    [
        ("0", "allowed", "0.00", None),
        ("7.4999", "allowed", "0.74", None),
        ("7.50", "allowed_warning", "0.75", "0.75"),
        ("9.4999", "allowed_warning", "0.94", "0.75"),
        ("9.50", "allowed_warning", "0.95", "0.95"),
        ("9.999", "allowed_warning", "0.99", "0.95"),
        ("12", "allowed_warning", "0.99", "0.95"),
    ],
)
def test_standing_headers_warn_past_75_and_95_percent(
    spent: str, status: str, utilization: str, threshold: str | None
) -> None:
    """A capped caller's successful response: status, claim, utilization (two decimals, below 1),
    the threshold once passed, and the reset in Unix seconds, in that order."""
    headers = standing_headers([Standing(DAILY, Decimal(spent), RESET)])
    expected = [
        (f"{U}status", status),
        (f"{U}reset", str(int(RESET.timestamp()))),
        (f"{U}representative-claim", "overage"),
        (f"{U}overage-status", status),
        (f"{U}overage-utilization", utilization),
    ]
    if threshold is not None:
        expected.append((f"{U}overage-surpassed-threshold", threshold))
    expected.append((f"{U}overage-reset", str(int(RESET.timestamp()))))
    assert list(headers) == expected


def test_standing_reports_the_cap_closest_to_its_limit() -> None:
    """With several caps the most used one is reported (its reset too)."""
    month_end = at("2026-04-01T00:00:00")
    headers = dict(
        standing_headers([Standing(DAILY, Decimal("1"), RESET), Standing(POOL, Decimal("80"), month_end)])
    )
    assert headers[f"{U}overage-utilization"] == "0.80"
    assert headers[f"{U}reset"] == str(int(month_end.timestamp()))


def test_no_caps_no_headers() -> None:
    """A caller without caps gets no unified headers at all."""
    assert standing_headers([]) == ()


def test_refusal_headers_for_a_user_cap() -> None:
    """The 429's unified headers: rejected, resets, utilization and threshold 1, period, reason; no
    representative claim, no overage status, no scope for a user's own cap."""
    reset = str(int(RESET.timestamp()))
    assert refusal_headers(DAILY, RESET) == (
        (f"{U}status", "rejected"),
        (f"{U}reset", reset),
        (f"{U}overage-utilization", "1"),
        (f"{U}overage-surpassed-threshold", "1"),
        (f"{U}overage-reset", reset),
        (f"{U}overage-period", "daily"),
        (f"{U}overage-disabled-reason", "out_of_credits"),
    )


def test_refusal_headers_name_a_shared_budget_and_a_fetch_error() -> None:
    """A group's shared budget adds -overage-scope: group_pool; a store outage says fetch_error and
    claims no utilization."""
    assert dict(refusal_headers(POOL, RESET))[f"{U}overage-scope"] == "group_pool"
    fetch = dict(refusal_headers(DAILY, RESET, reason="fetch_error"))
    assert fetch[f"{U}overage-disabled-reason"] == "fetch_error"
    assert f"{U}overage-utilization" not in fetch and f"{U}overage-scope" not in fetch


@pytest.mark.parametrize(
    ("usd", "text"), [("5", "5.00"), ("5.5", "5.50"), ("0.012", "0.012"), ("100.00", "100.00")]
)
def test_amounts_read_to_the_cent_unless_they_have_more(usd: str, text: str) -> None:
    """Caps print to the cent, but a cap finer than a cent is not rounded away."""
    assert dollars(Decimal(usd)) == text


def test_refusal_message_says_whose_cap_when_it_resets_and_where_to_ask() -> None:
    """The message names the cap, its reset time in UTC and the increase URL when configured."""
    message = refusal_message(POOL, at("2026-04-01T00:00:00"), "https://it.example.com/budget")
    assert message == (
        "The eng group's shared monthly budget of $100.00 is used up. It resets at 2026-04-01 00:00 UTC; "
        "to continue sooner, ask for more at https://it.example.com/budget."
    )
    assert "administrator" in refusal_message(DAILY, RESET, None)


# --- the usage document --------------------------------------------------------------------------


def test_usage_document_reports_cents_percent_and_the_header_reset() -> None:
    """extra_usage in cents, one limits row per cap whose resets_at is the -reset header's instant."""
    standings = [
        Standing(DAILY, Decimal("7.505"), RESET),
        Standing(POOL, Decimal("20"), at("2026-04-01T00:00:00")),
    ]
    own = {"daily": (Decimal("7.505"), RESET), "monthly": (Decimal("31.4449"), at("2026-04-01T00:00:00"))}
    doc = usage_document(standings, own)  # type: ignore[arg-type]
    extra = doc["extra_usage"]
    assert extra["is_enabled"] is True and extra["used_credits"] == 3144 and extra["monthly_limit"] is None
    assert extra["daily"] == {
        "limit": 1000,
        "used_credits": 751,
        "utilization": 75,
        "resets_at": "2026-03-05T00:00:00Z",
    }
    assert extra["disabled_reason"] is None and extra["spend_limit_reached"] is False
    daily, pool = doc["limits"]
    header_reset = dict(standing_headers(standings[:1]))[f"{U}reset"]
    assert datetime.fromisoformat(daily["resets_at"]).timestamp() == int(header_reset)
    assert (daily["percent"], daily["severity"], daily["is_active"]) == (75, "warning", True)
    assert pool["scope"] == {"type": "group_pool", "group": "eng"} and pool["percent"] == 20


def test_usage_document_when_spent_and_when_unreadable() -> None:
    """A spent cap says out_of_credits and spend_limit_reached; an unreadable store says fetch_error
    and gives no figures."""
    spent = usage_document([Standing(DAILY, Decimal("10"), RESET)], {})
    assert spent["extra_usage"]["disabled_reason"] == "out_of_credits"
    assert spent["extra_usage"]["spend_limit_reached"] is True
    assert spent["limits"][0]["severity"] == "exceeded"
    down = usage_document([Standing(DAILY, Decimal("0"), RESET)], {}, fetch_error=True)
    assert down["extra_usage"]["disabled_reason"] == "fetch_error"
    assert down["extra_usage"]["used_credits"] is None and down["limits"][0]["percent"] is None


def test_uncapped_usage_document_has_no_limits() -> None:
    """Without caps: not enabled, no limits rows, the month's spend still reported."""
    doc = usage_document([], {"monthly": (Decimal("1.234"), RESET)})  # type: ignore[dict-item]
    assert doc["limits"] == [] and doc["extra_usage"]["is_enabled"] is False
    assert doc["extra_usage"]["used_credits"] == 123


# --- rate limits ---------------------------------------------------------------------------------


def test_sliding_window_weighs_the_previous_minute() -> None:
    """Half way through a minute, half of the previous minute's count still counts."""
    assert window(10, 2, 30) == 7.0
    assert window(10, 2, 0) == 12.0
    assert window(10, 2, 60) == 2.0


def test_requests_over_the_limit_are_refused_with_a_whole_retry_after() -> None:
    """With 3 a minute the fourth request is refused and told when the window will hold one more."""
    limiter = RateLimiter()
    limits = RateLimits(requests_per_minute=3)
    start = at("2026-03-04T10:00:10").timestamp()
    assert [limiter.admit("ada", limits, start + i) for i in range(3)] == [None, None, None]
    refused = limiter.admit("ada", limits, start + 3)
    assert refused is not None and refused.limit == "requests_per_minute" and refused.value == 3
    # At 10:00:13 the three sit in the current minute; the window holds a fourth from 10:01:00 + a
    # share of a minute: at 10:01:s, 3 * (60 - s) / 60 + 1 <= 3 needs s >= 20.
    assert refused.retry_after == 67
    assert limiter.admit("bob", limits, start + 3) is None  # per user


def test_tokens_per_minute_blocks_once_the_counted_tokens_reach_it() -> None:
    """Tokens come from settled rows (the sync); at the limit the next request waits."""
    limiter = RateLimiter()
    minute = int(at("2026-03-04T10:00:00").timestamp() // 60)
    limiter._shared = {("ada", minute): (1, 150)}
    limits = RateLimits(tokens_per_minute=100)
    refused = limiter.admit("ada", limits, minute * 60 + 5)
    assert refused is not None and refused.limit == "tokens_per_minute"
    assert refused.retry_after == retry_after(0, 150, 5, lambda n: n < 100)
    assert limiter.admit("ada", limits, minute * 60 + 5 + refused.retry_after) is None


# --- leases --------------------------------------------------------------------------------------


def test_grant_is_the_need_plus_whole_requests_of_a_share_of_the_rest_or_nothing() -> None:
    """Far from the cap a slice of the room (whole requests' worth) comes with the need; near it just
    the need; without room for the need, nothing."""
    fraction, one = Decimal("0.1"), Decimal("1")
    assert grant_for(one, Decimal("101"), fraction, one) == Decimal("11")
    assert grant_for(Decimal("0.4"), Decimal("101"), fraction, one) == Decimal("10.4")
    assert grant_for(one, Decimal("20.9"), fraction, one) == Decimal("2")
    assert grant_for(one, Decimal("10"), fraction, one) == one
    assert grant_for(one, Decimal("0.99"), fraction, one) == 0
    assert grant_for(one, Decimal("50"), Decimal(0), one) == one
