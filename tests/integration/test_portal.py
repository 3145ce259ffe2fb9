"""The portal against real PostgreSQL: Claude Code's sign-in protocol, the browser pages and revocation.

The portal app runs on port 0 (aiohttp's TestServer) and the browser is plain HTTP with a cookie
jar. The IdP is a stub typed against the portal's IdentityProvider protocol; the real-IdP browser
tests live with the end-to-end suite.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from authz.configtypes import GatewayConfig, Oidc, Portal, Sessions, Store
from authz.errors import StoreError
from authz.signin import admission
from authz.signin.backchannel import BackchannelLogouts, write_logout
from authz.signin.oidc import (
    AuthorizationStart,
    IdpRefused,
    IdpUnavailable,
    OidcError,
    TokenSet,
    check_response_issuer,
)
from authz.signin.portal import IdentityProvider, PortalDeps, build_portal
from authz.signin.portal.device import USER_CODE_ALPHABET, secret_hash
from authz.signin.portal.http import origin_of
from authz.signin.revocation import RevocationSet, RevocationWatcher
from authz.signin.secretbox import generate_key
from authz.signin.tokens import KeySet, TokenVerifier, generate_signing_key
from authz.store import sessions as store
from authz.store.db import Pool, connect, connect_pool
from authz.store.embedded import EmbeddedPostgres
from authz.store.logout_spool import LogoutSpool, SpooledLogout, new_entry_id
from authz.store.migrate import migrate

pytestmark = pytest.mark.integration

PUBLIC = "http://gateway.test:8080"
ISSUER = "https://gateway.test"
IDP = "https://idp.example"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
UA = "claude-cli/2.1.0 (external, cli)"
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome"
# Browser.post's default Origin: the portal's own (that of its public URL).
OUR_ORIGIN = "<the portal's origin>"

ADA = {
    "sub": "00u-ada",
    "email": "ada@example.com",
    "email_verified": True,
    "groups": ["eng"],
    "sid": "idp-s1",
}


# --- the stub IdP -------------------------------------------------------------------------------


@dataclass
class StubIdp:
    """An in-memory OpenID Provider: codes bound to state's nonce and PKCE verifier, single use."""

    domains: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    refresh_mode: str = "ok"
    discovered: bool = False
    directory: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    codes: dict[str, tuple[dict[str, Any], str, str, str]] = field(default_factory=dict)
    used_codes: set[str] = field(default_factory=set)
    id_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    logout_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    refresh_calls: int = 0
    # Whether the metadata says authorization_response_iss_parameter_supported (RFC 9207 §3).
    iss_supported: bool = False

    async def discover(self) -> None:
        self.discovered = True

    def start_authorization(self, redirect_uri: str) -> AuthorizationStart:
        if not self.discovered:
            raise OidcError("not_discovered")
        state, nonce, verifier = (secrets.token_urlsafe(16) for _ in range(3))
        self.pending[state] = (nonce, verifier, redirect_uri)
        query = f"client_id=gw&response_type=code&state={state}&redirect_uri={quote(redirect_uri)}"
        url = f"{IDP}/authorize?{query}"
        return AuthorizationStart(url=url, state=state, nonce=nonce, code_verifier=verifier)

    def login(self, state: str, claims: dict[str, Any], *, nonce: str | None = None) -> str:
        """The user signs in at the IdP for ``state``: returns the authorization code."""
        real_nonce, verifier, redirect_uri = self.pending[state]
        self.directory[claims["sub"]] = dict(claims)
        code = secrets.token_urlsafe(16)
        self.codes[code] = (dict(claims), nonce or real_nonce, verifier, redirect_uri)
        return code

    def _id_token(self, claims: dict[str, Any], nonce: str | None) -> str:
        token = "idt." + secrets.token_urlsafe(8)
        self.id_tokens[token] = {**claims, **({"nonce": nonce} if nonce else {})}
        return token

    async def check_authorization_response_issuer(self, iss: str | None) -> None:
        check_response_issuer(iss, issuer=IDP, required=self.iss_supported)

    async def exchange_code(self, code: str, redirect_uri: str, code_verifier: str) -> TokenSet:
        if code in self.used_codes or code not in self.codes:
            raise IdpRefused("invalid_grant")
        claims, nonce, verifier, registered = self.codes[code]
        if code_verifier != verifier or redirect_uri != registered:
            raise IdpRefused("invalid_grant")
        self.used_codes.add(code)
        refresh = "idp-rt." + secrets.token_urlsafe(8)
        self.refresh_tokens[refresh] = claims["sub"]
        return TokenSet(self._id_token(claims, nonce), "idp-at", refresh, 300)

    def validate_id_token(
        self, id_token: str, *, nonce: str | None, expected_sub: str | None = None
    ) -> dict[str, Any]:
        claims = self.id_tokens.get(id_token)
        if claims is None:
            raise OidcError("bad_signature")
        if nonce is not None and claims.get("nonce") != nonce:
            raise OidcError("nonce_mismatch")
        if expected_sub is not None and claims["sub"] != expected_sub:
            raise OidcError("sub_mismatch")
        return dict(claims)

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        raise AssertionError("use_userinfo is off in these tests")

    async def refresh(self, refresh_token: str) -> TokenSet:
        self.refresh_calls += 1
        if self.refresh_mode == "unavailable":
            raise IdpUnavailable("idp_timeout")
        sub = self.refresh_tokens.pop(refresh_token, None)
        if self.refresh_mode == "refused" or sub is None:
            raise IdpRefused("invalid_grant")
        new = "idp-rt." + secrets.token_urlsafe(8)
        self.refresh_tokens[new] = sub
        return TokenSet(self._id_token(self.directory[sub], None), "idp-at", new, 300)

    async def ensure_signing_key(self, token: str) -> None:
        return None

    def validate_logout_token(self, token: str) -> dict[str, Any]:
        claims = self.logout_tokens.get(token)
        if claims is None:
            raise OidcError("logout_bad_signature")
        return dict(claims)

    def identity(self, claims: Any, userinfo: Any) -> admission.IdpIdentity:
        return admission.extract_identity(
            claims, userinfo, groups_claim="groups", email_claim="email", issuer=IDP
        )

    def admit(self, identity: admission.IdpIdentity) -> str | None:
        return admission.admit(identity, allowed_email_domains=self.domains, allowed_groups=self.groups)


