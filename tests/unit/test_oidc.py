"""The OIDC relying party against an in-process fake IdP served through httpx.MockTransport."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from authz.configtypes import Oidc
from authz.errors import ConfigError
from authz.signin.idtoken import BACKCHANNEL_LOGOUT_EVENT
from authz.signin.oidc import (
    JWKS_REFETCH_INTERVAL,
    AuthorizationStart,
    IdpIdentity,
    IdpRefused,
    IdpUnavailable,
    OidcClient,
    OidcError,
    TokenSet,
)

ISS = "https://idp.example"
CLIENT = "gateway-client"
SECRET = "s3cret-value"
REDIRECT = "https://gateway.example/oauth/callback"
TOKEN_ENDPOINT = f"{ISS}/oauth/token"
NOW = 1_800_000_000.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
CLIENT_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CLIENT_EC = ec.generate_private_key(ec.SECP256R1())

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _pem(key: Key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _jwk(key: Key, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = dict(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
    else:
        jwk = dict(ECAlgorithm.to_jwk(key.public_key(), as_dict=True))
    jwk.update({"kid": kid, "use": "sig"})
    return jwk


class Clock:
    """A settable clock for the client under test."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeIdp:
    """An OpenID Provider in memory: discovery, JWKS, token and userinfo endpoints."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.metadata_issuer = ISS
        self.metadata_extra: dict[str, Any] = {}
        self.keys: dict[str, Key] = {"rsa-1": RSA_KEY, "ec-1": EC_KEY}
        self.requests: list[httpx.Request] = []
        self.jwks_fetches = 0
        self.token_requests: list[httpx.Request] = []
        self.token_reply: Callable[[httpx.Request], httpx.Response] = lambda r: httpx.Response(
            200, json=self.tokens()
        )
        self.userinfo_claims: dict[str, Any] = {
            "sub": "user-1",
            "groups": ["eng"],
            "email": "ada@example.com",
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.method == "GET" and path == "/.well-known/openid-configuration":
            return httpx.Response(
                200,
                json={
                    "issuer": self.metadata_issuer,
                    "authorization_endpoint": f"{ISS}/authorize",
                    "token_endpoint": TOKEN_ENDPOINT,
                    "userinfo_endpoint": f"{ISS}/me",
                    "jwks_uri": f"{ISS}/jwks",
                    "code_challenge_methods_supported": ["S256"],
                    **self.metadata_extra,
                },
            )
        if request.method == "GET" and path == "/jwks":
            self.jwks_fetches += 1
            return httpx.Response(200, json={"keys": [_jwk(k, kid) for kid, k in self.keys.items()]})
        if request.method == "POST" and path == "/oauth/token":
            self.token_requests.append(request)
            return self.token_reply(request)
        if request.method == "GET" and path == "/me":
            if request.headers.get("authorization") != "Bearer at-1":
                return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            return httpx.Response(200, json=self.userinfo_claims)
        return httpx.Response(404)

    def id_token(self, *, kid: str = "rsa-1", key: Key | None = None, **overrides: Any) -> str:
        now = int(self.clock.now)
        claims: dict[str, Any] = {
            "iss": ISS,
            "sub": "user-1",
            "aud": CLIENT,
            "iat": now,
            "exp": now + 300,
            "nonce": "n-1",
            "sid": "sid-1",
            "email": "ada@example.com",
            "email_verified": True,
            "groups": ["eng"],
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        signer = key if key is not None else self.keys[kid]
        alg = "ES256" if isinstance(signer, ec.EllipticCurvePrivateKey) else "RS256"
        return jwt.encode(claims, signer, algorithm=alg, headers={"kid": kid})

    def tokens(self, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": "at-1",
            "token_type": "Bearer",
            "expires_in": 300,
            "refresh_token": "rt-1",
            "id_token": self.id_token(),
        }
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not None}


@pytest.fixture
def clock() -> Clock:
    """A clock frozen at NOW until a test moves it."""
    return Clock()


@pytest.fixture
def idp(clock: Clock) -> FakeIdp:
    """A fresh fake IdP sharing the test's clock."""
    return FakeIdp(clock)


