"""Helpers for the sign-in tests: the OAuth endpoints over httpx, the verification page in Chromium,
audit rows, and waiting for a replica to refuse a token."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import asyncpg
import httpx
import jwt
from playwright.sync_api import Browser, BrowserContext, Page, Response, Route

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLAUDE_UA = "claude-cli/2.1.0 (external, cli)"
SONNET_PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
INVOKE_PATH = f"/model/{SONNET_PROFILE}/invoke"
INVOKE_BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "hi"}],
}


def unique_ua(label: str) -> str:
    """A User-Agent no other test sends, so its audit rows can be picked out."""
    return f"{CLAUDE_UA} e2e-{label}-{time.monotonic_ns()}"


# --- the OAuth endpoints --------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """An RFC 8628 device authorization response."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int


def start_device(url: str, *, ua: str = CLAUDE_UA, **extra: str) -> Device:
    """``POST /oauth/device_authorization`` the way Claude Code does: ``surface`` only."""
    response = httpx.post(
        f"{url}/oauth/device_authorization",
        data={"surface": "claude_code", **extra},
        headers={"User-Agent": ua},
    )
    assert response.status_code == 200, response.text
    return Device(**response.json())


def poll(url: str, device_code: str, *, ua: str = CLAUDE_UA) -> httpx.Response:
    """One device-code poll at the token endpoint."""
    return httpx.post(
        f"{url}/oauth/token",
        data={"grant_type": DEVICE_GRANT, "device_code": device_code},
        headers={"User-Agent": ua},
    )


def refresh(url: str, refresh_token: str, *, ua: str = CLAUDE_UA) -> httpx.Response:
    """One refresh_token grant at the token endpoint."""
    return httpx.post(
        f"{url}/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers={"User-Agent": ua},
    )


def invoke(url: str, token: str) -> httpx.Response:
    """A small Bedrock-format inference call with ``token`` as the bearer."""
    return httpx.post(f"{url}{INVOKE_PATH}", headers={"authorization": f"Bearer {token}"}, json=INVOKE_BODY)


def sid_of(access_token: str) -> str:
    """The gateway session id (``sid``) in an access token (not verified: the gateway did that)."""
    sid: str = jwt.decode(access_token, options={"verify_signature": False})["sid"]
    return sid


def assert_refused(response: httpx.Response) -> None:
    """The answer to a revoked or expired token: 401 ``authentication_error``, not to be retried."""
    assert response.status_code == 401, response.text
    assert response.headers.get("x-should-retry") == "false"
    assert response.json()["error"]["type"] == "authentication_error"


def wait_refused(url: str, token: str, since: float | None = None, timeout: float = 5.0) -> float:
    """Poll an inference route until ``token`` is refused; return the seconds since ``since`` (a
    ``time.monotonic()`` reading, by default the first poll)."""
    start = time.monotonic() if since is None else since
    while True:
        response = invoke(url, token)
        elapsed = time.monotonic() - start
        if response.status_code != 200:
            assert_refused(response)
            return elapsed
        assert elapsed < timeout, f"{url} still accepts the token after {elapsed:.2f}s"
        time.sleep(0.05)


# --- PostgreSQL -----------------------------------------------------------------------------------