# --- fixtures -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Portal_:
    server: TestServer
    pool: Pool
    idp: StubIdp
    clock: Clock
    config: GatewayConfig
    keyset: KeySet
    logouts: BackchannelLogouts
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    def browser(self, ip: str = "198.51.100.7", *, tls: bool = False) -> Browser:
        """A browser with a cookie jar; with ``tls`` it behaves as if it reached the portal over
        https (it sends Secure cookies), as a real browser behind an https public URL does."""
        secure = [self.url("/")] if tls else None
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=secure))
        self.sessions.append(http)
        return Browser(self, http, ip)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def post(self, path: str, data: dict[str, str], **headers: str) -> aiohttp.ClientResponse:
        http = aiohttp.ClientSession()
        self.sessions.append(http)
        response = await http.post(
            self.url(path), data=data, headers={"User-Agent": UA, **headers}, allow_redirects=False
        )
        await response.read()
        return response

    async def authorize(self, **extra: str) -> dict[str, Any]:
        response = await self.post("/oauth/device_authorization", {"surface": "claude_code", **extra})
        assert response.status == 200, await response.text()
        return dict(await response.json())

    async def poll(self, device_code: str) -> tuple[int, dict[str, Any]]:
        response = await self.post("/oauth/token", {"grant_type": DEVICE_GRANT, "device_code": device_code})
        return response.status, dict(await response.json())

    async def refresh(self, refresh_token: str) -> tuple[int, dict[str, Any]]:
        response = await self.post(
            "/oauth/token", {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )
        return response.status, dict(await response.json())

    async def audits(self, kind: str | None = None) -> list[store.AuditEvent]:
        return await store.recent_audit(self.pool, 200, kind)

    async def reasons(self, kind: str) -> list[str | None]:
        return [e.reason for e in await self.audits(kind)]

    def verify(self, access_token: str) -> Any:
        verifier = TokenVerifier(self.keyset, issuer=ISSUER, audience="claude-gateway", clock_skew=30)
        return verifier.verify(access_token, self.clock().timestamp())


@dataclass
class Browser:
    portal: Portal_
    http: aiohttp.ClientSession
    ip: str

    def headers(self, origin: str | None = OUR_ORIGIN) -> dict[str, str]:
        headers = {"User-Agent": BROWSER_UA, "X-Forwarded-For": f"203.0.113.1, {self.ip}"}
        if origin == OUR_ORIGIN:
            origin = origin_of(self.portal.config.portal.public_url)
        if origin is not None:
            headers["Origin"] = origin
        return headers

    async def get(self, path: str) -> tuple[aiohttp.ClientResponse, str]:
        response = await self.http.get(
            self.portal.url(path), headers=self.headers(None), allow_redirects=False
        )
        return response, await response.text()

    async def post(
        self, path: str, data: dict[str, str], origin: str | None = OUR_ORIGIN, **extra: str
    ) -> tuple[aiohttp.ClientResponse, str]:
        response = await self.http.post(
            self.portal.url(path), data=data, headers={**self.headers(origin), **extra}, allow_redirects=False
        )
        return response, await response.text()

    def cookie_header(self) -> str:
        """The cookies this browser holds for the portal, as a Cookie header value."""
        jar = self.http.cookie_jar.filter_cookies(URL(self.portal.url("/")))
        return "; ".join(f"{name}={morsel.value}" for name, morsel in sorted(jar.items()))

    def plant(self, **cookies: str) -> None:
        """Put cookies in this browser's jar, as an attacker controlling a sibling host could."""
        self.http.cookie_jar.update_cookies(cookies, URL(self.portal.url("/")))

    async def csrf(self, path: str = "/device") -> str:
        response, text = await self.get(path)
        assert response.status == 200, text
        match = re.search(r'name="csrf" value="([^"]+)"', text)
        assert match
        return match.group(1)

    async def enter_code(self, user_code: str, **extra: str) -> tuple[aiohttp.ClientResponse, str]:
        csrf = await self.csrf(f"/device?user_code={user_code}")
        return await self.post("/device", {"user_code": user_code, "csrf": csrf, **extra})

    async def start(self, user_code: str) -> str:
        """Enter the code and follow nothing: return the state sent to the IdP."""
        response, text = await self.enter_code(user_code)
        assert response.status == 303, text
        return parse_qs(urlsplit(response.headers["Location"]).query)["state"][0]

    async def callback(self, query: str) -> tuple[aiohttp.ClientResponse, str]:
        return await self.get(f"/oauth/callback?{query}")

    async def sign_in(self, user_code: str, claims: dict[str, Any] = ADA) -> tuple[str, str]:
        """Enter the code, sign in at the IdP and reach the approval page: (approval_id, csrf)."""
        state = await self.start(user_code)
        code = self.portal.idp.login(state, claims)
        response, text = await self.callback(f"code={code}&state={state}")
        assert response.status == 200, text
        approval = re.search(r'name="approval_id" value="([^"]+)"', text)
        csrf = re.search(r'name="csrf" value="([^"]+)"', text)
        assert approval and csrf
        return approval.group(1), csrf.group(1)

    async def decide(self, approval_id: str, csrf: str, decision: str = "approve") -> tuple[int, str]:
        response, text = await self.post(
            "/device/approve", {"approval_id": approval_id, "csrf": csrf, "decision": decision}
        )
        return response.status, text


PortalFactory = Callable[..., Awaitable[Portal_]]


def csrf_in(page: str) -> str | None:
    """The CSRF token a page's form carries."""
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    return match.group(1) if match else None


def _config(
    dsn: str,
    *,
    oidc: bool = True,
    grace: int = 0,
    public: str = PUBLIC,
    spool: Path | None = None,
    notice: str | None = None,
) -> GatewayConfig:
    return GatewayConfig(
        sessions=Sessions(
            issuer=ISSUER,
            signing_key=generate_signing_key("k1"),
            encryption_key=generate_key(),
        ),
        oidc=Oidc(issuer=IDP, client_id="gw", client_secret="s3cret", refresh_grace=grace) if oidc else None,
        portal=Portal(public_url=public, user_code_attempts_per_minute=5, login_notice=notice),
        store=Store(url=dsn, spool_dir=str(spool or ""), replay_interval=0.2, connect_timeout=2.0),
    )


def _logouts(config: GatewayConfig, clock: Callable[[], datetime]) -> BackchannelLogouts:
    """The journal the portal accepts back-channel logouts into, as a worker builds it."""
    return BackchannelLogouts(
        LogoutSpool(Path(config.store.spool_dir) / "logouts"),
        RevocationSet(),
        dsn=config.store.url,
        hold=config.sessions.access_token_ttl + config.sessions.clock_skew,
        replay_interval=config.store.replay_interval,
        connect_timeout=config.store.connect_timeout,
        scan_interval=0.05,
        clock=lambda: clock().timestamp(),
    )


async def _serve(config: GatewayConfig, pool: Pool, stub: StubIdp | None, clock: Clock) -> Portal_:
    keyset = KeySet.from_config(config.sessions)
    logouts = _logouts(config, clock)
    provider: IdentityProvider | None = stub
    deps = PortalDeps(config=config, pool=pool, keyset=keyset, oidc=provider, clock=clock, logouts=logouts)
    server = TestServer(build_portal(deps), port=0)
    await server.start_server()
    return Portal_(server, pool, stub or StubIdp(), clock, config, keyset, logouts)


async def _close(portal: Portal_) -> None:
    for http in portal.sessions:
        await http.close()
    await portal.server.close()
    await portal.logouts.aclose()


@pytest.fixture
async def make_portal(clean_db: str, tmp_path: Path) -> AsyncIterator[PortalFactory]:
    conn = await connect(clean_db, timeout=10)
    try:
        await migrate(conn)
        await conn.execute(
            "TRUNCATE sessions, refresh_tokens, device_codes, auth_requests, audit_events, logout_jtis"
            " CASCADE"
        )
    finally:
        await conn.close()
    pool = await connect_pool(clean_db, timeout=10)
    made: list[Portal_] = []

    async def factory(
        *,
        oidc: bool = True,
        grace: int = 0,
        idp: StubIdp | None = None,
        public: str = PUBLIC,
        notice: str | None = None,
    ) -> Portal_:
        spool = tmp_path / f"spool-{len(made)}"
        config = _config(clean_db, oidc=oidc, grace=grace, public=public, spool=spool, notice=notice)
        portal = await _serve(config, pool, (idp or StubIdp()) if oidc else None, Clock())
        made.append(portal)
        return portal

    yield factory
    for portal in made:
        await _close(portal)
    await pool.close()


@pytest.fixture
async def portal(make_portal: PortalFactory) -> Portal_:
    return await make_portal()


async def signed_in(portal: Portal_, claims: dict[str, Any] = ADA) -> dict[str, Any]:
    """Run the whole device flow; return the token response."""
    grant = await portal.authorize()
    browser = portal.browser()
    approval_id, csrf = await browser.sign_in(grant["user_code"], claims)
    status, text = await browser.decide(approval_id, csrf)
    assert status == 200, text
    status, body = await portal.poll(grant["device_code"])
    assert status == 200, body
    return body


# --- discovery ----------------------------------------------------------------------------------


async def test_discovery_document(portal: Portal_) -> None:
    """RFC 8414 metadata names our issuer and endpoints under the public URL."""
    async with aiohttp.ClientSession() as http:
        response = await http.get(portal.url("/.well-known/oauth-authorization-server"))
        body = await response.json()
        jwks = await (await http.get(portal.url("/.well-known/jwks.json"))).json()
    assert response.status == 200
    assert body == {
        "issuer": ISSUER,
        "device_authorization_endpoint": f"{PUBLIC}/oauth/device_authorization",
        "token_endpoint": f"{PUBLIC}/oauth/token",
        "revocation_endpoint": f"{PUBLIC}/oauth/revoke",
        "jwks_uri": f"{PUBLIC}/.well-known/jwks.json",
        "grant_types_supported": [DEVICE_GRANT, "refresh_token"],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
    }
    assert jwks == portal.keyset.jwks()
    assert [k["kid"] for k in jwks["keys"]] == ["k1"]


# --- device authorization -----------------------------------------------------------------------


async def test_device_authorization_shape(portal: Portal_) -> None:
    """RFC 8628 §3.2 fields; the code shapes; surface, UA and IP recorded; only the hash stored."""
    body = await portal.authorize(client_id="ignored", scope="x", unknown="y")
    assert set(body) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    assert re.fullmatch(f"[{USER_CODE_ALPHABET}]{{4}}-[{USER_CODE_ALPHABET}]{{4}}", body["user_code"])
    assert len(body["device_code"]) >= 43  # 256 bits of URL-safe base64
    assert body["verification_uri"] == f"{PUBLIC}/device"
    assert body["verification_uri_complete"] == f"{PUBLIC}/device?user_code={body['user_code']}"
    assert (body["expires_in"], body["interval"]) == (600, 5)
    row = await store.find_device_by_user_code(
        portal.pool, body["user_code"].replace("-", ""), portal.clock()
    )
    assert row is not None
    assert row.device_code_hash == secret_hash(body["device_code"])
    assert (row.surface, row.user_agent, row.status) == ("claude_code", UA, "pending")
    assert row.client_ip == "127.0.0.1"
    count = await portal.pool.fetchval(
        "SELECT count(*) FROM device_codes WHERE device_code_hash = $1", body["device_code"].encode()
    )
    assert count == 0


async def test_device_authorization_carries_the_login_notice(make_portal: PortalFactory) -> None:
    """portal.login_notice travels as `login_notice` in the device authorization response, as given;
    without it the response has no such field (test_device_authorization_shape)."""
    notice = "Authorised use only.\nSessions are recorded — see go/ai-policy."
    portal = await make_portal(notice=notice)
    body = await portal.authorize()
    assert body["login_notice"] == notice
    assert body["verification_uri"] == f"{PUBLIC}/device"


async def test_device_authorization_needs_no_parameters(portal: Portal_) -> None:
    """An empty form is a valid device authorization request; responses are never cached."""
    response = await portal.post("/oauth/device_authorization", {})
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"


async def test_oauth_errors_are_json(portal: Portal_) -> None:
    """Unknown grant, missing parameters and repeated parameters get RFC 6749 §5.2 JSON errors."""
    cases = [
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({"grant_type": DEVICE_GRANT}, "invalid_request"),
        ({"grant_type": "refresh_token"}, "invalid_request"),
        ({}, "invalid_request"),
    ]
    for form, error in cases:
        response = await portal.post("/oauth/token", form)
        assert response.status == 400
        assert await response.json() == {"error": error}
        assert response.headers["Cache-Control"] == "no-store"
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            portal.url("/oauth/token"),
            data="grant_type=refresh_token&refresh_token=a&refresh_token=b",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert (response.status, await response.json()) == (400, {"error": "invalid_request"})
    assert "unsupported_grant_type" in await portal.reasons("token")
    async with aiohttp.ClientSession() as http:
        response = await http.get(portal.url("/oauth/token"))
        assert (response.status, await response.json()) == (405, {"error": "invalid_request"})
        assert response.headers["Allow"] == "POST"
        response = await http.post(
            portal.url("/oauth/token"),
            data="x=" + "a" * 100_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert (response.status, await response.json()) == (413, {"error": "invalid_request"})


# --- the full browser path ------------------------------------------------------------------------


async def test_full_device_flow(portal: Portal_) -> None:
    """Page, IdP, approval, then the poll: pending before approval, tokens once, then invalid_grant."""
    grant = await portal.authorize()
    status, body = await portal.poll(grant["device_code"])
    assert (status, body) == (400, {"error": "authorization_pending"})

    browser = portal.browser()
    response, page = await browser.get(f"/device?user_code={grant['user_code'].lower()}")
    assert response.status == 200
    assert f'value="{grant["user_code"]}"' in page
    assert "<script" not in page.lower()
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "base-uri 'none'" in csp
    assert f"form-action 'self' {IDP}" in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    assert "gw_csrf" in response.cookies
    assert "samesite=strict" in response.cookies["gw_csrf"].output().lower()
    assert "httponly" in response.cookies["gw_csrf"].output().lower()

    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    response, _ = await browser.post("/device", {"user_code": grant["user_code"], "csrf": csrf.group(1)})
    assert response.status == 303
    location = response.headers["Location"]
    assert location.startswith(f"{IDP}/authorize?")
    query = parse_qs(urlsplit(location).query)
    assert query["redirect_uri"] == [f"{PUBLIC}/oauth/callback"]
    assert "samesite=lax" in response.cookies["gw_browser"].output().lower()
    state = query["state"][0]

    code = portal.idp.login(state, ADA)
    response, page = await browser.callback(f"code={code}&state={state}")
    assert response.status == 200
    text = re.sub(r"<[^>]+>", "", page)
    assert f"Approve sign-in of Claude Code as ada@example.com for code {grant['user_code']}?" in text
    approval = re.search(r'name="approval_id" value="([^"]+)"', page)
    csrf2 = re.search(r'name="csrf" value="([^"]+)"', page)
    assert approval and csrf2

    # Still pending until the user presses Approve.
    portal.clock.advance(5)
    assert (await portal.poll(grant["device_code"]))[1] == {"error": "authorization_pending"}

    status, page = await browser.decide(approval.group(1), csrf2.group(1))
    assert status == 200
    assert "You can close this window" in page

    status, tokens = await portal.poll(grant["device_code"])
    assert status == 200
    assert set(tokens) == {"access_token", "token_type", "expires_in", "refresh_token", "email"}
    assert (tokens["token_type"], tokens["expires_in"], tokens["email"]) == ("Bearer", 900, "ada@example.com")
    claims = portal.verify(tokens["access_token"])
    assert (claims.sub, claims.email, claims.groups) == ("00u-ada", "ada@example.com", ("eng",))
    session = await store.get_session(portal.pool, claims.sid)
    assert session is not None and session.is_active(portal.clock())
    assert (session.idp_sid, session.surface, session.user_agent) == ("idp-s1", "claude_code", UA)
    assert session.idp_refresh_token_enc is not None
    assert b"idp-rt." not in session.idp_refresh_token_enc
    stored = await portal.pool.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE session_id = $1", claims.sid
    )
    assert stored == 1

    # The device code is single use.
    assert await portal.poll(grant["device_code"]) == (400, {"error": "invalid_grant"})
    reasons = await portal.reasons("token")
    assert None in reasons and "invalid_grant" in reasons
    ok = [e for e in await portal.audits("approval") if e.outcome == "ok"]
    assert ok and ok[0].user_agent == BROWSER_UA and ok[0].client_ip == browser.ip


async def test_slow_down(portal: Portal_) -> None:
    """Polling faster than the interval is answered slow_down (RFC 8628 §3.5)."""
    grant = await portal.authorize()
    assert (await portal.poll(grant["device_code"]))[1] == {"error": "authorization_pending"}
    portal.clock.advance(1)
    assert await portal.poll(grant["device_code"]) == (400, {"error": "slow_down"})
    assert "slow_down" in await portal.reasons("token")


async def test_expired_code(portal: Portal_) -> None:
    """After expires_in the poll says expired_token and the page refuses the code."""
    grant = await portal.authorize()
    portal.clock.advance(601)
    assert await portal.poll(grant["device_code"]) == (400, {"error": "expired_token"})
    response, page = await portal.browser().enter_code(grant["user_code"])
    assert response.status == 400
    assert "unknown, expired or already used" in page
    assert "unknown_code" in await portal.reasons("device_verify")


async def test_denied_by_user(portal: Portal_) -> None:
    """Deny on the approval page makes the poll answer access_denied."""
    grant = await portal.authorize()
    browser = portal.browser()
    approval_id, csrf = await browser.sign_in(grant["user_code"])
    status, page = await browser.decide(approval_id, csrf, "deny")
    assert status == 200 and "denied" in page
    assert await portal.poll(grant["device_code"]) == (400, {"error": "access_denied"})
    assert await portal.pool.fetchval("SELECT count(*) FROM sessions") == 0
    assert "user_denied" in await portal.reasons("approval")


async def test_idp_access_denied(portal: Portal_) -> None:
    """error=access_denied from the IdP denies the device code."""
    grant = await portal.authorize()
    browser = portal.browser()
    state = await browser.start(grant["user_code"])
    response, _ = await browser.callback(f"error=access_denied&state={state}")
    assert response.status == 403
    assert await portal.poll(grant["device_code"]) == (400, {"error": "access_denied"})
    assert "idp_access_denied" in await portal.reasons("callback")


async def test_unknown_device_code(portal: Portal_) -> None:
    """A device code we never issued is invalid_grant."""
    assert await portal.poll("not-a-code") == (400, {"error": "invalid_grant"})


# --- CSRF and origin checks -----------------------------------------------------------------------


async def test_post_without_or_with_foreign_origin_is_refused(portal: Portal_) -> None:
    """The code form and the approval only accept POSTs from our own origin with the CSRF token."""
    grant = await portal.authorize()
    browser = portal.browser()
    csrf = await browser.csrf()
    form = {"user_code": grant["user_code"], "csrf": csrf}
    for origin in (None, "https://evil.example", "null"):
        response, _ = await browser.post("/device", form, origin=origin)
        assert response.status == 403
    # Referer stands in for a missing Origin.
    response, _ = await browser.post("/device", form, origin=None, Referer=f"{PUBLIC}/device")
    assert response.status == 303
    response, _ = await browser.post("/device", {**form, "csrf": "x" * 43})
    assert response.status == 403
    response, _ = await portal.browser().post("/device", form)  # no gw_csrf cookie at all
    assert response.status == 403
    reasons = await portal.reasons("device_verify")
    assert reasons.count("cross_origin") == 3 and reasons.count("csrf_mismatch") == 2

    approval_id, csrf2 = await browser.sign_in(grant["user_code"])
    response, _ = await browser.post(
        "/device/approve", {"approval_id": approval_id, "csrf": csrf2, "decision": "approve"}, origin=IDP
    )
    assert response.status == 403
    assert "cross_origin" in await portal.reasons("approval")
    assert (await portal.poll(grant["device_code"]))[1] == {"error": "authorization_pending"}


# --- state binding ------------------------------------------------------------------------------


async def test_state_mismatch_and_reuse(portal: Portal_) -> None:
    """A callback in another browser, or a second time, is refused and audited; nothing happens."""
    grant = await portal.authorize()
    alice, mallory = portal.browser(), portal.browser("192.0.2.66")
    state = await alice.start(grant["user_code"])
    code = portal.idp.login(state, ADA)

    response, _ = await mallory.callback(f"code={code}&state={state}")
    assert response.status == 400
    assert code not in portal.idp.used_codes

    response, page = await alice.callback(f"code={code}&state={state}")
    assert response.status == 200 and "Approve sign-in" in page
    response, _ = await alice.callback(f"code={code}&state={state}")
    assert response.status == 400

    response, _ = await alice.callback(f"code={code}&state=unknown")
    assert response.status == 400
    reasons = await portal.reasons("callback")
    assert {"state_mismatch", "state_reused", "state_unknown"} <= set(reasons)


async def test_approval_bound_to_browser(portal: Portal_) -> None:
    """The approval id only works in the browser that signed in, and only once: the approval ends
    the sign-in's cookies, and sending the old ones again finds the approval used."""
    grant = await portal.authorize()
    alice = portal.browser()
    approval_id, csrf = await alice.sign_in(grant["user_code"])
    mallory = portal.browser("192.0.2.66")
    mallory_csrf = await mallory.csrf()
    status, _ = await mallory.decide(approval_id, mallory_csrf)
    assert status == 400
    old = alice.cookie_header()
    assert (await alice.decide(approval_id, csrf))[0] == 200
    assert alice.cookie_header() == ""
    response, _ = await alice.post(
        "/device/approve", {"approval_id": approval_id, "csrf": csrf, "decision": "approve"}, Cookie=old
    )
    assert response.status == 400
    assert {"approval_mismatch", "approval_reused"} <= set(await portal.reasons("approval"))


async def test_code_replay_and_nonce_mismatch(portal: Portal_) -> None:
    """A replayed authorization code and an ID token with another nonce are refused and audited."""
    grant = await portal.authorize()
    browser = portal.browser()
    state = await browser.start(grant["user_code"])
    code = portal.idp.login(state, ADA)
    assert (await browser.callback(f"code={code}&state={state}"))[0].status == 200

    state2 = await browser.start(grant["user_code"])
    response, _ = await browser.callback(f"code={code}&state={state2}")
    assert response.status == 400

    state3 = await browser.start(grant["user_code"])
    bad = portal.idp.login(state3, ADA, nonce="someone-elses")
    response, _ = await browser.callback(f"code={bad}&state={state3}")
    assert response.status == 400
    reasons = await portal.reasons("callback")
    assert {"code_exchange_refused", "nonce_mismatch"} <= set(reasons)


# --- cookies and the callback's issuer ----------------------------------------------------------


def set_cookies(response: aiohttp.ClientResponse) -> dict[str, str]:
    """name -> value of the cookies a response sets (an expired one as "")."""
    cookies = response.cookies.items()
    return {name: ("" if morsel["max-age"] == "0" else morsel.value) for name, morsel in cookies}


async def test_planted_cookies_are_never_used_and_every_step_mints_new_ones(portal: Portal_) -> None:
    """Cookie values the server did not mint are ignored, never set back: the form page, the code
    entry and the callback each mint fresh ones, the approval ends them; a planted browser value
    known to an attacker does not get them past the browser binding."""
    grant = await portal.authorize()
    alice, mallory = portal.browser(), portal.browser("192.0.2.66")
    planted_csrf, planted_browser = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    alice.plant(gw_csrf=planted_csrf, gw_browser=planted_browser)

    response, page = await alice.get(f"/device?user_code={grant['user_code']}")
    form_step = set_cookies(response)
    assert set(form_step) == {"gw_csrf"} and form_step["gw_csrf"] not in ("", planted_csrf)
    assert csrf_in(page) == form_step["gw_csrf"]

    response, _ = await alice.post("/device", {"user_code": grant["user_code"], "csrf": form_step["gw_csrf"]})
    assert response.status == 303
    entry_step = set_cookies(response)
    assert set(entry_step) == {"gw_csrf", "gw_browser"}
    assert entry_step["gw_browser"] not in ("", planted_browser)
    assert entry_step["gw_csrf"] != form_step["gw_csrf"]
    state = parse_qs(urlsplit(response.headers["Location"]).query)["state"][0]

    # The planted binding value is worth nothing to the attacker who chose it.
    code = portal.idp.login(state, ADA)
    mallory.plant(gw_browser=planted_browser)
    response, _ = await mallory.callback(f"code={code}&state={state}")
    assert response.status == 400

    response, page = await alice.callback(f"code={code}&state={state}")
    assert response.status == 200, page
    callback_step = set_cookies(response)
    assert set(callback_step) == {"gw_csrf", "gw_browser"}
    assert callback_step["gw_browser"] not in ("", entry_step["gw_browser"])
    assert callback_step["gw_csrf"] not in ("", entry_step["gw_csrf"])
    assert csrf_in(page) == callback_step["gw_csrf"]
    approval = re.search(r'name="approval_id" value="([^"]+)"', page)
    assert approval

    # The approval is bound to the new browser value: the previous one no longer takes it.
    stale = f"gw_csrf={callback_step['gw_csrf']}; gw_browser={entry_step['gw_browser']}"
    form = {"approval_id": approval.group(1), "csrf": callback_step["gw_csrf"], "decision": "approve"}
    response, _ = await mallory.post("/device/approve", form, Cookie=stale)
    assert response.status == 400
    response, _ = await alice.post("/device/approve", form)
    assert response.status == 200
    assert set_cookies(response) == {"gw_csrf": "", "gw_browser": ""}
    assert (await portal.poll(grant["device_code"]))[0] == 200
    assert await portal.reasons("callback") == [None, "state_mismatch"]
    assert await portal.reasons("approval") == [None, "approval_mismatch"]


async def test_callback_naming_another_issuer_is_refused(portal: Portal_) -> None:
    """RFC 9207: a callback whose iss is not the IdP's is refused before its code or error is acted
    on, and audited; the right iss passes; a missing iss is refused once the IdP promises it."""
    grant = await portal.authorize()
    browser = portal.browser()
    state = await browser.start(grant["user_code"])
    code = portal.idp.login(state, ADA)
    response, page = await browser.callback(f"code={code}&state={state}&iss=https%3A%2F%2Fevil.example")
    assert response.status == 400 and "did not come from your identity provider" in page
    assert code not in portal.idp.used_codes
    events = await portal.audits("callback")
    assert (events[0].outcome, events[0].reason, events[0].detail) == (
        "denied",
        "iss_mismatch",
        {"iss": "https://evil.example"},
    )
    # An error response from another issuer does not deny the user's device code either.
    state = await browser.start(grant["user_code"])
    response, _ = await browser.callback(f"error=access_denied&state={state}&iss=https://evil.example")
    assert response.status == 400
    assert await portal.poll(grant["device_code"]) == (400, {"error": "authorization_pending"})

    portal.idp.iss_supported = True
    state = await browser.start(grant["user_code"])
    code = portal.idp.login(state, ADA)
    response, _ = await browser.callback(f"code={code}&state={state}")
    assert response.status == 400
    assert (await portal.audits("callback"))[0].reason == "iss_missing"
    state = await browser.start(grant["user_code"])
    code = portal.idp.login(state, ADA)
    response, page = await browser.callback(f"code={code}&state={state}&iss={quote(IDP, safe='')}")
    assert response.status == 200 and "Approve sign-in" in page


# --- rate limiting --------------------------------------------------------------------------------


async def test_user_code_guessing_is_rate_limited(portal: Portal_) -> None:
    """After N attempts a minute from one address the page answers 429; each failure is audited."""
    browser = portal.browser("192.0.2.10")
    csrf = await browser.csrf()
    statuses = []
    for _ in range(6):
        response, page = await browser.post("/device", {"user_code": "BCDF-GHJK", "csrf": csrf})
        statuses.append(response.status)
        # Each form page carries a freshly minted token (the 429 page has no form: keep the last).
        csrf = csrf_in(page) or csrf
    assert statuses == [400, 400, 400, 400, 400, 429]
    response, page = await browser.post("/device", {"user_code": "BCDF-GHJK", "csrf": csrf})
    assert response.status == 429 and "Too many attempts" in page
    assert int(response.headers["Retry-After"]) >= 1
    # Another address is unaffected; time refills the bucket.
    other = portal.browser("192.0.2.11")
    response, _ = await other.post("/device", {"user_code": "nope", "csrf": await other.csrf()})
    assert response.status == 400
    portal.clock.advance(12)
    response, _ = await browser.post("/device", {"user_code": "BCDF-GHJK", "csrf": csrf})
    assert response.status == 400
    reasons = await portal.reasons("device_verify")
    assert reasons.count("rate_limited") == 2
    assert reasons.count("unknown_code") == 6 and reasons.count("malformed_code") == 1
    events = [e for e in await portal.audits("device_verify") if e.reason == "rate_limited"]
    assert {e.client_ip for e in events} == {"192.0.2.10"}


# --- admission ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({**ADA, "email": "eve@other.org"}, "email_domain_not_allowed"),
        ({**ADA, "groups": ["sales"]}, "group_not_allowed"),
        ({**ADA, "email_verified": False}, "email_not_verified"),
    ],
)
async def test_admission_refusal(make_portal: PortalFactory, claims: dict[str, Any], reason: str) -> None:
    """A refused identity sees why, leaves an audit row with the reason, and the device is denied."""
    portal = await make_portal(idp=StubIdp(domains=("example.com",), groups=("eng",)))
    grant = await portal.authorize()
    browser = portal.browser()
    state = await browser.start(grant["user_code"])
    code = portal.idp.login(state, claims)
    response, page = await browser.callback(f"code={code}&state={state}")
    assert response.status == 403
    assert "Access not allowed" in page
    events = [e for e in await portal.audits("callback") if e.outcome == "denied"]
    assert [e.reason for e in events] == [reason]
    assert events[0].email == claims["email"]
    assert await portal.poll(grant["device_code"]) == (400, {"error": "access_denied"})