def _client(idp: FakeIdp, clock: Clock, **config: Any) -> tuple[OidcClient, httpx.AsyncClient]:
    settings: dict[str, Any] = {"issuer": ISS, "client_id": CLIENT, "client_secret": SECRET}
    settings.update(config)
    http = httpx.AsyncClient(transport=httpx.MockTransport(idp.handler))
    return OidcClient(Oidc(**settings), http=http, clock=clock), http


@pytest.fixture
async def oidc(idp: FakeIdp, clock: Clock) -> AsyncIterator[OidcClient]:
    """A discovered client using client_secret_basic against the fake IdP."""
    client, http = _client(idp, clock)
    await client.discover()
    yield client
    await client.aclose()
    await http.aclose()


def _form(request: httpx.Request) -> dict[str, str]:
    return dict(parse_qsl(request.content.decode(), strict_parsing=True))


# --- discovery ------------------------------------------------------------------------------------


async def test_discovery_fetches_metadata_and_jwks(idp: FakeIdp, clock: Clock) -> None:
    """discover() reads the metadata at the well-known path and then the JWK Set once."""
    client, http = _client(idp, clock, issuer=ISS + "/")
    idp.metadata_issuer = ISS + "/"
    await client.discover()
    assert [str(r.url) for r in idp.requests] == [f"{ISS}/.well-known/openid-configuration", f"{ISS}/jwks"]
    assert idp.jwks_fetches == 1
    await http.aclose()


async def test_discovery_issuer_mismatch_is_refused(idp: FakeIdp, clock: Clock) -> None:
    """Metadata whose issuer differs from the configured one, even by a trailing slash, is refused."""
    client, http = _client(idp, clock)
    idp.metadata_issuer = ISS + "/"
    with pytest.raises(OidcError) as info:
        await client.discover()
    assert info.value.reason == "issuer_mismatch"
    with pytest.raises(OidcError) as info:
        client.start_authorization(REDIRECT)
    assert info.value.reason == "not_discovered"
    await http.aclose()


