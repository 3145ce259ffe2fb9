"""authz.signin.oidc.OidcClient against a real OpenID Provider (npm oidc-provider) and Chromium's
login form."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from playwright.async_api import async_playwright

from authz.configtypes import Oidc
from authz.signin.oidc import AuthorizationStart, IdpRefused, OidcClient, OidcError, TokenSet
from tests.idp_fixture import CHROMIUM, CHROMIUM_ARGS, TestIdp

pytestmark = pytest.mark.integration

Method = Literal["client_secret_basic", "client_secret_post", "private_key_jwt"]
METHODS: list[Method] = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
KID = "rp-jwt-1"
ACCOUNTS: dict[str, dict[str, Any]] = {
    "ada": {
        "email": "ada@example.com",
        "email_verified": True,
        "groups": ["developers"],
        "password": "ada-password",
    },
    "eve": {
        "email": "eve@example.com",
        "email_verified": False,
        "groups": ["developers"],
        "password": "eve-password",
    },
}


# --- The redirect URI: a tiny aiohttp receiver on its own thread ----------------------------------


@dataclass
class Receiver:
    """Where the IdP redirects the browser; ``callbacks`` maps each received ``state`` to its ``code``."""

    base: str
    callbacks: dict[str, str] = field(default_factory=dict)

    def redirect_uri(self, method: str) -> str:
        """The registered redirect URI of the client using ``method``."""
        return f"{self.base}/cb/{method}"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """The receiver on a loopback port, capturing ``code`` and ``state`` and answering 200."""
    loop = asyncio.new_event_loop()
    callbacks: dict[str, str] = {}

    async def callback(request: web.Request) -> web.Response:
        callbacks[request.query.get("state", "")] = request.query.get("code", "")
        return web.Response(text="signed in")

    async def logout(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_get("/cb/{method}", callback)
    app.router.add_post("/logout/{method}", logout)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield Receiver(base=f"http://127.0.0.1:{port}", callbacks=callbacks)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


# --- The IdP and the gateway's configuration per client -------------------------------------------


ClientFactory = Callable[[Method], Awaitable[OidcClient]]


@dataclass
class Idp:
    """The running IdP and one gateway OIDC configuration per client authentication method."""

    server: TestIdp
    configs: dict[Method, Oidc]


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Idp]:
    """One IdP for the module, with a confidential client per authentication method and two accounts."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    clients: list[dict[str, Any]] = []
    secrets_by_method: dict[str, str] = {}
    for method in METHODS:
        meta: dict[str, Any] = {
            "client_id": f"rp-{method}",
            "redirect_uris": [receiver.redirect_uri(method)],
            "token_endpoint_auth_method": method,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            # Back-channel logout with sessions, as the gateway registers: the IdP then puts ``sid``
            # in the ID token (OIDC Back-Channel Logout 1.0 §2.1).
            "backchannel_logout_uri": f"{receiver.base}/logout/{method}",
            "backchannel_logout_session_required": True,
        }
        if method == "private_key_jwt":
            meta["jwks"] = {"keys": [{**public_jwk, "use": "sig", "alg": "RS256", "kid": KID}]}
        else:
            secrets_by_method[method] = meta["client_secret"] = secrets.token_urlsafe(32)
        clients.append(meta)

    server = TestIdp()
    issuer = server.start(tmp_path_factory.mktemp("idp"), clients, json.loads(json.dumps(ACCOUNTS)))
    configs = {
        method: Oidc(
            issuer=issuer,
            client_id=f"rp-{method}",
            client_auth_method=method,
            client_secret=secrets_by_method.get(method),
            private_key=pem if method == "private_key_jwt" else None,
            private_key_kid=KID if method == "private_key_jwt" else None,
            allowed_email_domains=("example.com",),
            allowed_groups=("developers",),
        )
        for method in METHODS
    }
    try:
        yield Idp(server, configs)
    finally:
        server.stop()


@pytest.fixture
async def client_for(idp: Idp) -> AsyncIterator[ClientFactory]:
    """A factory of discovered OidcClients by authentication method, closed after the test."""
    opened: list[OidcClient] = []

    async def make(method: Method) -> OidcClient:
        client = OidcClient(idp.configs[method])
        opened.append(client)
        await client.discover()
        return client

    try:
        yield make
    finally:
        for client in opened:
            await client.aclose()