# --- refresh --------------------------------------------------------------------------------------


async def test_refresh_rotates_and_rechecks_groups(portal: Portal_) -> None:
    """A refresh asks the IdP, picks up new groups and returns a new refresh token; reuse revokes."""
    tokens = await signed_in(portal)
    portal.idp.directory["00u-ada"]["groups"] = ["eng", "platform"]
    portal.clock.advance(60)
    status, fresh = await portal.refresh(tokens["refresh_token"])
    assert status == 200
    assert fresh["refresh_token"] != tokens["refresh_token"]
    # The refresh answer names the account too (Claude Code shows it in /status).
    assert fresh["email"] == "ada@example.com"
    claims = portal.verify(fresh["access_token"])
    assert claims.groups == ("eng", "platform")
    session = await store.get_session(portal.pool, claims.sid)
    assert session is not None and session.groups == ("eng", "platform")
    assert session.last_refresh_at == portal.clock()

    # Reuse of the spent token: invalid_grant and the whole session is revoked.
    assert await portal.refresh(tokens["refresh_token"]) == (401, {"error": "invalid_grant"})
    session = await store.get_session(portal.pool, claims.sid)
    assert session is not None and session.revoked_reason == store.REFRESH_TOKEN_REUSE
    assert await portal.refresh(fresh["refresh_token"]) == (401, {"error": "invalid_grant"})
    assert store.REFRESH_TOKEN_REUSE in await portal.reasons("refresh")


