"""The test IdP (npm oidc-provider) against plain httpx, authlib and headless Chromium."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from aiohttp import web
from authlib.integrations.httpx_client import OAuth2Client, OAuthError
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from playwright.sync_api import Browser, BrowserContext

from tests.idp_fixture import TestIdp, launch_chromium

pytestmark = pytest.mark.integration

SCOPE = "openid email profile groups offline_access"
LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
ACCOUNTS = {
    "alice": {
        "email": "alice@example.com",
        "email_verified": True,
        "groups": ["engineering", "claude-users"],
        "password": "alice-password",
    },
    "bob": {
        "email": "Bob@Example.com",
        "email_verified": False,
        "groups": ["sales"],
        "password": "bob-password",
    },
}


# --- The relying-party side: redirect target and back-channel logout receiver -------------------


@dataclass
class Receiver:
    """A tiny aiohttp app on its own thread: redirect URIs and back-channel logout endpoints."""

    base: str
    logout_tokens: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """The receiver, serving ``/cb/<client>`` and ``/logout/<client>`` on a loopback port."""
    loop = asyncio.new_event_loop()
    tokens: dict[str, list[str]] = {}

    async def callback(request: web.Request) -> web.Response:
        return web.Response(text="signed in")

    async def logout(request: web.Request) -> web.Response:
        form = await request.post()
        tokens.setdefault(request.match_info["client"], []).append(str(form["logout_token"]))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_get("/cb/{client}", callback)
    app.router.add_post("/logout/{client}", logout)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield Receiver(base=f"http://127.0.0.1:{port}", logout_tokens=tokens)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


# --- The IdP and its clients --------------------------------------------------------------------


@dataclass
class Rp:
    """One registered client and how authlib authenticates it."""

    client_id: str
    auth_method: str
    secret: str  # the client secret, or the PEM private key for private_key_jwt
    id_token_alg: str
    redirect_uri: str


@pytest.fixture(scope="module")
def rp_key() -> rsa.RSAPrivateKey:
    """The private_key_jwt client's RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rps(receiver: Receiver, rp_key: rsa.RSAPrivateKey) -> dict[str, Rp]:
    """One client per token endpoint authentication method; rp-post wants ES256 ID tokens."""
    pem = rp_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    rows = [
        ("rp-basic", "client_secret_basic", secrets.token_urlsafe(32), "RS256"),
        ("rp-post", "client_secret_post", secrets.token_urlsafe(32), "ES256"),
        ("rp-jwt", "private_key_jwt", pem, "RS256"),
    ]
    return {
        cid: Rp(cid, method, secret, alg, f"{receiver.base}/cb/{cid}") for cid, method, secret, alg in rows
    }


def client_metadata(rp: Rp, receiver: Receiver, rp_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """oidc-provider client metadata for ``rp``."""
    meta: dict[str, Any] = {
        "client_id": rp.client_id,
        "redirect_uris": [rp.redirect_uri],
        "token_endpoint_auth_method": rp.auth_method,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "id_token_signed_response_alg": rp.id_token_alg,
        "backchannel_logout_uri": f"{receiver.base}/logout/{rp.client_id}",
        "backchannel_logout_session_required": True,
    }
    if rp.auth_method == "private_key_jwt":
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rp_key.public_key(), as_dict=True)
        meta["jwks"] = {"keys": [{**jwk, "use": "sig", "alg": "RS256", "kid": "rp-jwt-1"}]}
    else:
        meta["client_secret"] = rp.secret
    return meta


@pytest.fixture
def idp(
    tmp_path: Path, receiver: Receiver, rps: dict[str, Rp], rp_key: rsa.RSAPrivateKey
) -> Iterator[TestIdp]:
    """A fresh IdP per test, with the three clients and alice and bob."""
    server = TestIdp()
    clients = [client_metadata(rp, receiver, rp_key) for rp in rps.values()]
    server.start(tmp_path / "idp", clients, json.loads(json.dumps(ACCOUNTS)))
    receiver.logout_tokens.clear()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def discovery(idp: TestIdp) -> dict[str, Any]:
    """The IdP's OpenID Provider metadata."""
    response = httpx.get(f"{idp.issuer}/.well-known/openid-configuration")
    response.raise_for_status()
    metadata: dict[str, Any] = response.json()
    return metadata


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, through Playwright."""
    with launch_chromium() as chromium:
        yield chromium


# --- Helpers ------------------------------------------------------------------------------------


_open_clients: list[OAuth2Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every authlib client a test opened (each holds an HTTP connection pool)."""
    yield
    while _open_clients:
        _open_clients.pop().close()


