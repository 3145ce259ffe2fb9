"""The admin page behind the real Envoy, signed in through the real IdP in headless Chromium: the
chart and the figures equal an independent SQL aggregate of the period's usage rows, the CSV
download too; non-admins get 403 and anonymous visitors are sent to sign in. A screenshot of the
page is saved as a test artifact (``.run/artifacts/admin-page.png``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from authz.store.queries import insert_rows
from tests.e2e.signin.conftest import SignInEnv, password
from tests.e2e.signin.flows import idp_login, is_callback, query
from tests.telemetry_rows import denied, row

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[3] / ".run" / "artifacts"
# A week no other test writes rows in, so the page's figures are exactly these rows'.
START = datetime(2025, 3, 3, tzinfo=UTC)
PERIOD = "from=2025-03-03&to=2025-03-09"
ROWS = [
    row(request_id="admin-page-1", started_at=START + timedelta(hours=9), cost_usd=Decimal("1.50")),
    row(
        request_id="admin-page-2",
        started_at=START + timedelta(days=1, hours=3),
        user_email="bob@example.com",
        requested_model="claude-haiku-4-5@20251001",
        cost_usd=Decimal("0.25"),
    ),
    row(request_id="admin-page-3", started_at=START + timedelta(days=3), cost_usd=Decimal("4.00")),
    denied(
        request_id="admin-page-4",
        started_at=START + timedelta(days=3, hours=1),
        user_email="mallory<b>@x.com",
    ),
    row(request_id="admin-page-5", started_at=START + timedelta(days=6, hours=23), cost_usd=Decimal("0.75")),
    row(request_id="admin-page-out", started_at=START + timedelta(days=7), cost_usd=Decimal("99")),
]
SQL_PERIOD = "started_at >= '2025-03-03T00:00:00Z' AND started_at < '2025-03-10T00:00:00Z'"


def _sql(dsn: str, sql: str) -> list[dict[str, Any]]:
    return query(dsn, sql)


@pytest.fixture(scope="module")
def rows(signin: SignInEnv) -> None:
    """This module's rows, in their own week (on a thread: Playwright keeps an event loop here)."""

    async def go() -> None:
        conn = await asyncpg.connect(signin.dsn)
        try:
            await conn.execute("DELETE FROM usage_events WHERE request_id LIKE 'admin-page-%'")
            await insert_rows(conn, ROWS)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result(timeout=30)


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context()
    try:
        yield ctx
    finally:
        ctx.close()


def _sign_in(page: Page, signin: SignInEnv, account: str) -> int:
    """Open /admin, follow the sign-in through the IdP; the status the callback answered with."""
    page.goto(f"{signin.url}/admin?{PERIOD}")
    with page.expect_response(lambda r: is_callback(signin.url)(r.url)) as callback:
        idp_login(page, signin.issuer, account, password(account))
    page.wait_for_load_state()
    return callback.value.status


def test_anonymous_visitors_are_sent_to_sign_in(signin: SignInEnv) -> None:
    """Without the admin cookie /admin redirects to /admin/login, which redirects to the IdP."""
    first = httpx.get(f"{signin.url}/admin?{PERIOD}")
    assert (first.status_code, first.headers["location"]) == (303, "/admin/login")
    second = httpx.get(f"{signin.url}/admin/login")
    assert second.status_code == 303
    assert second.headers["location"].startswith(signin.issuer)
    assert httpx.get(f"{signin.url}/admin/usage.csv?{PERIOD}").status_code == 303


def test_a_signed_in_non_admin_gets_403(signin: SignInEnv, context: BrowserContext) -> None:
    """A user outside portal.admin_groups signs in fine at the IdP and is refused by the gateway."""
    page = context.new_page()
    assert _sign_in(page, signin, "alice") == 403
    assert "Not an administrator" in page.content()
    again = page.goto(f"{signin.url}/admin?{PERIOD}")
    assert again is not None and again.status in (303, 403)
    assert page.locator("#spend-chart").count() == 0