async def test_refresh_refused_by_idp_revokes(portal: Portal_) -> None:
    """A user the IdP no longer accepts gets invalid_grant and the session ends."""
    tokens = await signed_in(portal)
    portal.idp.refresh_mode = "refused"
    assert await portal.refresh(tokens["refresh_token"]) == (401, {"error": "invalid_grant"})
    sid = portal.verify(tokens["access_token"]).sid
    session = await store.get_session(portal.pool, sid)
    assert session is not None and session.revoked_reason == "idp_refused"
    assert "idp_refused" in await portal.reasons("refresh")


async def test_refresh_readmission(portal: Portal_) -> None:
    """Admission is applied again at refresh: a user moved out of the allowed groups is cut off."""
    portal.idp.groups = ("eng",)
    tokens = await signed_in(portal)
    portal.idp.directory["00u-ada"]["groups"] = ["sales"]
    assert await portal.refresh(tokens["refresh_token"]) == (401, {"error": "invalid_grant"})
    assert "group_not_allowed" in await portal.reasons("refresh")


async def test_refresh_idp_unavailable(portal: Portal_) -> None:
    """With the IdP down the answer is 503 temporarily_unavailable and the token stays usable."""
    tokens = await signed_in(portal)
    portal.idp.refresh_mode = "unavailable"
    assert await portal.refresh(tokens["refresh_token"]) == (503, {"error": "temporarily_unavailable"})
    portal.idp.refresh_mode = "ok"
    status, _ = await portal.refresh(tokens["refresh_token"])
    assert status == 200
    assert "idp_unavailable" in await portal.reasons("refresh")