def oauth_client(rp: Rp, metadata: dict[str, Any], scope: str = SCOPE) -> OAuth2Client:
    """An authlib client authenticating the way ``rp`` is registered."""
    client = OAuth2Client(
        rp.client_id,
        rp.secret,
        token_endpoint_auth_method=rp.auth_method,
        scope=scope,
        redirect_uri=rp.redirect_uri,
        code_challenge_method="S256",
    )
    if rp.auth_method == "private_key_jwt":
        client.register_client_auth_method(PrivateKeyJWT(metadata["token_endpoint"]))
    _open_clients.append(client)
    return client


def authorize(context: BrowserContext, url: str, redirect_uri: str, login: str, password: str) -> str:
    """Open the authorization URL, sign in on the IdP's form and return the callback URL it lands on."""
    page = context.new_page()
    try:
        page.goto(url)
        if not page.url.startswith(redirect_uri):  # an existing IdP session skips the form
            page.fill('input[name="login"]', login)
            page.fill('input[name="password"]', password)
            page.click("#submit")
            page.wait_for_url(f"{redirect_uri}?**")
        return page.url
    finally:
        page.close()


@dataclass
class SignIn:
    """The result of one browser sign-in and code exchange."""

    client: OAuth2Client
    token: dict[str, Any]
    nonce: str


def sign_in(
    browser: Browser,
    rp: Rp,
    metadata: dict[str, Any],
    login: str,
    password: str,
    *,
    context: BrowserContext | None = None,
    scope: str = SCOPE,
    **params: str,
) -> SignIn:
    """Authorization code flow with PKCE: the login form in Chromium, then the code exchange."""
    client = oauth_client(rp, metadata, scope)
    verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    url, state = client.create_authorization_url(
        metadata["authorization_endpoint"], code_verifier=verifier, nonce=nonce, **params
    )
    if context is None:
        with browser.new_context() as own:
            callback = authorize(own, url, rp.redirect_uri, login, password)
    else:
        callback = authorize(context, url, rp.redirect_uri, login, password)
    token = client.fetch_token(
        metadata["token_endpoint"], authorization_response=callback, state=state, code_verifier=verifier
    )
    return SignIn(client, dict(token), nonce)


def login_error(browser: Browser, rp: Rp, metadata: dict[str, Any], login: str, password: str) -> str:
    """Submit the login form and return the error it shows (the browser stays at the IdP)."""
    client = oauth_client(rp, metadata)
    url, _ = client.create_authorization_url(
        metadata["authorization_endpoint"], code_verifier=secrets.token_urlsafe(48), nonce="n"
    )
    with browser.new_context() as context:
        page = context.new_page()
        page.goto(url)
        page.fill('input[name="login"]', login)
        page.fill('input[name="password"]', password)
        page.click("#submit")
        page.wait_for_selector("#error")
        assert page.url.startswith(metadata["issuer"])
        return page.inner_text("#error")


def verify(token: str, metadata: dict[str, Any], audience: str, algorithms: list[str]) -> dict[str, Any]:
    """Verify a JWT from the IdP against its published JWKS."""
    jwks = jwt.PyJWKSet.from_dict(httpx.get(metadata["jwks_uri"]).json())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=algorithms, audience=audience, issuer=metadata["issuer"]
    )
    return claims


# --- Tests --------------------------------------------------------------------------------------


def test_discovery(idp: TestIdp, discovery: dict[str, Any]) -> None:
    """Discovery names the issuer, PKCE S256, refresh tokens, back-channel logout and RS256+ES256 keys."""
    assert discovery["issuer"] == idp.issuer
    assert discovery["code_challenge_methods_supported"] == ["S256"]
    assert {"authorization_code", "refresh_token"} <= set(discovery["grant_types_supported"])
    assert discovery["backchannel_logout_supported"] is True
    assert discovery["backchannel_logout_session_supported"] is True
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt"} <= set(
        discovery["token_endpoint_auth_methods_supported"]
    )
    assert {"revocation_endpoint", "userinfo_endpoint", "jwks_uri", "end_session_endpoint"} <= set(discovery)
    assert {"email", "groups", "offline_access"} <= set(discovery["scopes_supported"])
    keys = httpx.get(discovery["jwks_uri"]).json()["keys"]
    assert {key["alg"] for key in keys} == {"RS256", "ES256"}
    assert all("d" not in key for key in keys)
    assert httpx.get(f"{idp.issuer}/_test/health").json() == {"ok": True, "issuer": idp.issuer}