def test_the_admin_page_shows_the_periods_usage(
    signin: SignInEnv, context: BrowserContext, rows: None
) -> None:
    """The chart has a bar per day whose value is that day's spend, and the totals, top users, top
    models and refusals equal SQL over the same rows; the CSV download too."""
    page = context.new_page()
    assert _sign_in(page, signin, "olivia") == 303
    response = page.goto(f"{signin.url}/admin?{PERIOD}")
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script" not in csp
    assert page.locator("script").count() == 0

    per_day = {
        r["day"]: r["usd"]
        for r in _sql(
            signin.dsn,
            "SELECT to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, sum(cost_usd) AS usd"
            f" FROM usage_events WHERE {SQL_PERIOD} GROUP BY 1",
        )
    }
    bars = page.locator("#spend-chart rect.bar")
    assert bars.count() == 7
    shown = {
        bars.nth(i).get_attribute("data-day"): Decimal(bars.nth(i).get_attribute("data-usd") or "")
        for i in range(7)
    }
    assert {day: usd for day, usd in shown.items() if usd} == per_day
    heights = {
        bars.nth(i).get_attribute("data-day"): float(bars.nth(i).get_attribute("height") or 0)
        for i in range(7)
    }
    tallest = max(per_day, key=lambda d: per_day[d])
    assert heights[tallest] == max(heights.values()) > 0
    assert heights["2025-03-05"] == 0.0

    (totals,) = _sql(
        signin.dsn,
        "SELECT sum(cost_usd) AS usd, count(*) AS n, count(*) FILTER (WHERE outcome = 'denied') AS denied"
        f" FROM usage_events WHERE {SQL_PERIOD}",
    )
    assert Decimal(page.locator("#total-spend").get_attribute("data-usd") or "") == totals["usd"]
    assert int(page.inner_text("#total-requests")) == totals["n"]
    assert int(page.inner_text("#total-denied")) == totals["denied"] == 1

    users = _sql(
        signin.dsn,
        "SELECT coalesce(user_email, user_sub) AS k, sum(cost_usd) AS usd FROM usage_events"
        f" WHERE {SQL_PERIOD} GROUP BY 1 ORDER BY 2 DESC, 1",
    )
    shown_users = page.locator("#top-users tbody tr")
    assert [shown_users.nth(i).locator("td").first.inner_text() for i in range(shown_users.count())] == [
        u["k"] for u in users
    ]
    assert "mallory<b>@x.com" in page.inner_text("#top-users")  # shown as text, not markup
    models = page.inner_text("#top-models")
    assert "claude-haiku-4-5@20251001" in models and ROWS[0].requested_model in models
    assert page.inner_text("#denials").splitlines()[-1].split() == ["policy", "1"]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-page.png"), full_page=True)

    download = page.request.get(f"{signin.url}/admin/usage.csv?{PERIOD}&by=user")
    assert download.status == 200
    assert download.headers["content-type"].startswith("text/csv")
    got = {line["user"]: Decimal(line["cost_usd"]) for line in csv.DictReader(io.StringIO(download.text()))}
    assert got == {u["k"]: u["usd"] for u in users}


def test_admin_sign_in_and_export_are_audited(signin: SignInEnv, context: BrowserContext, rows: None) -> None:
    """The admin's sign-in and each CSV export leave audit rows naming the admin."""
    page = context.new_page()
    assert _sign_in(page, signin, "olivia") == 303
    assert page.request.get(f"{signin.url}/admin/usage.csv?{PERIOD}&by=model").status == 200
    kinds = {
        (r["kind"], r["outcome"])
        for r in _sql(signin.dsn, "SELECT kind, outcome FROM audit_events WHERE email = 'olivia@example.com'")
    }
    assert {("admin_signin", "ok"), ("admin_export", "ok")} <= kinds