async def test_refresh_grace(make_portal: PortalFactory) -> None:
    """Within oidc.refresh_grace of the last good refresh, tokens are issued while the IdP is down."""
    portal = await make_portal(grace=300)
    tokens = await signed_in(portal)
    portal.idp.refresh_mode = "unavailable"
    portal.clock.advance(200)
    status, fresh = await portal.refresh(tokens["refresh_token"])
    assert status == 200
    portal.clock.advance(200)
    assert await portal.refresh(fresh["refresh_token"]) == (503, {"error": "temporarily_unavailable"})
    assert "idp_unavailable_grace" in await portal.reasons("refresh")


async def test_refresh_of_unknown_token(portal: Portal_) -> None:
    """An unknown refresh token is invalid_grant with 401."""
    assert await portal.refresh("nope") == (401, {"error": "invalid_grant"})


# --- revocation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["access_token", "refresh_token"])
async def test_revoke(portal: Portal_, which: str) -> None:
    """RFC 7009: either token revokes the session; unknown tokens still get 200."""
    tokens = await signed_in(portal)
    response = await portal.post("/oauth/revoke", {"token": tokens[which], "token_type_hint": which})
    assert response.status == 200
    sid = portal.verify(tokens["access_token"]).sid
    session = await store.get_session(portal.pool, sid)
    assert session is not None and session.revoked_reason == "rfc7009"
    assert await portal.refresh(tokens["refresh_token"]) == (401, {"error": "invalid_grant"})
    assert (await portal.post("/oauth/revoke", {"token": "unknown"})).status == 200
    assert (await portal.post("/oauth/revoke", {})).status == 400
    events = [e for e in await portal.audits("revoke") if e.session_id == sid]
    assert events and events[0].user_agent == UA