async def test_discovery_server_error_is_unavailable(clock: Clock) -> None:
    """A 5xx from the discovery endpoint is IdpUnavailable."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(502)))
    client = OidcClient(Oidc(issuer=ISS, client_id=CLIENT, client_secret=SECRET), http=http, clock=clock)
    with pytest.raises(IdpUnavailable):
        await client.discover()
    await http.aclose()


async def test_async_calls_discover_on_demand(idp: FakeIdp, clock: Clock) -> None:
    """exchange_code without an explicit discover() discovers first."""
    client, http = _client(idp, clock)
    tokens = await client.exchange_code("code-1", REDIRECT, "v" * 43)
    assert tokens.access_token == "at-1"
    assert idp.jwks_fetches == 1
    await http.aclose()


# --- authorization response (RFC 9207) ----------------------------------------------------------


@pytest.mark.parametrize("supported", [True, False, "true"])
async def test_callback_iss_must_be_the_issuer_and_present_when_promised(
    idp: FakeIdp, clock: Clock, supported: Any
) -> None:
    """The callback's iss passes only when it is exactly the configured issuer; a missing one passes
    only when the metadata does not say authorization_response_iss_parameter_supported: true."""
    idp.metadata_extra = {"authorization_response_iss_parameter_supported": supported}
    client, http = _client(idp, clock)
    await client.check_authorization_response_issuer(ISS)
    for other in (ISS + "/", "https://attacker.example", "HTTPS://IDP.EXAMPLE", ""):
        with pytest.raises(OidcError) as info:
            await client.check_authorization_response_issuer(other)
        assert info.value.reason == "iss_mismatch"
    if supported is True:
        with pytest.raises(OidcError) as info:
            await client.check_authorization_response_issuer(None)
        assert info.value.reason == "iss_missing"
    else:
        await client.check_authorization_response_issuer(None)
    await http.aclose()


# --- authorization request ------------------------------------------------------------------------


def test_authorization_url_uses_code_flow_with_pkce_s256(oidc: OidcClient) -> None:
    """The URL asks for response_type=code with the S256 challenge of the returned verifier."""
    start = oidc.start_authorization(REDIRECT)
    assert isinstance(start, AuthorizationStart)
    url = urlsplit(start.url)
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{ISS}/authorize"
    query = {k: v[0] for k, v in parse_qs(url.query, strict_parsing=True).items()}
    digest = hashlib.sha256(start.code_verifier.encode("ascii")).digest()
    assert query == {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "scope": "openid email profile offline_access",
        "state": start.state,
        "nonce": start.nonce,
        "code_challenge": base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
        "code_challenge_method": "S256",
    }
    assert re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", start.code_verifier)


def test_state_nonce_and_verifier_are_fresh_and_long(oidc: OidcClient) -> None:
    """Each start has a new state, nonce and verifier of at least 128 bits."""
    starts = [oidc.start_authorization(REDIRECT) for _ in range(5)]
    for field in ("state", "nonce", "code_verifier"):
        values = [getattr(s, field) for s in starts]
        assert len(set(values)) == len(values)
        assert all(len(v) >= 22 for v in values)  # 22 chars of a 62-letter alphabet > 128 bits
    assert starts[0].code_verifier not in repr(starts[0])


# --- client authentication -------------------------------------------------------------------------


async def test_client_secret_basic_sends_a_basic_header(oidc: OidcClient, idp: FakeIdp) -> None:
    """client_secret_basic puts the credentials in the Authorization header, never the body."""
    tokens = await oidc.exchange_code("code-1", REDIRECT, "verifier-" + "x" * 40)
    request = idp.token_requests[-1]
    expected = base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert _form(request) == {
        "grant_type": "authorization_code",
        "code": "code-1",
        "redirect_uri": REDIRECT,
        "code_verifier": "verifier-" + "x" * 40,
    }
    assert tokens == TokenSet(
        id_token=tokens.id_token, access_token="at-1", refresh_token="rt-1", expires_in=300
    )
    assert tokens.id_token is not None
    assert oidc.validate_id_token(tokens.id_token, nonce="n-1")["sub"] == "user-1"
    assert "at-1" not in repr(tokens)


async def test_client_secret_post_sends_form_fields(idp: FakeIdp, clock: Clock) -> None:
    """client_secret_post sends client_id and client_secret in the form and no Authorization header."""
    client, http = _client(idp, clock, client_auth_method="client_secret_post")
    await client.exchange_code("code-1", REDIRECT, "v" * 43)
    request = idp.token_requests[-1]
    assert "authorization" not in request.headers
    form = _form(request)
    assert (form["client_id"], form["client_secret"], form["code"]) == (CLIENT, SECRET, "code-1")
    await http.aclose()


@pytest.mark.parametrize(("alg", "key"), [("RS256", CLIENT_RSA), ("PS256", CLIENT_RSA), ("ES256", CLIENT_EC)])
async def test_private_key_jwt_sends_a_valid_rfc7523_assertion(
    idp: FakeIdp, clock: Clock, alg: str, key: Key
) -> None:
    """private_key_jwt sends a client assertion signed with the configured key, kid and alg."""
    client, http = _client(
        idp,
        clock,
        client_secret=None,
        client_auth_method="private_key_jwt",
        private_key=_pem(key),
        private_key_kid="client-key-1",
        private_key_algorithm=alg,
    )
    await client.refresh("rt-0")
    request = idp.token_requests[-1]
    assert "authorization" not in request.headers
    form = _form(request)
    assert "client_secret" not in form
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = form["client_assertion"]
    assert jwt.get_unverified_header(assertion)["kid"] == "client-key-1"
    claims = jwt.decode(
        assertion,
        key.public_key(),
        algorithms=[alg],
        audience=TOKEN_ENDPOINT,
        issuer=CLIENT,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    assert claims["sub"] == CLIENT
    assert (form["grant_type"], form["refresh_token"]) == ("refresh_token", "rt-0")
    await http.aclose()


@pytest.mark.parametrize(
    ("pem", "alg"),
    [(None, "RS256"), ("not a key", "RS256"), (_pem(CLIENT_RSA), "ES256"), (_pem(CLIENT_EC), "RS256")],
)
def test_unusable_private_key_is_a_config_error(pem: str | None, alg: Any) -> None:
    """A missing, garbled or wrong-type private key fails at construction."""
    config = Oidc(
        issuer=ISS,
        client_id=CLIENT,
        client_auth_method="private_key_jwt",
        private_key=pem,
        private_key_algorithm=alg,
    )
    with pytest.raises(ConfigError):
        OidcClient(config)


def test_missing_client_secret_is_a_config_error() -> None:
    """client_secret_basic without a secret fails at construction."""
    with pytest.raises(ConfigError):
        OidcClient(Oidc(issuer=ISS, client_id=CLIENT))


# --- token endpoint errors ------------------------------------------------------------------------


async def test_refresh_invalid_grant_is_refused(oidc: OidcClient, idp: FakeIdp) -> None:
    """400 invalid_grant (a disabled user) raises IdpRefused with that reason."""
    idp.token_reply = lambda r: httpx.Response(
        400, json={"error": "invalid_grant", "error_description": "user disabled"}
    )
    with pytest.raises(IdpRefused) as info:
        await oidc.refresh("rt-1")
    assert info.value.reason == "invalid_grant"


async def test_code_replay_is_refused(oidc: OidcClient, idp: FakeIdp) -> None:
    """A replayed authorization code (invalid_grant) raises IdpRefused."""
    idp.token_reply = lambda r: httpx.Response(400, json={"error": "invalid_grant"})
    with pytest.raises(IdpRefused):
        await oidc.exchange_code("used-code", REDIRECT, "v" * 43)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(401, json={"error": "invalid_client"}),
        httpx.Response(400, text="<html>bad request</html>"),
        httpx.Response(200, json={"error": "invalid_grant"}),
    ],
)
async def test_other_oauth_refusals_are_refused(
    oidc: OidcClient, idp: FakeIdp, response: httpx.Response
) -> None:
    """Any 400/401 OAuth error (or an error in a 200 body) is IdpRefused."""
    idp.token_reply = lambda r: response
    with pytest.raises(IdpRefused):
        await oidc.refresh("rt-1")


@pytest.mark.parametrize(
    "reply",
    [
        lambda r: httpx.Response(503, text="maintenance"),
        lambda r: httpx.Response(500, json={"error": "server_error"}),
        lambda r: httpx.Response(429),
        lambda r: httpx.Response(400, json={"error": "temporarily_unavailable"}),
    ],
)
async def test_refresh_server_trouble_is_unavailable(
    oidc: OidcClient, idp: FakeIdp, reply: Callable[[httpx.Request], httpx.Response]
) -> None:
    """5xx, 429 and temporarily_unavailable raise IdpUnavailable."""
    idp.token_reply = reply
    with pytest.raises(IdpUnavailable) as info:
        await oidc.refresh("rt-1")
    assert info.value.reason == "idp_server_error"


def _raise(exc: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        raise exc("simulated", request=request)

    return reply


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (httpx.ConnectError, "idp_unreachable"),
        (httpx.ReadError, "idp_unreachable"),
        (httpx.ReadTimeout, "idp_timeout"),
    ],
)
async def test_refresh_network_errors_are_unavailable(
    oidc: OidcClient, idp: FakeIdp, exc: type[httpx.TransportError], reason: str
) -> None:
    """Connection errors and timeouts raise IdpUnavailable."""
    idp.token_reply = _raise(exc)
    with pytest.raises(IdpUnavailable) as info:
        await oidc.refresh("rt-1")
    assert info.value.reason == reason


async def test_refresh_returns_rotated_tokens_and_a_revalidatable_id_token(
    oidc: OidcClient, idp: FakeIdp
) -> None:
    """A refresh response's new ID token validates without a nonce and with the same sub."""
    idp.token_reply = lambda r: httpx.Response(
        200, json=idp.tokens(refresh_token=None, id_token=idp.id_token(nonce=None), expires_in="600")
    )
    tokens = await oidc.refresh("rt-1")
    assert (tokens.refresh_token, tokens.expires_in) == (None, 600)
    assert tokens.id_token is not None
    assert oidc.validate_id_token(tokens.id_token, nonce=None, expected_sub="user-1")["sid"] == "sid-1"
    with pytest.raises(OidcError) as info:
        oidc.validate_id_token(tokens.id_token, nonce=None, expected_sub="user-2")
    assert info.value.reason == "sub_mismatch"


