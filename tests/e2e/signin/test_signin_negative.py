"""Refusals of the sign-in through the real Envoy, each leaving an audit row that says why: forged,
reused and replayed callbacks, expired and denied device codes, user-code guessing, open-redirect
attempts and admission failures."""

from __future__ import annotations

import re
import secrets
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from playwright.sync_api import Browser

from authz.signin.portal.device import USER_CODE_ALPHABET, format_user_code
from tests.e2e.signin.conftest import ACCOUNTS, CLIENT_ID, USER_CODE_ATTEMPTS, SignInEnv, password
from tests.e2e.signin.flows import (
    audit_rows,
    capture_callback,
    continue_to_idp,
    decide,
    last_audit_id,
    open_verification,
    poll,
    query,
    sign_in_to_callback,
    start_device,
    unique_ua,
)

pytestmark = pytest.mark.e2e

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def reasons_since(signin: SignInEnv, since: int, kind: str) -> list[tuple[str, str | None]]:
    """(outcome, reason) of the audit rows of ``kind`` written after row ``since``."""
    rows = audit_rows(signin.dsn, "id > $1 AND kind = $2", since, kind)
    return [(r["outcome"], r["reason"]) for r in rows]


def with_query(url: str, **params: str) -> str:
    """``url`` with some query parameters replaced."""
    parts = urlsplit(url)
    query_ = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query_.update(params)
    return urlunsplit(parts._replace(query=urlencode(query_)))


def test_callback_from_another_browser_then_reused(signin: SignInEnv, browser: Browser) -> None:
    """A callback opened in a browser other than the one that started the sign-in is refused
    (state_mismatch) without spoiling it; once used, the same callback is refused (state_reused)."""
    device = start_device(signin.url)
    with browser.new_context() as victim, browser.new_context() as attacker:
        url = capture_callback(victim, signin.url, signin.issuer, device, "alice", password("alice"))
        # The attacker's browser has a binding cookie of its own, just not the victim's.
        attacker.add_cookies([{"name": "gw_browser", "value": secrets.token_urlsafe(32), "url": signin.url}])
        since = last_audit_id(signin.dsn)
        forged = attacker.new_page()
        response = forged.goto(url)
        assert response is not None and response.status == 400
        assert reasons_since(signin, since, "callback") == [("denied", "state_mismatch")]

        page = victim.new_page()
        response = page.goto(url)
        assert response is not None and response.status == 200
        assert "Approve sign-in" in page.inner_text("h1")

        since = last_audit_id(signin.dsn)
        replay = victim.new_page()
        response = replay.goto(url)
        assert response is not None and response.status == 400
        assert reasons_since(signin, since, "callback") == [("denied", "state_reused")]
        # The first page still approves: the refusals did not consume its approval.
        assert decide(page, "approve").status == 200
    assert poll(signin.url, device.device_code).status_code == 200


def test_authorization_code_replay_is_refused_by_the_idp(signin: SignInEnv, browser: Browser) -> None:
    """An authorization code already redeemed, pasted into a fresh callback of the same browser, is
    refused by the IdP and audited as code_exchange_refused."""
    first, second = start_device(signin.url), start_device(signin.url)
    with browser.new_context() as context:
        used = capture_callback(context, signin.url, signin.issuer, first, "alice", password("alice"))
        page = context.new_page()
        response = page.goto(used)
        assert response is not None and response.status == 200  # the code is redeemed now
        fresh = capture_callback(context, signin.url, signin.issuer, second, None)  # single sign-on
        old_code = parse_qs(urlsplit(used).query)["code"][0]
        since = last_audit_id(signin.dsn)
        replay = context.new_page()
        response = replay.goto(with_query(fresh, code=old_code))
        assert response is not None and response.status == 400
        assert "refused" in replay.inner_text("main")
    rows = audit_rows(signin.dsn, "id > $1 AND kind = 'callback'", since)
    assert [(r["outcome"], r["reason"], r["detail"]) for r in rows] == [
        ("denied", "code_exchange_refused", {"idp_error": "invalid_grant"})
    ]
    assert poll(signin.url, second.device_code).json() == {"error": "authorization_pending"}