async def test_revoke_access_token_after_expiry(portal: Portal_) -> None:
    """An expired (but genuine) access token still names its session for revocation."""
    tokens = await signed_in(portal)
    sid = portal.verify(tokens["access_token"]).sid
    portal.clock.advance(3600)
    assert (await portal.post("/oauth/revoke", {"token": tokens["access_token"]})).status == 200
    session = await store.get_session(portal.pool, sid)
    assert session is not None and session.revoked_reason == "rfc7009"


# --- back-channel logout --------------------------------------------------------------------------


async def test_backchannel_logout(portal: Portal_) -> None:
    """A valid logout token revokes the sessions of that IdP sid; its jti cannot be replayed."""
    tokens = await signed_in(portal)
    other = await signed_in(portal, {**ADA, "sid": "idp-s2"})
    now = portal.clock().timestamp()
    portal.idp.logout_tokens["lt1"] = {
        "iss": IDP,
        "aud": "gw",
        "iat": now,
        "jti": "j1",
        "sid": "idp-s1",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    }
    response = await portal.post("/oauth/backchannel-logout", {"logout_token": "lt1"})
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    first = await store.get_session(portal.pool, portal.verify(tokens["access_token"]).sid)
    second = await store.get_session(portal.pool, portal.verify(other["access_token"]).sid)
    assert first is not None and first.revoked_reason == "backchannel_logout"
    assert second is not None and second.revoked_at is None

    response = await portal.post("/oauth/backchannel-logout", {"logout_token": "lt1"})
    assert (response.status, await response.json()) == (400, {"error": "invalid_request"})
    response = await portal.post("/oauth/backchannel-logout", {"logout_token": "forged"})
    assert response.status == 400
    reasons = await portal.reasons("backchannel_logout")
    assert {"logout_jti_replay", "logout_bad_signature"} <= set(reasons)