async def test_malformed_token_response_is_an_error(oidc: OidcClient, idp: FakeIdp) -> None:
    """A 200 that is not a JSON object of strings is refused as malformed."""
    idp.token_reply = lambda r: httpx.Response(200, json={"access_token": 5})
    with pytest.raises(OidcError) as info:
        await oidc.refresh("rt-1")
    assert info.value.reason == "malformed_token_response"


# --- ID token validation through the client, and key rotation -------------------------------------


async def test_id_token_rules_apply_through_the_client(oidc: OidcClient, idp: FakeIdp) -> None:
    """validate_id_token uses the configured issuer, client id, algorithms and nonce."""
    assert oidc.validate_id_token(idp.id_token(kid="ec-1"), nonce="n-1")["sub"] == "user-1"
    for token, reason in [
        (idp.id_token(nonce="other"), "nonce_mismatch"),
        (idp.id_token(aud="other"), "wrong_audience"),
        (idp.id_token(iss="https://evil.example"), "wrong_issuer"),
        (idp.id_token(key=RSA_KEY_2), "bad_signature"),
        (jwt.encode({"sub": "x"}, None, algorithm="none"), "bad_algorithm"),
    ]:
        with pytest.raises(OidcError) as info:
            oidc.validate_id_token(token, nonce="n-1")
        assert info.value.reason == reason


