"""The sign-in client against an in-process fake of the portal: discovery, device flow, refresh, revoke."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from authz.client.flow import (
    DEVICE_CODE_GRANT,
    ClientError,
    DeviceFlowError,
    GatewayClient,
    GatewayUnavailableError,
    SessionEndedError,
    normalize_gateway,
)

GW = "https://gw.example"
NOW = 1_800_000_000.0

METADATA = {
    "issuer": GW,
    "device_authorization_endpoint": f"{GW}/oauth/device_authorization",
    "token_endpoint": f"{GW}/oauth/token",
    "revocation_endpoint": f"{GW}/oauth/revoke",
    "grant_types_supported": [DEVICE_CODE_GRANT, "refresh_token"],
}
DEVICE = {
    "device_code": "dc-secret",
    "user_code": "WDJB-MJHT",
    "verification_uri": f"{GW}/device",
    "verification_uri_complete": f"{GW}/device?user_code=WDJB-MJHT",
    "expires_in": 600,
    "interval": 5,
}
TOKENS = {
    "access_token": "at-1",
    "token_type": "Bearer",
    "expires_in": 900,
    "refresh_token": "rt-1",
    "email": "ada@example.com",
}
ROTATED = {**TOKENS, "access_token": "at-2", "refresh_token": "rt-2"}


def pending() -> tuple[int, dict[str, Any]]:
    """The token endpoint's answer while the user has not approved yet."""
    return 400, {"error": "authorization_pending"}


def oauth_error(code: str, status: int = 400) -> tuple[int, dict[str, Any]]:
    """An OAuth error answer."""
    return status, {"error": code}