async def test_backchannel_logout_by_sub(portal: Portal_) -> None:
    """Without a sid the logout ends every session of the sub."""
    first = await signed_in(portal)
    second = await signed_in(portal, {**ADA, "sid": "idp-s2"})
    portal.idp.logout_tokens["lt"] = {
        "iss": IDP,
        "aud": "gw",
        "iat": portal.clock().timestamp(),
        "jti": "j2",
        "sub": "00u-ada",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    }
    assert (await portal.post("/oauth/backchannel-logout", {"logout_token": "lt"})).status == 200
    for tokens in (first, second):
        session = await store.get_session(portal.pool, portal.verify(tokens["access_token"]).sid)
        assert session is not None and session.revoked_reason == "backchannel_logout"


def logout_token(portal: Portal_, name: str, jti: str, **names: str) -> str:
    """Register a logout token ``name`` with the stub IdP, naming ``sub`` and/or ``sid``."""
    portal.idp.logout_tokens[name] = {
        "iss": IDP,
        "aud": "gw",
        "iat": portal.clock().timestamp(),
        "jti": jti,
        **names,
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    }
    return name


def spooled(portal: Portal_, jti: str, **names: str) -> SpooledLogout:
    """A validated logout as the endpoint would journal it."""
    now = portal.clock().timestamp()
    return SpooledLogout(
        entry=new_entry_id(),
        issuer=IDP,
        jti=jti,
        sub=names.get("sub"),
        sid=names.get("sid"),
        accepted_at=now,
        jti_expires_at=now + 300,
    )


async def test_a_journal_entry_whose_write_committed_is_not_a_replay_of_itself(portal: Portal_) -> None:
    """An entry already in PostgreSQL whose file outlived the write is recognised as applied on
    replay (no replay refusal, the file goes); the logout token itself is still refused as a replay."""
    tokens = await signed_in(portal)
    logout = spooled(portal, "j-crash", sid="idp-s1")
    await write_logout(portal.pool, logout, now=logout.accepted_at)
    spool = LogoutSpool(Path(portal.config.store.spool_dir) / "logouts")
    assert spool.add(logout)

    assert await portal.logouts.replay() == 1
    assert spool.entries() == []
    assert "logout_jti_replay" not in await portal.reasons("backchannel_logout")
    session = await store.get_session(portal.pool, portal.verify(tokens["access_token"]).sid)
    assert session is not None and session.revoked_reason == "backchannel_logout"
    name = logout_token(portal, "lt", "j-crash", sid="idp-s1")
    response = await portal.post("/oauth/backchannel-logout", {"logout_token": name})
    assert (response.status, await response.json()) == (400, {"error": "invalid_request"})


async def test_refresh_is_refused_while_a_logout_waits_in_the_journal(portal: Portal_) -> None:
    """A session named by a journalled logout not yet written through cannot be refreshed, and is
    revoked on the spot; a later sign-in of the same subject is not affected."""
    tokens = await signed_in(portal)
    portal.clock.advance(10)
    spool = LogoutSpool(Path(portal.config.store.spool_dir) / "logouts")
    assert spool.add(spooled(portal, "j-wait", sub="00u-ada"))
    assert await portal.logouts.scan() == 1
    portal.clock.advance(10)
    later = await signed_in(portal, {**ADA, "sid": "idp-s9"})

    assert await portal.refresh(tokens["refresh_token"]) == (401, {"error": "invalid_grant"})
    session = await store.get_session(portal.pool, portal.verify(tokens["access_token"]).sid)
    assert session is not None and session.revoked_reason == "backchannel_logout"
    assert "backchannel_logout" in await portal.reasons("refresh")
    status, _ = await portal.refresh(later["refresh_token"])
    assert status == 200


