"""The sign-in pages' cookies and the callback's issuer check, in Chromium against the real IdP:
planted cookie values are never used or set back, each login step mints new values, Chromium keeps
the ``__Host-`` cookies an https deployment sets, and a callback naming another issuer (or none,
since the IdP promises one: RFC 9207) is refused and audited."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Response

from authz.dev.devstack import Ports, Stack
from tests.e2e.signin.conftest import SignInEnv, password
from tests.e2e.signin.flows import (
    capture_callback,
    continue_to_idp,
    decide,
    idp_login,
    is_callback,
    last_audit_id,
    open_verification,
    poll,
    start_device,
)
from tests.e2e.signin.test_signin_negative import reasons_since, with_query

pytestmark = pytest.mark.e2e


def gateway_cookies(context: BrowserContext, url: str) -> dict[str, dict[str, object]]:
    """The gateway's cookies Chromium holds for ``url``, by name."""
    return {
        str(c["name"]): dict(c) for c in context.cookies(url) if str(c["name"]).startswith(("gw_", "__Host-"))
    }


def set_cookie_values(response: Response) -> dict[str, str]:
    """name -> value of the cookies one response sets ("" for an expired one)."""
    values: dict[str, str] = {}
    for header in response.header_values("set-cookie"):
        for name, morsel in SimpleCookie(header).items():
            values[name] = "" if morsel["max-age"] == "0" else morsel.value
    return values


def test_planted_cookies_are_replaced_and_each_step_mints_new_values(
    signin: SignInEnv, browser: Browser
) -> None:
    """With gw_csrf and gw_browser planted beforehand, the form page, the code entry (the 303 to the
    IdP), the callback and the approval each leave Chromium holding values it never held before,
    host-only, HttpOnly and on Path=/; the approval ends them; the sign-in completes."""
    device = start_device(signin.url)
    planted = {"gw_csrf": secrets.token_urlsafe(32), "gw_browser": secrets.token_urlsafe(32)}
    with browser.new_context() as context:
        context.add_cookies([{"name": n, "value": v, "url": signin.url} for n, v in planted.items()])
        steps: dict[str, dict[str, str]] = {}

        def record(response: Response) -> None:
            path = urlsplit(response.url).path
            if response.url.startswith(signin.url) and path in (
                "/device",
                "/oauth/callback",
                "/device/approve",
            ):
                steps[f"{response.request.method} {path}"] = set_cookie_values(response)

        context.on("response", record)
        page = open_verification(context, device.verification_uri_complete)
        held = gateway_cookies(context, signin.url)
        assert held["gw_csrf"]["value"] not in ("", planted["gw_csrf"])
        assert held["gw_browser"]["value"] == planted["gw_browser"]  # not read, not set back either
        with page.expect_response(lambda r: is_callback(signin.url)(r.url)) as callback:
            continue_to_idp(page)
            idp_login(page, signin.issuer, "alice", password("alice"))
        assert callback.value.status == 200
        page.wait_for_load_state()
        held = gateway_cookies(context, signin.url)
        for name, cookie in held.items():
            assert (cookie["httpOnly"], cookie["path"], cookie["domain"]) == (True, "/", "127.0.0.1"), name

        entry, answer = steps["POST /device"], steps["GET /oauth/callback"]
        seen = {*planted.values(), steps["GET /device"]["gw_csrf"]}
        assert entry["gw_browser"] not in seen and entry["gw_csrf"] not in seen
        assert answer["gw_browser"] not in {*seen, entry["gw_browser"]}
        assert answer["gw_csrf"] not in {*seen, entry["gw_csrf"]}
        assert {n: str(c["value"]) for n, c in held.items()} == answer

        assert decide(page, "approve").status == 200
        assert steps["POST /device/approve"] == {"gw_csrf": "", "gw_browser": ""}
        assert gateway_cookies(context, signin.url) == {}
    assert poll(signin.url, device.device_code).status_code == 200


def test_callback_naming_another_issuer_or_none_is_refused(signin: SignInEnv, browser: Browser) -> None:
    """The IdP's callback carries its iss (RFC 9207); the same callback with another iss, or with
    iss removed (the IdP advertises authorization_response_iss_parameter_supported), is refused
    with an error page and an audit row, and the device code stays pending."""
    first, second = start_device(signin.url), start_device(signin.url)
    with browser.new_context() as context:
        url = capture_callback(context, signin.url, signin.issuer, first, "alice", password("alice"))
        assert parse_qs(urlsplit(url).query)["iss"] == [signin.issuer]
        since = last_audit_id(signin.dsn)
        page = context.new_page()
        response = page.goto(with_query(url, iss="https://idp.attacker.example"))
        assert response is not None and response.status == 400
        assert "did not come from your identity provider" in page.inner_text("main")
        rows = reasons_since(signin, since, "callback")
        assert rows == [("denied", "iss_mismatch")]

        url = capture_callback(context, signin.url, signin.issuer, second, None)  # single sign-on
        parts = urlsplit(url)
        query = {k: v for k, v in parse_qs(parts.query).items() if k != "iss"}
        stripped = parts._replace(query="&".join(f"{k}={v[0]}" for k, v in query.items())).geturl()
        since = last_audit_id(signin.dsn)
        response = page.goto(stripped)
        assert response is not None and response.status == 400
        assert reasons_since(signin, since, "callback") == [("denied", "iss_missing")]
    for device in (first, second):
        assert poll(signin.url, device.device_code).json() == {"error": "authorization_pending"}


@pytest.fixture(scope="module")
def https_stack(signin: SignInEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A replica whose public URL is https: Chromium reaches its Envoy over http://127.0.0.1 (a
    potentially trustworthy origin, where Chromium accepts Secure cookies)."""
    stack = Stack(root=tmp_path_factory.mktemp("signin-https"), database_url=signin.dsn)
    stack.ports = Ports.pick(stack.workers)
    public = stack.envoy_url.replace("http://", "https://")
    stack.extra_config = {**signin.stack.extra_config, "portal": {"public_url": public}}
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_chromium_keeps_the_host_prefixed_cookies_of_an_https_deployment(
    https_stack: Stack, browser: Browser
) -> None:
    """Behind an https public URL the form page sets __Host-gw_csrf, and Chromium keeps it with the
    attributes the prefix demands: Secure, Path=/, host-only; no unprefixed cookie is set."""
    with browser.new_context() as context:
        page = context.new_page()
        response = page.goto(f"{https_stack.envoy_url}/device")
        assert response is not None and response.status == 200
        held = gateway_cookies(context, https_stack.envoy_url)
        assert set(held) == {"__Host-gw_csrf"}
        cookie = held["__Host-gw_csrf"]
        assert (cookie["secure"], cookie["path"], cookie["domain"], cookie["httpOnly"]) == (
            True,
            "/",
            "127.0.0.1",
            True,
        )
        assert page.input_value('input[name="csrf"]') == cookie["value"]