# --- The browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _chromium() -> None:
    """Fail early, and clearly, without Debian's chromium."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make deps-system` installs Debian's chromium")


async def sign_in(start: AuthorizationStart, redirect_uri: str, receiver: Receiver, login: str) -> str:
    """Drive ``start.url`` through the IdP's login form in Chromium and return the received code."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page()
            await page.goto(start.url)
            await page.fill('input[name="login"]', login)
            await page.fill('input[name="password"]', str(ACCOUNTS[login]["password"]))
            await page.click("#submit")
            await page.wait_for_url(f"{redirect_uri}?**")
            assert await page.inner_text("body") == "signed in"
        finally:
            await browser.close()
    # The IdP echoes state unchanged; a callback under any other state would not be found here.
    assert start.state in receiver.callbacks, f"no callback with our state: {list(receiver.callbacks)}"
    return receiver.callbacks.pop(start.state)


async def code_for(
    client: OidcClient, method: str, receiver: Receiver, login: str
) -> tuple[AuthorizationStart, str]:
    """Start an authorization request for ``method``'s client and sign ``login`` in; the code."""
    redirect_uri = receiver.redirect_uri(method)
    start = client.start_authorization(redirect_uri)
    return start, await sign_in(start, redirect_uri, receiver, login)


async def exchange(
    client: OidcClient, method: str, receiver: Receiver, login: str
) -> tuple[AuthorizationStart, TokenSet]:
    """The full code flow: sign-in in the browser, then the code exchange."""
    start, code = await code_for(client, method, receiver, login)
    tokens = await client.exchange_code(code, receiver.redirect_uri(method), start.code_verifier)
    return start, tokens


# --- Tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
async def test_sign_in_refresh_and_disable(
    idp: Idp, receiver: Receiver, client_for: ClientFactory, method: Method
) -> None:
    """Code flow, identity, admission and refresh work with each client authentication method."""
    client = await client_for(method)
    start, tokens = await exchange(client, method, receiver, "ada")
    assert tokens.id_token and tokens.access_token and tokens.refresh_token
    claims = client.validate_id_token(tokens.id_token, nonce=start.nonce)
    identity = client.identity(claims, None)
    assert identity.sub == "ada"
    assert identity.email == "ada@example.com"
    assert identity.email_verified is True
    assert identity.groups == ("developers",)
    assert identity.sid
    assert identity.issuer == idp.configs[method].issuer
    assert client.admit(identity) is None

    try:
        refreshed = await client.refresh(tokens.refresh_token)
        assert refreshed.id_token and refreshed.access_token
        assert refreshed.refresh_token and refreshed.refresh_token != tokens.refresh_token  # rotated
        again = client.validate_id_token(refreshed.id_token, nonce=None, expected_sub=identity.sub)
        assert (again["sub"], again["sid"]) == ("ada", identity.sid)

        await asyncio.to_thread(idp.server.disable, "ada")
        with pytest.raises(IdpRefused) as refused:
            await client.refresh(refreshed.refresh_token)
        assert refused.value.reason == "invalid_grant"
    finally:
        await asyncio.to_thread(idp.server.enable, "ada")


async def test_unverified_email_is_refused(receiver: Receiver, client_for: ClientFactory) -> None:
    """A user whose IdP says ``email_verified: false`` is refused with ``email_not_verified``."""
    client = await client_for("client_secret_basic")
    start, tokens = await exchange(client, "client_secret_basic", receiver, "eve")
    assert tokens.id_token
    identity = client.identity(client.validate_id_token(tokens.id_token, nonce=start.nonce), None)
    assert (identity.sub, identity.email_verified, identity.groups) == ("eve", False, ("developers",))
    assert client.admit(identity) == "email_not_verified"


async def test_wrong_nonce_is_refused(receiver: Receiver, client_for: ClientFactory) -> None:
    """An ID token checked against another request's nonce fails with ``nonce_mismatch``."""
    client = await client_for("client_secret_post")
    start, tokens = await exchange(client, "client_secret_post", receiver, "ada")
    assert tokens.id_token
    with pytest.raises(OidcError) as mismatch:
        client.validate_id_token(tokens.id_token, nonce=start.nonce + "x")
    assert mismatch.value.reason == "nonce_mismatch"
    assert client.validate_id_token(tokens.id_token, nonce=start.nonce)["sub"] == "ada"


async def test_code_cannot_be_exchanged_twice(receiver: Receiver, client_for: ClientFactory) -> None:
    """A replayed authorization code is refused by the IdP with ``invalid_grant``."""
    method: Method = "private_key_jwt"
    client = await client_for(method)
    start, code = await code_for(client, method, receiver, "ada")
    redirect_uri = receiver.redirect_uri(method)
    first = await client.exchange_code(code, redirect_uri, start.code_verifier)
    assert first.id_token
    with pytest.raises(IdpRefused) as refused:
        await client.exchange_code(code, redirect_uri, start.code_verifier)
    assert refused.value.reason == "invalid_grant"