async def test_id_token_clock_skew_comes_from_config(idp: FakeIdp, clock: Clock) -> None:
    """An ID token expired by less than clock_skew passes; by more, it is expired."""
    client, http = _client(idp, clock, clock_skew=120)
    await client.discover()
    token = idp.id_token()
    clock.now += 300 + 100
    assert client.validate_id_token(token, nonce="n-1")["sub"] == "user-1"
    clock.now += 30
    with pytest.raises(OidcError) as info:
        client.validate_id_token(token, nonce="n-1")
    assert info.value.reason == "expired"
    await http.aclose()


async def test_rotated_key_is_fetched_once(oidc: OidcClient, idp: FakeIdp) -> None:
    """An ID token signed by a newly published key triggers one JWKS re-fetch, then validates."""
    idp.keys["rsa-2"] = RSA_KEY_2
    idp.token_reply = lambda r: httpx.Response(200, json=idp.tokens(id_token=idp.id_token(kid="rsa-2")))
    tokens = await oidc.exchange_code("code-1", REDIRECT, "v" * 43)
    assert idp.jwks_fetches == 2
    assert tokens.id_token is not None
    assert oidc.validate_id_token(tokens.id_token, nonce="n-1")["sub"] == "user-1"
    await oidc.exchange_code("code-2", REDIRECT, "v" * 43)
    assert idp.jwks_fetches == 2  # the kid is now cached


async def test_unknown_kid_refetches_exactly_once(oidc: OidcClient, idp: FakeIdp, clock: Clock) -> None:
    """A kid the IdP does not publish causes one re-fetch, then unknown_kid, and no re-fetch storm."""
    ghost = idp.id_token(kid="ghost", key=RSA_KEY_2)
    idp.token_reply = lambda r: httpx.Response(200, json=idp.tokens(id_token=ghost))
    tokens = await oidc.exchange_code("code-1", REDIRECT, "v" * 43)
    assert idp.jwks_fetches == 2
    with pytest.raises(OidcError) as info:
        oidc.validate_id_token(ghost, nonce="n-1")
    assert info.value.reason == "unknown_kid"
    await oidc.exchange_code("code-2", REDIRECT, "v" * 43)
    await oidc.ensure_signing_key(idp.id_token(kid="ghost-2", key=RSA_KEY_2))
    assert idp.jwks_fetches == 2
    clock.now += JWKS_REFETCH_INTERVAL + 1
    await oidc.ensure_signing_key(ghost)
    assert idp.jwks_fetches == 3
    assert tokens.id_token == ghost


# --- logout tokens ---------------------------------------------------------------------------------


