"""Two gateway replicas sharing PostgreSQL: a sign-in may hop between them, and whichever way a
session ends at replica A, replica B's ext_authz refuses its access token within 2 seconds
(LISTEN/NOTIFY), through B's own Envoy."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from playwright.sync_api import Browser

from authz.dev.devstack import Stack
from tests.e2e.signin.conftest import SignInEnv, password
from tests.e2e.signin.flows import (
    assert_refused,
    audit_rows,
    decide,
    invoke,
    poll,
    refresh,
    session_row,
    sid_of,
    sign_in,
    sign_in_to_callback,
    start_device,
    unique_ua,
    wait_refused,
)

pytestmark = pytest.mark.e2e

# Each case ends its account's IdP sessions or disables it, so each has an account of its own.
CASES = {
    "admin": ("frank", "revoked by an administrator", "admin_revoke"),
    "rfc7009": ("grace", "rfc7009", "revoke"),
    "backchannel_logout": ("heidi", "backchannel_logout", "backchannel_logout"),
    "idp_disabled_then_refresh": ("ivan", "idp_refused", "refresh"),
}


def test_device_flow_across_replicas(signin: SignInEnv, replica_b: Stack, browser: Browser) -> None:
    """Device authorization and polling at replica B, the browser at replica A (the public URL):
    the state is in PostgreSQL, so B hands out the session and refreshes it."""
    device = start_device(replica_b.envoy_url)
    assert device.verification_uri == f"{signin.url}/device"
    assert poll(replica_b.envoy_url, device.device_code).json() == {"error": "authorization_pending"}
    with browser.new_context() as context:
        page, callback = sign_in_to_callback(
            context, signin.url, signin.issuer, device, "alice", password("alice")
        )
        assert callback.status == 200
        assert decide(page, "approve").status == 200
    response = poll(replica_b.envoy_url, device.device_code)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["email"] == "alice@example.com"
    assert invoke(signin.url, tokens["access_token"]).status_code == 200
    refreshed = refresh(replica_b.envoy_url, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    assert sid_of(refreshed.json()["access_token"]) == sid_of(tokens["access_token"])


@pytest.mark.parametrize("case", list(CASES))
def test_revocation_reaches_the_other_replica(
    signin: SignInEnv, replica_b: Stack, browser: Browser, case: str
) -> None:
    """The session ended at replica A (admin, RFC 7009, back-channel logout, or an IdP refusal at
    refresh) is refused by replica B with 401 and ``x-should-retry: false`` within 2 seconds."""
    account, reason, audit_kind = CASES[case]
    ua = unique_ua(case)
    tokens = sign_in(browser, signin.url, signin.issuer, account, password(account), ua=ua)
    assert invoke(replica_b.envoy_url, tokens.access_token).status_code == 200

    if case == "admin":
        assert signin.stack.config_path is not None
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "authz.cli",
                "sessions",
                "revoke",
                "--config",
                str(signin.stack.config_path),
                "--session",
                tokens.sid,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f"Revoked session {tokens.sid}" in result.stdout
    elif case == "rfc7009":
        response = httpx.post(
            f"{signin.url}/oauth/revoke",
            data={"token": tokens.access_token, "token_type_hint": "access_token"},
            headers={"User-Agent": ua},
        )
        assert response.status_code == 200
    elif case == "backchannel_logout":
        assert signin.idp.backchannel_logout(account) == [200]
    else:
        signin.idp.disable(account)
        response = refresh(signin.url, tokens.refresh_token, ua=ua)
        assert (response.status_code, response.json()) == (401, {"error": "invalid_grant"})
    done = time.monotonic()

    elapsed = wait_refused(replica_b.envoy_url, tokens.access_token, since=done)
    assert elapsed < 2.0, f"replica B refused the token only {elapsed:.2f}s after the {case}"
    assert_refused(invoke(signin.url, tokens.access_token))
    session = session_row(signin.dsn, tokens.sid)
    assert session["revoked_reason"] == reason
    rows = audit_rows(signin.dsn, "session_id = $1 AND kind = $2", tokens.sid, audit_kind)
    assert rows, f"no {audit_kind} audit row for {tokens.sid}"
    # Neither replica lets the session be refreshed back to life.
    for url in (signin.url, replica_b.envoy_url):
        again = refresh(url, tokens.refresh_token)
        assert (again.status_code, again.json()) == (401, {"error": "invalid_grant"})