@pytest.mark.parametrize("client_id", ["rp-basic", "rp-post", "rp-jwt"])
def test_code_flow_with_pkce_then_refresh(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp], client_id: str
) -> None:
    """The login form in Chromium yields a code whose exchange and refresh give full ID tokens."""
    rp = rps[client_id]
    result = sign_in(browser, rp, discovery, "alice", "alice-password")
    token = result.token
    assert token["token_type"].lower() == "bearer"
    assert token["access_token"] and token["refresh_token"]
    assert set(token["scope"].split()) == set(SCOPE.split())
    claims = verify(token["id_token"], discovery, rp.client_id, [rp.id_token_alg])
    assert jwt.get_unverified_header(token["id_token"])["alg"] == rp.id_token_alg
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["groups"] == ["engineering", "claude-users"]
    assert claims["nonce"] == result.nonce
    assert claims["sid"]

    refreshed = result.client.refresh_token(discovery["token_endpoint"], refresh_token=token["refresh_token"])
    assert refreshed["access_token"] != token["access_token"]
    assert refreshed["refresh_token"] != token["refresh_token"]  # rotated on every use
    again = verify(refreshed["id_token"], discovery, rp.client_id, [rp.id_token_alg])
    assert (again["sub"], again["sid"], again["groups"]) == ("alice", claims["sid"], claims["groups"])

    userinfo = result.client.get(discovery["userinfo_endpoint"]).json()
    assert userinfo == {
        "sub": "alice",
        "email": "alice@example.com",
        "email_verified": True,
        "groups": ["engineering", "claude-users"],
    }


def test_offline_access_without_prompt_consent(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp]
) -> None:
    """offline_access needs no ``prompt=consent`` (as at company IdPs); refresh tokens come regardless."""
    with_offline = sign_in(browser, rps["rp-post"], discovery, "alice", "alice-password", prompt="login")
    assert "offline_access" in with_offline.token["scope"].split()
    without = sign_in(browser, rps["rp-basic"], discovery, "alice", "alice-password", scope="openid email")
    assert without.token["scope"] == "openid email"
    assert without.client.refresh_token(discovery["token_endpoint"])["id_token"]


def test_login_by_email_reports_unverified_email(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp]
) -> None:
    """Signing in by email (any case) works and the ID token says ``email_verified: false``."""
    rp = rps["rp-basic"]
    result = sign_in(browser, rp, discovery, "bob@example.COM", "bob-password")
    claims = verify(result.token["id_token"], discovery, rp.client_id, ["RS256"])
    assert (claims["sub"], claims["email"], claims["email_verified"]) == ("bob", "Bob@Example.com", False)


def test_wrong_password_stays_on_the_form(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp]
) -> None:
    """A wrong password re-renders the login form with an error instead of redirecting."""
    error = login_error(browser, rps["rp-basic"], discovery, "alice", "not-the-password")
    assert "Invalid username or password" in error


def test_code_exchange_needs_the_right_verifier(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp]
) -> None:
    """A code exchanged with another PKCE verifier is refused with invalid_grant."""
    rp = rps["rp-basic"]
    client = oauth_client(rp, discovery)
    url, state = client.create_authorization_url(
        discovery["authorization_endpoint"], code_verifier=secrets.token_urlsafe(48), nonce="n"
    )
    with browser.new_context() as context:
        callback = authorize(context, url, rp.redirect_uri, "alice", "alice-password")
    with pytest.raises(OAuthError) as refused:
        client.fetch_token(
            discovery["token_endpoint"],
            authorization_response=callback,
            state=state,
            code_verifier=secrets.token_urlsafe(48),
        )
    assert refused.value.error == "invalid_grant"