def test_expired_device_code(signin: SignInEnv, browser: Browser) -> None:
    """Once its lifetime has passed, polling a device code answers expired_token and its user code
    is no longer accepted on the page."""
    ua = unique_ua("expired")
    device = start_device(signin.url, ua=ua)
    # Ten minutes are not waited for: the row is aged instead.
    query(
        signin.dsn,
        "UPDATE device_codes SET expires_at = now() - interval '1 second' WHERE user_code = $1",
        device.user_code.replace("-", ""),
    )
    response = poll(signin.url, device.device_code, ua=ua)
    assert (response.status_code, response.json()) == (400, {"error": "expired_token"})
    assert [(r["kind"], r["reason"]) for r in audit_rows(signin.dsn, "user_agent = $1", ua)] == [
        ("device_authorization", None),
        ("token", "expired_token"),
    ]
    since = last_audit_id(signin.dsn)
    with browser.new_context() as context:
        page = open_verification(context, device.verification_uri_complete)
        with page.expect_response(lambda r: r.url.endswith("/device")) as answer:
            continue_to_idp(page)
        assert answer.value.status == 400
        assert "expired" in page.inner_text(".error")
    assert reasons_since(signin, since, "device_verify") == [("denied", "unknown_code")]


def test_denied_at_approval(signin: SignInEnv, browser: Browser) -> None:
    """Deny on the approval page makes the poll answer access_denied."""
    ua = unique_ua("deny")
    device = start_device(signin.url, ua=ua)
    since = last_audit_id(signin.dsn)
    with browser.new_context() as context:
        page, callback = sign_in_to_callback(
            context, signin.url, signin.issuer, device, "alice", password("alice")
        )
        assert callback.status == 200
        assert decide(page, "deny").status == 200
        assert "denied" in page.inner_text("h1")
    response = poll(signin.url, device.device_code, ua=ua)
    assert (response.status_code, response.json()) == (400, {"error": "access_denied"})
    rows = audit_rows(signin.dsn, "id > $1 AND kind = 'approval'", since)
    assert [(r["outcome"], r["reason"], r["email"]) for r in rows] == [
        ("denied", "user_denied", "alice@example.com")
    ]
    assert ("token", "access_denied") in [
        (r["kind"], r["reason"]) for r in audit_rows(signin.dsn, "user_agent = $1", ua)
    ]


def test_cancelled_at_the_idp(signin: SignInEnv, browser: Browser) -> None:
    """Cancel on the IdP's form comes back as access_denied and denies the device code."""
    device = start_device(signin.url)
    since = last_audit_id(signin.dsn)
    with browser.new_context() as context:
        page = open_verification(context, device.verification_uri_complete)
        with page.expect_response(lambda r: r.url.startswith(f"{signin.url}/oauth/callback")) as callback:
            continue_to_idp(page)
            page.wait_for_selector("#cancel")
            page.click("#cancel")
        assert callback.value.status == 403
    assert reasons_since(signin, since, "callback") == [("denied", "idp_access_denied")]
    assert poll(signin.url, device.device_code).json() == {"error": "access_denied"}


def test_user_code_guessing_is_rate_limited_per_address(signin: SignInEnv) -> None:
    """Guessing user codes from one address, even behind forged X-Forwarded-For headers, gets 429 with
    Retry-After after the configured number of attempts, audited as rate_limited; another address is
    not affected."""
    # Envoy appends the peer address to X-Forwarded-For: 127.0.0.2 is a client of its own.
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, base_url=signin.url) as guesser:
        form = guesser.get("/device")
        assert form.status_code == 200
        match = CSRF_FIELD.search(form.text)
        assert match is not None
        csrf = match.group(1)
        since = last_audit_id(signin.dsn)
        statuses = []
        for _ in range(USER_CODE_ATTEMPTS + 5):
            guess = format_user_code("".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8)))
            # A forged X-Forwarded-For does not buy a fresh bucket: Envoy appends the real peer.
            spoofed = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
            response = guesser.post(
                "/device",
                data={"user_code": guess, "csrf": csrf},
                headers={"Origin": signin.url, "X-Forwarded-For": spoofed},
            )
            statuses.append(response.status_code)
            # Each form page comes with a freshly minted token (and its cookie).
            if (fresh := CSRF_FIELD.search(response.text)) is not None:
                csrf = fresh.group(1)
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                break
    # Every attempt counts; the bucket refills a little while they are made.
    assert statuses[:USER_CODE_ATTEMPTS] == [400] * USER_CODE_ATTEMPTS
    assert statuses[-1] == 429
    rows = audit_rows(signin.dsn, "id > $1 AND kind = 'device_verify'", since)
    assert {r["client_ip"] for r in rows} == {"127.0.0.2"}
    assert [r["reason"] for r in rows] == ["unknown_code"] * (len(statuses) - 1) + ["rate_limited"]

    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), base_url=signin.url) as other:
        csrf = CSRF_FIELD.search(other.get("/device").text)
        assert csrf is not None
        response = other.post(
            "/device", data={"user_code": "BCDF-GHJK", "csrf": csrf.group(1)}, headers={"Origin": signin.url}
        )
        assert response.status_code == 400