class FakeClock:
    """A clock whose ``sleep`` advances time at once and remembers how long it slept."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def time(self) -> float:
        """The current fake time."""
        return self.now

    def sleep(self, seconds: float) -> None:
        """Advance the fake time by ``seconds``."""
        self.sleeps.append(seconds)
        self.now += seconds


class FakePortal:
    """Plays the portal's OAuth endpoints from scripted answers and records every request."""

    def __init__(
        self,
        *,
        polls: list[tuple[int, dict[str, Any]]] | None = None,
        refresh: tuple[int, dict[str, Any]] = (200, ROTATED),
        metadata: dict[str, Any] | None = None,
        down: bool = False,
    ) -> None:
        self.polls = list(polls if polls is not None else [(200, TOKENS)])
        self.refresh_answer = refresh
        self.metadata = metadata or METADATA
        self.down = down
        self.requests: list[httpx.Request] = []
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request like the portal would."""
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if request.method == "GET" and path == "/.well-known/oauth-authorization-server":
            return httpx.Response(200, json=self.metadata)
        form = dict(parse_qsl(request.content.decode()))
        self.forms.append((path, form))
        if path == "/oauth/device_authorization":
            return httpx.Response(200, json=DEVICE)
        if path == "/oauth/token" and form.get("grant_type") == DEVICE_CODE_GRANT:
            status, body = self.polls.pop(0)
            return httpx.Response(status, json=body)
        if path == "/oauth/token" and form.get("grant_type") == "refresh_token":
            status, body = self.refresh_answer
            return httpx.Response(status, json=body)
        if path == "/oauth/revoke":
            return httpx.Response(200, json={})
        return httpx.Response(404, json={"error": "not_found"})

    def transport(self) -> httpx.MockTransport:
        """An httpx transport that routes to this fake."""
        return httpx.MockTransport(self.handle)

    def form_paths(self) -> list[str]:
        """The paths of the form POSTs received, in order."""
        return [path for path, _ in self.forms]


def _client(portal: FakePortal, clock: FakeClock | None = None) -> GatewayClient:
    clock = clock or FakeClock()
    return GatewayClient(GW, transport=portal.transport(), clock=clock.time, sleep=clock.sleep)


def test_device_authorization_discovers_endpoints_and_sends_surface_cli() -> None:
    """The device authorization request goes to the discovered endpoint with ``surface=cli``."""
    portal = FakePortal()
    with _client(portal) as client:
        auth = client.start_device_authorization()
    assert auth.user_code == "WDJB-MJHT" and auth.interval == 5 and auth.expires_in == 600
    assert portal.requests[0].url == f"{GW}/.well-known/oauth-authorization-server"
    assert portal.forms == [("/oauth/device_authorization", {"surface": "cli"})]


def test_polling_honours_pending_and_slow_down_until_success() -> None:
    """Polling waits ``interval``, adds 5 s at each slow_down, and returns the tokens on approval."""
    portal = FakePortal(polls=[pending(), oauth_error("slow_down"), pending(), (200, TOKENS)])
    clock = FakeClock()
    with _client(portal, clock) as client:
        tokens = client.poll_token(client.start_device_authorization())
    assert clock.sleeps == [5, 5, 10, 10]
    assert (tokens.access_token, tokens.refresh_token, tokens.email) == ("at-1", "rt-1", "ada@example.com")
    polls = [form for path, form in portal.forms if path == "/oauth/token"]
    assert polls[0] == {"grant_type": DEVICE_CODE_GRANT, "device_code": "dc-secret"}


@pytest.mark.parametrize(
    ("code", "text"),
    [("access_denied", "sign-in was denied"), ("expired_token", "expired before it was approved")],
)
def test_denied_or_expired_device_code_fails_with_a_login_hint(code: str, text: str) -> None:
    """access_denied and expired_token end the flow with a message that says what to do."""
    portal = FakePortal(polls=[pending(), oauth_error(code)])
    with _client(portal) as client, pytest.raises(DeviceFlowError) as info:
        client.poll_token(client.start_device_authorization())
    assert info.value.code == code
    assert text in str(info.value) and f"authz login --gateway {GW}" in str(info.value)


def test_polling_stops_at_expires_in_even_if_the_server_keeps_saying_pending() -> None:
    """The client gives up once ``expires_in`` has passed, without polling forever."""
    portal = FakePortal(polls=[pending()] * 200)
    clock = FakeClock()
    with _client(portal, clock) as client, pytest.raises(DeviceFlowError) as info:
        client.poll_token(client.start_device_authorization())
    assert info.value.code == "expired_token"
    assert clock.now - NOW <= 600 + 5


def test_polling_survives_a_temporary_outage_with_backoff() -> None:
    """A 503 while polling is retried after a longer wait rather than ending the sign-in."""
    portal = FakePortal(polls=[oauth_error("temporarily_unavailable", 503), pending(), (200, TOKENS)])
    clock = FakeClock()
    with _client(portal, clock) as client:
        tokens = client.poll_token(client.start_device_authorization())
    assert tokens.access_token == "at-1"
    assert clock.sleeps == [5, 10, 5]


def test_refresh_returns_the_rotated_refresh_token() -> None:
    """A refresh grant sends the refresh token and returns the new pair."""
    portal = FakePortal()
    with _client(portal) as client:
        tokens = client.refresh("rt-1")
    assert (tokens.access_token, tokens.refresh_token) == ("at-2", "rt-2")
    assert portal.forms == [("/oauth/token", {"grant_type": "refresh_token", "refresh_token": "rt-1"})]


def test_refresh_invalid_grant_means_the_session_ended() -> None:
    """401 invalid_grant raises SessionEndedError with the login command."""
    portal = FakePortal(refresh=oauth_error("invalid_grant", 401))
    with _client(portal) as client, pytest.raises(SessionEndedError, match="authz login --gateway"):
        client.refresh("rt-1")


def test_refresh_503_and_network_errors_are_temporary() -> None:
    """503 temporarily_unavailable and a refused connection both raise GatewayUnavailableError."""
    with _client(FakePortal(refresh=oauth_error("temporarily_unavailable", 503))) as client:
        with pytest.raises(GatewayUnavailableError):
            client.refresh("rt-1")
    with _client(FakePortal(down=True)) as client, pytest.raises(GatewayUnavailableError):
        client.refresh("rt-1")


def test_revoke_posts_the_token_with_its_type_hint() -> None:
    """Revocation is an RFC 7009 form POST of the token and its hint."""
    portal = FakePortal()
    with _client(portal) as client:
        client.revoke("rt-1", hint="refresh_token")
    assert portal.forms == [("/oauth/revoke", {"token": "rt-1", "token_type_hint": "refresh_token"})]


def test_metadata_that_downgrades_to_plain_http_is_refused() -> None:
    """An https gateway whose metadata names an http token endpoint is refused before any token is sent."""
    portal = FakePortal(metadata={**METADATA, "token_endpoint": "http://gw.example/oauth/token"})
    with _client(portal) as client, pytest.raises(ClientError, match="plain http"):
        client.refresh("rt-1")
    assert portal.forms == []


def test_a_non_gateway_url_gives_a_clear_error() -> None:
    """A server without the metadata document is reported as probably not the gateway."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="<html>not found</html>")

    client = GatewayClient(GW, transport=httpx.MockTransport(handler))
    with client, pytest.raises(ClientError, match="is this the gateway's URL"):
        client.discover()


def test_gateway_urls_are_normalised_and_checked() -> None:
    """A trailing slash is dropped; a URL that is not absolute http(s) is refused."""
    assert normalize_gateway("https://gw.example/ ") == GW
    for bad in ("gw.example", "ftp://gw.example", "https://gw.example/?x=1"):
        with pytest.raises(ClientError):
            normalize_gateway(bad)


def test_the_token_response_is_validated() -> None:
    """A token response without an access token is a ClientError, not a crash."""
    portal = FakePortal(refresh=(200, {"token_type": "Bearer", "expires_in": 900}))
    with _client(portal) as client, pytest.raises(ClientError, match="malformed"):
        client.refresh("rt-1")
