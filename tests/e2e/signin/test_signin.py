"""Claude Code's gateway sign-in through the real Envoy: RFC 8414 discovery, the RFC 8628 device
flow with a real IdP in headless Chromium, the token endpoint, and inference with the token."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from anthropic import AnthropicBedrock
from playwright.sync_api import Browser

from tests.e2e.conftest import wait_for
from tests.e2e.signin.conftest import SignInEnv, password
from tests.e2e.signin.flows import (
    DEVICE_GRANT,
    SONNET_PROFILE,
    audit_rows,
    decide,
    idp_login,
    invoke,
    is_callback,
    open_verification,
    poll,
    query,
    refresh,
    session_row,
    sign_in,
    start_device,
    unique_ua,
    wait_refused,
)

pytestmark = pytest.mark.e2e

USER_CODE = re.compile(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}")

_OPEN: list[AnthropicBedrock] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every SDK client a test made."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def test_discovery_names_the_rfc_fields_under_the_public_url(signin: SignInEnv) -> None:
    """RFC 8414 metadata through Envoy has the RFC field names and only URLs under the public URL."""
    response = httpx.get(f"{signin.url}/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    metadata = response.json()
    assert metadata["issuer"] == signin.url
    assert metadata["device_authorization_endpoint"] == f"{signin.url}/oauth/device_authorization"
    assert metadata["token_endpoint"] == f"{signin.url}/oauth/token"
    assert metadata["revocation_endpoint"] == f"{signin.url}/oauth/revoke"
    assert set(metadata["grant_types_supported"]) == {DEVICE_GRANT, "refresh_token"}
    urls = [v for v in metadata.values() if isinstance(v, str) and "://" in v]
    assert len(urls) >= 5
    assert all(v.startswith(signin.url) for v in urls), urls
    jwks = httpx.get(metadata["jwks_uri"])
    assert jwks.status_code == 200
    assert [(k["kid"], k["alg"]) for k in jwks.json()["keys"]] == [("dev-1", "ES256")]


def test_device_and_token_endpoints_speak_rfc_8628(signin: SignInEnv) -> None:
    """Device authorization needs no client_id and ignores unknown fields; the token endpoint
    answers the RFC 8628 and RFC 6749 error codes as JSON, never by redirecting."""
    ua = unique_ua("endpoints")
    response = httpx.post(
        f"{signin.url}/oauth/device_authorization",
        data={"surface": "claude_code", "unknown": "ignored"},
        headers={"User-Agent": ua},
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    assert len(body["device_code"]) >= 43  # 256 bits in base64url
    assert USER_CODE.fullmatch(body["user_code"])
    assert body["verification_uri"] == f"{signin.url}/device"
    assert body["verification_uri_complete"] == f"{signin.url}/device?user_code={body['user_code']}"
    assert (body["expires_in"], body["interval"]) == (600, 5)
    stored = query(
        signin.dsn,
        "SELECT surface, user_agent FROM device_codes WHERE user_code = $1",
        body["user_code"].replace("-", ""),
    )
    assert stored == [{"surface": "claude_code", "user_agent": ua}]

    first = poll(signin.url, body["device_code"], ua=ua)
    assert (first.status_code, first.json()) == (400, {"error": "authorization_pending"})
    second = poll(signin.url, body["device_code"], ua=ua)
    assert (second.status_code, second.json()) == (400, {"error": "slow_down"})
    unknown = poll(signin.url, "not-a-device-code", ua=ua)
    assert (unknown.status_code, unknown.json()) == (400, {"error": "invalid_grant"})
    grant = httpx.post(
        f"{signin.url}/oauth/token", data={"grant_type": "password"}, headers={"User-Agent": ua}
    )
    assert (grant.status_code, grant.json()) == (400, {"error": "unsupported_grant_type"})
    wrong_method = httpx.get(f"{signin.url}/oauth/token")
    assert wrong_method.status_code == 405 and wrong_method.json() == {"error": "invalid_request"}
    assert "location" not in wrong_method.headers
    revoke = httpx.post(f"{signin.url}/oauth/revoke", data={"token": "nothing-like-a-token"})
    assert revoke.status_code == 200

    reasons = [(r["kind"], r["outcome"], r["reason"]) for r in audit_rows(signin.dsn, "user_agent = $1", ua)]
    assert reasons == [
        ("device_authorization", "ok", None),
        ("token", "denied", "slow_down"),
        ("token", "denied", "invalid_grant"),
        ("token", "denied", "unsupported_grant_type"),
    ]


def test_device_flow_in_chromium_then_inference(signin: SignInEnv, browser: Browser) -> None:
    """Device authorization, the pre-filled page (not auto-submitted), the IdP's login, approval and
    the token poll give a token that works for inference through Envoy, recorded with the session."""
    ua = unique_ua("happy")
    device = start_device(signin.url, ua=ua)
    with browser.new_context() as context:
        page = open_verification(context, device.verification_uri_complete)
        assert page.input_value("#user_code") == device.user_code
        with page.expect_response(lambda r: is_callback(signin.url)(r.url)) as callback:
            page.click('form[action="/device"] button[type="submit"]')
            idp_login(page, signin.issuer, "alice", password("alice"))
        assert callback.value.status == 200
        assert callback.value.headers["content-security-policy"].startswith("default-src 'none'")
        text = page.inner_text("main")
        assert "Claude Code" in text and "alice@example.com" in text and device.user_code in text
        pending = poll(signin.url, device.device_code, ua=ua)
        assert pending.json() == {"error": "authorization_pending"}
        assert decide(page, "approve").status == 200
        assert "Signed in as alice@example.com" in page.inner_text("main")

    response = poll(signin.url, device.device_code, ua=ua)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    tokens = response.json()
    assert set(tokens) == {"access_token", "token_type", "expires_in", "refresh_token", "email"}
    assert (tokens["token_type"], tokens["expires_in"], tokens["email"]) == (
        "Bearer",
        900,
        "alice@example.com",
    )
    assert len(tokens["refresh_token"]) >= 43
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert (claims["iss"], claims["email"], claims["groups"]) == (
        signin.url,
        "alice@example.com",
        ["developers"],
    )
    session = session_row(signin.dsn, claims["sid"])
    assert (session["email"], session["surface"], session["user_agent"]) == (
        "alice@example.com",
        "claude_code",
        ua,
    )
    assert session["idp_sid"] and session["idp_refresh_token"]

    # The device code is single-use.
    again = poll(signin.url, device.device_code, ua=ua)
    assert (again.status_code, again.json()) == (400, {"error": "invalid_grant"})

    client = AnthropicBedrock(
        api_key=tokens["access_token"], base_url=signin.url, aws_region="us-east-1", max_retries=0
    )
    _OPEN.append(client)
    message = client.messages.create(
        model=SONNET_PROFILE, max_tokens=16, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.content
    rows = wait_for(
        lambda: query(signin.dsn, "SELECT * FROM usage_events WHERE session_id = $1", claims["sid"])
    )
    assert [(r["user_email"], r["outcome"]) for r in rows] == [("alice@example.com", "complete")]


def test_refresh_rotates_and_reuse_revokes_the_session(signin: SignInEnv, browser: Browser) -> None:
    """A refresh rotates the refresh token and picks up group changes at the IdP; presenting a spent
    refresh token again ends the session, and Envoy then refuses its access tokens."""
    ua = unique_ua("reuse")
    tokens = sign_in(browser, signin.url, signin.issuer, "judy", password("judy"), ua=ua)
    first = refresh(signin.url, tokens.refresh_token, ua=ua)
    assert first.status_code == 200, first.text
    rotated = first.json()
    assert rotated["refresh_token"] != tokens.refresh_token
    assert invoke(signin.url, rotated["access_token"]).status_code == 200

    # A refresh asks the IdP again: a group change there shows in the next access token.
    signin.idp.set_groups("judy", ["developers", "platform"])
    second = refresh(signin.url, rotated["refresh_token"], ua=ua)
    assert second.status_code == 200, second.text
    claims = jwt.decode(second.json()["access_token"], options={"verify_signature": False})
    assert claims["groups"] == ["developers", "platform"]
    assert session_row(signin.dsn, tokens.sid)["groups"] == ["developers", "platform"]

    reused = refresh(signin.url, tokens.refresh_token, ua=ua)
    assert (reused.status_code, reused.json()) == (401, {"error": "invalid_grant"})
    assert wait_refused(signin.url, second.json()["access_token"], since=time.monotonic()) < 2.0
    assert session_row(signin.dsn, tokens.sid)["revoked_reason"] == "refresh_token_reuse"
    later = refresh(signin.url, second.json()["refresh_token"], ua=ua)
    assert (later.status_code, later.json()) == (401, {"error": "invalid_grant"})
    reasons = [(r["kind"], r["outcome"], r["reason"]) for r in audit_rows(signin.dsn, "user_agent = $1", ua)]
    assert ("refresh", "denied", "refresh_token_reuse") in reasons