def test_open_redirect_attempts_never_leave_the_idp(signin: SignInEnv, browser: Browser) -> None:
    """Redirect parameters on the verification page and the callback are ignored, and the IdP refuses
    an authorization request naming another redirect URI without redirecting anywhere."""
    evil = "https://evil.example/steal"
    device = start_device(signin.url)
    page_url = f"{signin.url}/device?user_code={device.user_code}&next={evil}&redirect_uri={evil}"
    response = httpx.get(page_url)
    assert response.status_code == 200 and "location" not in response.headers
    callback = httpx.get(
        f"{signin.url}/oauth/callback", params={"state": "x", "next": evil, "redirect_uri": evil}
    )
    assert callback.status_code == 400 and "location" not in callback.headers

    with browser.new_context() as context:
        # The form, posted with extra redirect fields, still sends the browser to the IdP with the
        # registered redirect URI.
        page = open_verification(context, f"{signin.url}/device?user_code={device.user_code}&next={evil}")
        page.evaluate(
            """(evil) => {
                for (const name of ["next", "redirect_uri", "return_to"]) {
                    const input = document.createElement("input");
                    input.type = "hidden"; input.name = name; input.value = evil;
                    document.querySelector('form[action="/device"]').appendChild(input);
                }
            }""",
            evil,
        )
        with page.expect_response(lambda r: r.url.endswith("/device")) as answer:
            continue_to_idp(page)
        location = answer.value.headers["location"]
        assert location.startswith(f"{signin.issuer}/")
        params = parse_qs(urlsplit(location).query)
        assert params["redirect_uri"] == [f"{signin.url}/oauth/callback"]
        assert params["client_id"] == [CLIENT_ID]
        page.wait_for_selector('input[name="login"]')

        # The same authorization request with the attacker's redirect URI stops at the IdP.
        navigations: list[str] = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url))
        tampered = with_query(location, redirect_uri=evil)
        response_ = page.goto(tampered)
        assert response_ is not None and response_.status == 400
        assert page.url.startswith(signin.issuer)
        assert all(url.startswith(signin.issuer) for url in navigations), navigations
        assert "redirect_uri" in page.inner_text("body")


@pytest.mark.parametrize(
    ("account", "reason"),
    [
        ("bob", "email_not_verified"),
        ("carol", "email_domain_not_allowed"),
        ("dave", "group_not_allowed"),
    ],
)
def test_admission_failures(signin: SignInEnv, browser: Browser, account: str, reason: str) -> None:
    """A user the admission rules refuse sees a 403 page, the audit row names the user and the
    reason, and the device code ends access_denied."""
    device = start_device(signin.url)
    since = last_audit_id(signin.dsn)
    with browser.new_context() as context:
        page, callback = sign_in_to_callback(
            context, signin.url, signin.issuer, device, account, password(account)
        )
        assert callback.status == 403
        assert "Access not allowed" in page.inner_text("h1")
    rows = audit_rows(signin.dsn, "id > $1 AND kind = 'callback'", since)
    email = ACCOUNTS[account]["email"]
    assert [(r["outcome"], r["reason"], r["email"]) for r in rows] == [("denied", reason, email)]
    response = poll(signin.url, device.device_code)
    assert (response.status_code, response.json()) == (400, {"error": "access_denied"})
    sessions = query(signin.dsn, "SELECT id FROM sessions WHERE lower(email) = $1", email)
    assert sessions == []