async def wait_until(check: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this module's own, which the outage test stops and starts again."""
    # Outside pytest's basetemp for the reason given in conftest.pg_dsn.
    base = Path(tempfile.mkdtemp(prefix="authz-pg-"))
    server = EmbeddedPostgres()
    try:
        server.start(base / "data")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def outage_portal(own_pg: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[Portal_]:
    """A portal on the stoppable server, its journal's loops running as in a worker."""
    conn = await connect(own_pg.dsn, timeout=10)
    try:
        await migrate(conn)
        await conn.execute(
            "TRUNCATE sessions, refresh_tokens, device_codes, auth_requests, audit_events, logout_jtis"
        )
    finally:
        await conn.close()
    pool = await connect_pool(own_pg.dsn, timeout=10)
    portal = await _serve(_config(own_pg.dsn, spool=tmp_path / "spool"), pool, StubIdp(), Clock())
    await portal.logouts.start()
    try:
        yield portal
    finally:
        await _close(portal)
        await pool.close()
        try:
            await (await connect(own_pg.dsn, timeout=2)).close()
        except StoreError:
            own_pg.start_again()


async def test_backchannel_logout_while_postgres_is_down(
    outage_portal: Portal_, own_pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """With PostgreSQL stopped the logout is answered 200 and enforced at once here, by a sibling
    worker sharing the journal and by a worker started afterwards; a replica with a journal of its
    own learns it once PostgreSQL is back and the journal is written through, which revokes the
    session for good; the token replayed during or after the outage is refused."""
    portal = outage_portal
    tokens = await signed_in(portal)
    other = await signed_in(portal, {**ADA, "sid": "idp-s2"})
    claims, other_claims = portal.verify(tokens["access_token"]), portal.verify(other["access_token"])
    assert (claims.sub, claims.idp_sid) == ("00u-ada", "idp-s1")

    # A sibling worker sharing the journal, and a replica with its own journal, watching PostgreSQL.
    journal = Path(portal.config.store.spool_dir) / "logouts"
    sibling = _logouts(portal.config, portal.clock)
    await sibling.start()
    elsewhere = RevocationWatcher(RevocationSet(), timeout=2.0, keepalive_interval=0.5, backoff_max=0.5)
    assert await elsewhere.start(own_pg.dsn, resync_interval=3600)
    restarted: BackchannelLogouts | None = None
    try:
        own_pg.stop_server()
        name = logout_token(portal, "lt", "j-outage", sid="idp-s1", sub="00u-ada")
        response = await portal.post("/oauth/backchannel-logout", {"logout_token": name})
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert portal.logouts.revocations.blocks(claims)
        assert not portal.logouts.revocations.blocks(other_claims)
        await wait_until(lambda: sibling.revocations.blocks(claims))
        restarted = _logouts(portal.config, portal.clock)
        await restarted.start()
        assert restarted.revocations.blocks(claims)
        assert not elsewhere.revocations.blocks(claims)
        assert len(LogoutSpool(journal).entries()) == 1

        again = await portal.post("/oauth/backchannel-logout", {"logout_token": name})
        assert (again.status, await again.json()) == (400, {"error": "invalid_request"})
        status, _ = await portal.refresh(tokens["refresh_token"])
        assert status == 503

        own_pg.start_again()
        await wait_until(lambda: not LogoutSpool(journal).entries(), within=30)
        await wait_until(lambda: elsewhere.revocations.blocks(claims), within=10)
        assert not elsewhere.revocations.blocks(other_claims)
    finally:
        await sibling.aclose()
        await elsewhere.aclose()
        if restarted is not None:
            await restarted.aclose()

    session = await store.get_session(portal.pool, claims.sid)
    assert session is not None and session.revoked_reason == "backchannel_logout"
    other_session = await store.get_session(portal.pool, other_claims.sid)
    assert other_session is not None and other_session.revoked_at is None
    rows = [e for e in await portal.audits("backchannel_logout") if e.outcome == "ok"]
    assert len(rows) == 1 and rows[0].session_id == claims.sid
    assert rows[0].detail is not None and rows[0].detail["spooled"] is True
    assert await portal.refresh(tokens["refresh_token"]) == (401, {"error": "invalid_grant"})
    again = await portal.post("/oauth/backchannel-logout", {"logout_token": name})
    assert (again.status, await again.json()) == (400, {"error": "invalid_request"})


# --- open redirects -------------------------------------------------------------------------------


async def test_no_open_redirects(portal: Portal_) -> None:
    """next= and redirect_uri= are ignored: the only redirect ever issued goes to the IdP."""
    grant = await portal.authorize()
    browser = portal.browser()
    response, _ = await browser.get("/device?next=https://evil.example&redirect_uri=https://evil.example")
    assert response.status == 200 and "Location" not in response.headers
    response, _ = await browser.enter_code(
        grant["user_code"], next="https://evil.example", redirect_uri="https://evil.example/cb"
    )
    assert response.status == 303
    location = response.headers["Location"]
    assert location.startswith(f"{IDP}/authorize?")
    assert parse_qs(urlsplit(location).query)["redirect_uri"] == [f"{PUBLIC}/oauth/callback"]
    state = parse_qs(urlsplit(location).query)["state"][0]
    code = portal.idp.login(state, ADA)
    response, _ = await browser.callback(
        f"code={code}&state={state}&redirect_uri=https://evil.example&next=https://evil.example"
    )
    assert response.status == 200 and "Location" not in response.headers
    response, _ = await browser.callback("state=x&next=https://evil.example")
    assert response.status == 400 and "Location" not in response.headers


# --- without an oidc section ----------------------------------------------------------------------


async def test_without_oidc(make_portal: PortalFactory) -> None:
    """No IdP configured: sign-in answers temporarily_unavailable; discovery, JWKS and revoke work."""
    portal = await make_portal(oidc=False)
    response = await portal.post("/oauth/device_authorization", {"surface": "claude_code"})
    assert (response.status, await response.json()) == (503, {"error": "temporarily_unavailable"})
    response = await portal.post("/oauth/token", {"grant_type": "refresh_token", "refresh_token": "x"})
    assert response.status == 503
    assert (await portal.post("/oauth/revoke", {"token": "x"})).status == 200
    response, _ = await portal.browser().get("/device")
    assert response.status == 503
    async with aiohttp.ClientSession() as http:
        for path in ("/.well-known/oauth-authorization-server", "/.well-known/jwks.json", "/healthz"):
            assert (await http.get(portal.url(path))).status == 200


async def test_cookies_are_host_prefixed_and_secure_behind_https(make_portal: PortalFactory) -> None:
    """With an https public URL the cookies are __Host- ones (Secure, Path=/, no Domain); a plain
    gw_csrf cookie, as a sibling host or a plain-http answer could plant, is not read."""
    portal = await make_portal(public="https://gateway.test")
    browser = portal.browser()
    response, page = await browser.get("/device")
    assert "gw_csrf" not in response.cookies
    cookie = response.cookies["__Host-gw_csrf"]
    assert (cookie["secure"], cookie["path"], cookie["domain"], cookie["httponly"]) == (True, "/", "", True)
    csrf = cookie.value
    assert csrf_in(page) == csrf
    form = {"user_code": "BCDF-GHJK", "csrf": csrf}
    # This jar keeps Secure cookies off plain http; send them by hand, as a browser would over TLS.
    response, _ = await browser.post("/device", form)
    assert response.status == 403
    response, _ = await browser.post(
        "/device", form, origin="https://gateway.test:443", Cookie=f"gw_csrf={csrf}"
    )
    assert response.status == 403
    response, page = await browser.post(
        "/device", form, origin="https://gateway.test:443", Cookie=f"__Host-gw_csrf={csrf}"
    )
    assert response.status == 400 and "unknown, expired or already used" in page
    assert await portal.reasons("device_verify") == ["unknown_code", "csrf_mismatch", "csrf_mismatch"]


async def test_a_sign_in_behind_https_uses_host_prefixed_cookies_throughout(
    make_portal: PortalFactory,
) -> None:
    """Behind an https public URL every step sets only __Host- cookies, Secure, host-only on Path=/,
    and the approval expires them with the attributes the prefix needs (else a browser ignores it)."""
    portal = await make_portal(public="https://gateway.test")
    grant = await portal.authorize()
    browser = portal.browser(tls=True)
    approval_id, csrf = await browser.sign_in(grant["user_code"])
    assert browser.cookie_header().count("__Host-") == 2 and " gw_" not in f" {browser.cookie_header()}"
    response, _ = await browser.post(
        "/device/approve", {"approval_id": approval_id, "csrf": csrf, "decision": "approve"}
    )
    assert response.status == 200
    assert sorted(response.cookies) == ["__Host-gw_browser", "__Host-gw_csrf"]
    for morsel in response.cookies.values():
        assert (morsel.value, morsel["max-age"], morsel["secure"], morsel["path"], morsel["domain"]) == (
            "",
            "0",
            True,
            "/",
            "",
        )
    assert (await portal.poll(grant["device_code"]))[0] == 200


async def test_draining_fails_readyz_but_not_healthz(make_portal: PortalFactory, clean_db: str) -> None:
    """While the worker drains, /readyz answers 503 "draining" and /healthz (liveness) still 200."""
    config = _config(clean_db)
    pool = await connect_pool(clean_db, timeout=10)
    try:
        app = build_portal(
            PortalDeps(config, pool, KeySet.from_config(config.sessions), None, healthy=lambda: False)
        )
        server = TestServer(app, port=0)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                assert (await http.get(server.make_url("/healthz"))).status == 200
                ready = await http.get(server.make_url("/readyz"))
                assert ready.status == 503
                assert (await ready.json())["status"] == "draining"
        finally:
            await server.close()
    finally:
        await pool.close()
