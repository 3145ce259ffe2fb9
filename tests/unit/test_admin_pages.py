"""The admin page's pure parts: the period it shows, the SVG chart, escaping of what users control."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal

import pytest

from authz.signin.portal.admin import period_of
from authz.signin.portal.admin_pages import Period, Report, dashboard_page, money, spend_chart
from authz.store.reports import Denials, UsageSummary

TODAY = date(2026, 11, 20)


def _summary(key: str, cost: str, requests: int = 1, denials: int = 0) -> UsageSummary:
    return UsageSummary(key, requests, 10, 5, 0, 0, Decimal(cost), denials)


def test_the_default_period_is_the_last_thirty_days() -> None:
    """Without from/to the page shows the 30 days up to today, inclusive."""
    assert period_of({}, TODAY) == Period(date(2026, 10, 22), TODAY)
    assert period_of({"from": "2026-11-01", "to": "2026-11-03"}, TODAY) == Period(
        date(2026, 11, 1), date(2026, 11, 3)
    )


@pytest.mark.parametrize(
    "query",
    [
        {"from": "yesterday"},
        {"from": "2026-11-05", "to": "2026-11-01"},
        {"from": "2024-01-01", "to": "2026-01-01"},
    ],
)
def test_bad_periods_are_refused(query: dict[str, str]) -> None:
    """Dates that do not parse, run backwards or span more than a year are a ValueError (a 400 page)."""
    with pytest.raises(ValueError):
        period_of(query, TODAY)


def test_the_chart_has_a_bar_per_day_scaled_to_the_highest() -> None:
    """Every day of the period gets a bar, days without spend at height 0, the highest day full height."""
    period = Period(date(2026, 11, 1), date(2026, 11, 4))
    svg = spend_chart(period, [_summary("2026-11-01", "2.00"), _summary("2026-11-03", "4.00")])
    bars = re.findall(
        r'data-day="([^"]+)" data-usd="([^"]+)" x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)"', svg
    )
    assert [(d, u) for d, u, _ in bars] == [
        ("2026-11-01", "2.00"),
        ("2026-11-02", "0"),
        ("2026-11-03", "4.00"),
        ("2026-11-04", "0"),
    ]
    heights = [float(h) for _, _, h in bars]
    assert heights[2] == max(heights) and heights[0] == pytest.approx(heights[2] / 2) and heights[1] == 0


def test_user_controlled_values_are_escaped() -> None:
    """Emails, model ids and reasons are text on the page, never markup."""
    report = Report(
        period=Period(date(2026, 11, 1), date(2026, 11, 2)),
        days=[_summary("2026-11-01", "1")],
        users=[_summary('<script>alert("x")</script>', "1")],
        models=[_summary("claude-<img src=x>", "1")],
        denials=[Denials("<b>policy</b>", 2)],
    )
    page = dashboard_page(report, signed_in_as="<i>admin</i>")
    assert (
        "<script>" not in page and "<img" not in page and "<b>policy" not in page and "<i>admin" not in page
    )
    assert "&lt;script&gt;" in page


@pytest.mark.parametrize(
    ("value", "shown"), [("0", "$0.00"), ("1234.5", "$1,234.50"), ("0.0042", "$0.004200")]
)
def test_money(value: str, shown: str) -> None:
    """Dollars with cents, and small amounts with enough digits not to read as zero."""
    assert money(Decimal(value)) == shown