def _logout_token(idp: FakeIdp, **overrides: Any) -> str:
    claims: dict[str, Any] = {
        "nonce": None,
        "exp": None,
        "email": None,
        "email_verified": None,
        "groups": None,
        "jti": "jti-1",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    claims.update(overrides)
    return idp.id_token(**claims)


async def test_logout_token_is_validated_with_the_idp_keys(oidc: OidcClient, idp: FakeIdp) -> None:
    """A proper logout token passes; one signed by a foreign key or carrying a nonce does not."""
    claims = oidc.validate_logout_token(_logout_token(idp))
    assert (claims["sid"], claims["jti"]) == ("sid-1", "jti-1")
    for token, reason in [
        (_logout_token(idp, key=RSA_KEY_2), "logout_bad_signature"),
        (_logout_token(idp, nonce="n"), "logout_nonce_present"),
        (_logout_token(idp, aud="other"), "logout_wrong_audience"),
        (_logout_token(idp, events=None), "logout_missing_events"),
    ]:
        with pytest.raises(OidcError) as info:
            oidc.validate_logout_token(token)
        assert info.value.reason == reason


async def test_logout_token_with_rotated_key_after_ensure_signing_key(oidc: OidcClient, idp: FakeIdp) -> None:
    """ensure_signing_key fetches a newly published key before a logout token is validated."""
    idp.keys["rsa-2"] = RSA_KEY_2
    token = _logout_token(idp, kid="rsa-2")
    with pytest.raises(OidcError) as info:
        oidc.validate_logout_token(token)
    assert info.value.reason == "logout_unknown_kid"
    await oidc.ensure_signing_key(token)
    assert oidc.validate_logout_token(token)["sub"] == "user-1"


# --- userinfo, identity and admission -------------------------------------------------------------


async def test_userinfo_sends_the_bearer_token(oidc: OidcClient, idp: FakeIdp) -> None:
    """userinfo() presents the access token as a bearer and returns the claims."""
    assert await oidc.userinfo("at-1") == idp.userinfo_claims
    assert idp.requests[-1].headers["authorization"] == "Bearer at-1"


async def test_userinfo_refusal_is_idp_refused(oidc: OidcClient) -> None:
    """A 401 from userinfo (revoked access token) raises IdpRefused."""
    with pytest.raises(IdpRefused):
        await oidc.userinfo("revoked")


async def test_identity_prefers_userinfo_when_configured(idp: FakeIdp, clock: Clock) -> None:
    """With use_userinfo, groups come from userinfo; a userinfo for another sub is refused."""
    client, http = _client(idp, clock, use_userinfo=True, groups_claim="/org/teams")
    await client.discover()
    claims = client.validate_id_token(idp.id_token(org={"teams": ["old"]}), nonce="n-1")
    idp.userinfo_claims = {"sub": "user-1", "org": {"teams": ["platform"]}}
    identity = client.identity(claims, await client.userinfo("at-1"))
    assert identity == IdpIdentity("user-1", "ada@example.com", True, ("platform",), "sid-1", ISS)
    with pytest.raises(OidcError) as info:
        client.identity(claims, {"sub": "user-2"})
    assert info.value.reason == "userinfo_sub_mismatch"
    await http.aclose()


async def test_admit_uses_the_configured_rules(idp: FakeIdp, clock: Clock) -> None:
    """admit() applies allowed_email_domains and allowed_groups from the config."""
    client, http = _client(idp, clock, allowed_email_domains=("EXAMPLE.com",), allowed_groups=("eng",))
    identity = IdpIdentity("user-1", "ada@example.com", True, ("eng",), None, ISS)
    assert client.admit(identity) is None
    assert client.admit(replace(identity, email="ada@other.com")) == "email_domain_not_allowed"
    assert client.admit(replace(identity, groups=("sales",))) == "group_not_allowed"
    assert client.admit(replace(identity, email_verified=False)) == "email_not_verified"
    await http.aclose()


# --- lifecycle ------------------------------------------------------------------------------------


async def test_aclose_leaves_an_injected_client_open(idp: FakeIdp, clock: Clock) -> None:
    """aclose() closes only an HTTP client the OidcClient created itself."""
    client, http = _client(idp, clock)
    await client.aclose()
    assert not http.is_closed
    await http.aclose()
    owned = OidcClient(Oidc(issuer=ISS, client_id=CLIENT, client_secret=SECRET))
    await owned.aclose()
    assert owned._http.is_closed