def query(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Run one statement and return its rows. On a thread of its own, so that it never meets the
    event loop Playwright's sync API keeps on this one."""

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result(timeout=30)


def audit_rows(dsn: str, where: str, *args: Any) -> list[dict[str, Any]]:
    """``audit_events`` rows matching ``where`` (SQL with $n parameters), oldest first."""
    rows = query(dsn, f"SELECT * FROM audit_events WHERE {where} ORDER BY id", *args)
    for row in rows:
        if isinstance(row["detail"], str):
            row["detail"] = json.loads(row["detail"])
    return rows


def last_audit_id(dsn: str) -> int:
    """The newest audit row's id (0 when there is none)."""
    return int(query(dsn, "SELECT COALESCE(max(id), 0) AS id FROM audit_events")[0]["id"])


def session_row(dsn: str, session_id: str) -> dict[str, Any]:
    """The ``sessions`` row of ``session_id``."""
    rows = query(dsn, "SELECT * FROM sessions WHERE id = $1", session_id)
    assert len(rows) == 1, session_id
    return rows[0]


# --- the browser ----------------------------------------------------------------------------------


def open_verification(context: BrowserContext, url: str) -> Page:
    """Open the verification page and check it only shows the code: no navigation of its own."""
    page = context.new_page()
    navigations: list[str] = []
    page.on(
        "framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None
    )
    response = page.goto(url)
    assert response is not None and response.status == 200
    # A tight policy: no scripts at all, nothing framed, forms only to us and the IdP.
    csp = response.headers["content-security-policy"]
    assert csp.startswith("default-src 'none';") and "script-src" not in csp, csp
    assert "frame-ancestors 'none'" in csp
    # No scripts may run (CSP) and nothing may submit the pre-filled form: once the network is idle,
    # the page is still the one we opened.
    page.wait_for_load_state("networkidle")
    assert page.url == url
    assert navigations == [url]
    return page


def continue_to_idp(page: Page) -> None:
    """Press the verification page's button (the code is already in the field)."""
    page.click('form[action="/device"] button[type="submit"]')


def idp_login(page: Page, issuer: str, login: str, password: str) -> None:
    """Fill the IdP's login form and submit it."""
    page.wait_for_selector('input[name="login"]')
    assert page.url.startswith(issuer), page.url
    page.fill('input[name="login"]', login)
    page.fill('input[name="password"]', password)
    page.click("#submit")


def is_callback(gateway: str) -> Callable[[str], bool]:
    """A URL predicate for the gateway's ``/oauth/callback``."""
    prefix = f"{gateway}/oauth/callback"
    return lambda url: url.startswith(prefix)


def sign_in_to_callback(
    context: BrowserContext, gateway: str, issuer: str, device: Device, login: str, password: str
) -> tuple[Page, Response]:
    """Verification page, Continue, the IdP's form: return the page at the callback and its response."""
    page = open_verification(context, device.verification_uri_complete)
    assert page.input_value("#user_code") == device.user_code
    with page.expect_response(lambda r: is_callback(gateway)(r.url)) as callback:
        continue_to_idp(page)
        idp_login(page, issuer, login, password)
    page.wait_for_load_state()
    return page, callback.value


def capture_callback(
    context: BrowserContext,
    gateway: str,
    issuer: str,
    device: Device,
    login: str | None,
    password: str = "",
) -> str:
    """Run the sign-in up to the IdP's redirect back and return the callback URL, not following it.

    Playwright routes only the first request of a redirect chain, so the request that starts the
    chain (the IdP's login form POST, or with ``login`` None, when the context already has an IdP
    session, our own ``POST /device``) is fetched here and its redirects followed with the
    context's cookies until one points at the callback.
    """
    matches = is_callback(gateway)
    captured: list[str] = []

    def follow(route: Route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        url = route.request.url
        response = route.fetch(max_redirects=0)
        while response.status in (301, 302, 303, 307, 308):
            url = urljoin(url, response.headers["location"])
            if matches(url):
                captured.append(url)
                route.fulfill(status=200, content_type="text/plain", body="callback captured")
                return
            response = context.request.get(url, max_redirects=0)
        route.fulfill(response=response)

    def target(url: str) -> bool:
        if login is None:
            return url == f"{gateway}/device"
        return url.startswith(f"{issuer}/interaction/") and url.endswith("/login")

    context.route(target, follow)
    try:
        page = open_verification(context, device.verification_uri_complete)
        continue_to_idp(page)
        if login is not None:
            idp_login(page, issuer, login, password)
        page.wait_for_selector("text=callback captured")
        page.close()
    finally:
        context.unroute(target, follow)
    assert len(captured) == 1, captured
    return captured[0]


def decide(page: Page, decision: str) -> Response:
    """Press Approve or Deny on the approval page; return the answer to that POST."""
    with page.expect_response(lambda r: r.url.endswith("/device/approve")) as answer:
        page.click(f'button[name="decision"][value="{decision}"]')
    page.wait_for_load_state()
    return answer.value


@dataclass(frozen=True)
class Tokens:
    """What the token endpoint returned for one approved sign-in."""

    access_token: str
    refresh_token: str
    email: str
    body: dict[str, Any]

    @property
    def sid(self) -> str:
        """The gateway session id."""
        return sid_of(self.access_token)


def sign_in(
    browser: Browser, gateway: str, issuer: str, login: str, password: str, *, ua: str = CLAUDE_UA
) -> Tokens:
    """A whole device flow: authorization, the browser's round trip and approval, the token poll."""
    device = start_device(gateway, ua=ua)
    with browser.new_context() as context:
        page, callback = sign_in_to_callback(context, gateway, issuer, device, login, password)
        assert callback.status == 200, page.content()
        assert decide(page, "approve").status == 200
    response = poll(gateway, device.device_code, ua=ua)
    assert response.status_code == 200, response.text
    body = response.json()
    return Tokens(body["access_token"], body["refresh_token"], body["email"], body)