def test_pkce_is_required(idp: TestIdp, discovery: dict[str, Any], rps: dict[str, Rp]) -> None:
    """An authorization request without a code_challenge is refused with invalid_request."""
    rp = rps["rp-basic"]
    params = {
        "client_id": rp.client_id,
        "response_type": "code",
        "scope": "openid",
        "redirect_uri": rp.redirect_uri,
    }
    response = httpx.get(discovery["authorization_endpoint"], params=params)
    assert response.status_code == 303
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["error"] == ["invalid_request"]
    assert "PKCE" in query["error_description"][0]


def test_disabled_account_cannot_refresh(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp]
) -> None:
    """After ``disable`` the account's refresh fails with invalid_grant; other accounts are unaffected."""
    alice = sign_in(browser, rps["rp-basic"], discovery, "alice", "alice-password")
    bob = sign_in(browser, rps["rp-jwt"], discovery, "bob", "bob-password")
    idp.disable("alice")
    with pytest.raises(OAuthError) as refused:
        alice.client.refresh_token(discovery["token_endpoint"], refresh_token=alice.token["refresh_token"])
    assert refused.value.error == "invalid_grant"
    assert bob.client.refresh_token(discovery["token_endpoint"], refresh_token=bob.token["refresh_token"])

    # Disabled accounts cannot sign in again either, until enabled.
    assert "disabled" in login_error(browser, rps["rp-basic"], discovery, "alice", "alice-password")
    idp.enable("alice")
    assert sign_in(browser, rps["rp-basic"], discovery, "alice", "alice-password").token["refresh_token"]


def test_group_change_shows_at_next_refresh(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp]
) -> None:
    """After ``set_groups`` the next refresh's ID token and userinfo carry the new groups."""
    rp = rps["rp-post"]
    result = sign_in(browser, rp, discovery, "alice", "alice-password")
    idp.set_groups("alice", ["ops"])
    refreshed = result.client.refresh_token(
        discovery["token_endpoint"], refresh_token=result.token["refresh_token"]
    )
    assert verify(refreshed["id_token"], discovery, rp.client_id, ["ES256"])["groups"] == ["ops"]
    assert result.client.get(discovery["userinfo_endpoint"]).json()["groups"] == ["ops"]


def test_backchannel_logout(
    idp: TestIdp, discovery: dict[str, Any], browser: Browser, rps: dict[str, Rp], receiver: Receiver
) -> None:
    """``backchannel_logout`` POSTs a valid logout token to every RP of the session, then refresh fails."""
    with browser.new_context() as context:  # one IdP session, single sign-on into two RPs
        first = sign_in(browser, rps["rp-basic"], discovery, "alice", "alice-password", context=context)
        second = sign_in(browser, rps["rp-jwt"], discovery, "", "", context=context)
    sids = {
        rp: verify(r.token["id_token"], discovery, rp, ["RS256"])["sid"]
        for rp, r in (("rp-basic", first), ("rp-jwt", second))
    }
    before = int(time.time())

    assert idp.backchannel_logout("alice") == [200, 200]

    assert set(receiver.logout_tokens) == {"rp-basic", "rp-jwt"}
    for rp, tokens in receiver.logout_tokens.items():
        assert len(tokens) == 1
        header = jwt.get_unverified_header(tokens[0])
        assert (header["alg"], header["typ"]) == ("RS256", "logout+jwt")
        claims = verify(tokens[0], discovery, rp, ["RS256"])
        assert claims["events"] == {LOGOUT_EVENT: {}}
        assert claims["sid"] == sids[rp]
        assert claims["sub"] == "alice"
        assert "nonce" not in claims
        assert claims["jti"]
        assert before - 5 <= claims["iat"] <= time.time() + 5

    # A logout token from someone else's key does not verify against the IdP's JWKS.
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {**claims, "iat": int(time.time())}, foreign, algorithm="RS256", headers={"kid": header["kid"]}
    )
    with pytest.raises(jwt.InvalidSignatureError):
        verify(forged, discovery, rp, ["RS256"])

    # The sessions' grants are gone: the RPs' refresh tokens no longer work.
    with pytest.raises(OAuthError) as refused:
        first.client.refresh_token(discovery["token_endpoint"], refresh_token=first.token["refresh_token"])
    assert refused.value.error == "invalid_grant"
