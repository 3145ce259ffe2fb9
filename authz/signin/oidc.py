"""The gateway as an OpenID Connect relying party: the I/O edge towards the company IdP.

Discovery (OIDC Discovery 1.0 §4), the authorization code flow with PKCE (OIDC Core §3.1,
RFC 7636), the token endpoint (RFC 6749 §4.1.3 and §6) with client authentication by authlib,
userinfo (OIDC Core §5.3) and the IdP's JWK Set. Token validation and admission are pure and live
in :mod:`authz.signin.idtoken` and :mod:`authz.signin.admission`; :class:`OidcClient` feeds them
the cached keys, the configuration and the clock.

Errors: :class:`OidcError` (``reason`` is a short code) with two subclasses the refresh path acts
on: :class:`IdpRefused` (the IdP said no: the session must end) and :class:`IdpUnavailable` (it
could not be asked: retry, or apply ``oidc.refresh_grace``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from authlib.common.security import generate_token
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from authz.configtypes import Oidc
from authz.errors import ConfigError
from authz.signin import admission, idtoken
from authz.signin.admission import IdpIdentity
from authz.signin.idtoken import OidcError

__all__ = [
    "AuthorizationStart",
    "IdpIdentity",
    "IdpRefused",
    "IdpUnavailable",
    "OidcClient",
    "OidcError",
    "TokenSet",
]

# A re-fetch of the JWK Set for an unknown kid happens at most this often: logout tokens arrive from
# the network, and random kids must not turn the gateway into a load generator against the IdP.
JWKS_REFETCH_INTERVAL = 60.0
# Keys the IdP has withdrawn stop verifying after at most this long (OIDC Core §10.1.1 rotation).
JWKS_MAX_AGE = 3600.0

# RFC 7636 §4.1: 43-128 characters; authlib's generator uses the unreserved alphabet [A-Za-z0-9].
_VERIFIER_LENGTH = 64
# state and nonce: 32 characters of a 62-letter alphabet are ~190 bits (at least 128 required).
_RANDOM_LENGTH = 32
# RFC 6749 §5.2 error codes are short ASCII words; anything else is not echoed as a reason.
_ERROR_CODE = re.compile(r"[a-z0-9_]{1,64}")
_FORM = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}


class IdpRefused(OidcError):
    """The IdP refused: ``invalid_grant`` (a disabled user, a revoked or replayed grant) or another
    OAuth error on a 400/401 answer. ``reason`` is the OAuth error code."""


class IdpUnavailable(OidcError):
    """The IdP could not be asked: a network error, a timeout or a 5xx (also 408 and 429)."""


@dataclass(frozen=True, slots=True)
class AuthorizationStart:
    """Where to send the browser, and what to keep (single-use) until the callback."""

    url: str
    state: str
    nonce: str
    code_verifier: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class TokenSet:
    """A token endpoint response (RFC 6749 §5.1, OIDC Core §3.1.3.3); None for absent fields.

    On refresh, a None ``refresh_token`` means the IdP did not rotate it: keep the previous one.
    """

    id_token: str | None = field(repr=False)
    access_token: str | None = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: int | None


class _HttpxClientAuth(httpx.Auth):
    """Applies an authlib :class:`ClientAuth` (which edits method, URL, headers and form body) to an
    httpx request, as authlib's own httpx integration does."""

    requires_request_body = True

    def __init__(self, client_auth: Any) -> None:
        self._client_auth = client_auth

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Yield the request with the client's credentials added."""
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        url, headers, body = self._client_auth.prepare(
            request.method, str(request.url), headers, request.content.decode("ascii")
        )
        yield httpx.Request(request.method, url, headers=headers, content=body, extensions=request.extensions)


def _assertion_key(config: Oidc) -> RSAKey | ECKey:
    """The private_key_jwt signing key, checked against its algorithm at start-up."""
    if not config.private_key:
        raise ConfigError("oidc.private_key", "is required for private_key_jwt")
    try:
        if config.private_key_algorithm == "ES256":
            key: RSAKey | ECKey = ECKey.import_key(config.private_key)
        else:
            key = RSAKey.import_key(config.private_key)
        if not key.is_private:
            raise ValueError("not a private key")
        # Sign one throwaway assertion so a key that cannot make this algorithm (wrong curve, ...)
        # fails now rather than at the first sign-in.
        ClientAuth(config.client_id, key, _private_key_jwt(config, "https://check.invalid/token")).prepare(
            "POST", "https://check.invalid/token", {}, ""
        )
    except (ValueError, TypeError, JoseError) as exc:
        raise ConfigError(
            "oidc.private_key",
            f"is not an unencrypted PEM private key usable with {config.private_key_algorithm}",
        ) from exc
    return key


def _private_key_jwt(config: Oidc, token_endpoint: str) -> PrivateKeyJWT:
    # RFC 7523 §3 / OIDC Core §9: iss = sub = client_id, aud = the token endpoint, a fresh jti; the
    # kid lets the IdP pick the registered key.
    headers = {"kid": config.private_key_kid} if config.private_key_kid else None
    return PrivateKeyJWT(token_endpoint, headers=headers, alg=config.private_key_algorithm)


def _oauth_error(response: httpx.Response) -> tuple[str | None, str]:
    """The RFC 6749 §5.2 ``error`` code and a short description from an error response."""
    try:
        body = response.json()
    except ValueError:
        return None, ""
    if not isinstance(body, Mapping):
        return None, ""
    error, description = body.get("error"), body.get("error_description")
    code = error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else None
    return code, description[:200] if isinstance(description, str) else ""


def _unavailable_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _token_set(body: Mapping[str, Any]) -> TokenSet:
    """Parse a successful token response (RFC 6749 §5.1)."""

    def text(name: str) -> str | None:
        value = body.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise OidcError("malformed_token_response", f"token response field {name!r} is not a string")
        return value

    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)  # some IdPs send it as a string
    if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(expires_in, int)):
        raise OidcError("malformed_token_response", "token response field 'expires_in' is not an integer")
    return TokenSet(
        id_token=text("id_token"),
        access_token=text("access_token"),
        refresh_token=text("refresh_token"),
        expires_in=expires_in,
    )


def check_response_issuer(iss: str | None, *, issuer: str, required: bool) -> None:
    """RFC 9207 §2.4 over plain values: see :meth:`OidcClient.check_authorization_response_issuer`."""
    if iss is None:
        if required:
            raise OidcError("iss_missing", "the authorization response has no iss, which the IdP promises")
        return
    if iss != issuer:
        raise OidcError("iss_mismatch", "the authorization response names another issuer")


def _unverified_kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return kid if isinstance(kid, str) else None


def _has_kid(jwks: Mapping[str, Any] | None, kid: str) -> bool:
    keys = jwks.get("keys") if jwks is not None else None
    return isinstance(keys, list) and any(isinstance(k, Mapping) and k.get("kid") == kid for k in keys)


class OidcClient:
    """Talks to one OpenID Provider for sign-in, refresh, userinfo and logout tokens.

    ``http`` is injected by tests (an ``httpx.MockTransport``) or shared by the caller, who then
    owns it; otherwise the client creates and closes its own. ``clock`` returns Unix seconds.
    Call :meth:`discover` once before the synchronous methods; the async ones discover on demand.
    """

    def __init__(
        self,
        config: Oidc,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not config.issuer or not config.client_id:
            raise ConfigError("oidc", "issuer and client_id are required")
        if config.client_auth_method == "private_key_jwt":
            self._credential: Any = _assertion_key(config)
        elif config.client_secret:
            self._credential = config.client_secret
        else:
            raise ConfigError("oidc.client_secret", f"is required for {config.client_auth_method}")
        self._config = config
        self._owns_http = http is None
        # Redirects are not followed: OAuth endpoints answer directly, and a redirect could carry a
        # client credential to another host.
        self._http = http if http is not None else httpx.AsyncClient(follow_redirects=False)
        self._clock = clock
        self._metadata: dict[str, Any] | None = None
        self._auth: _HttpxClientAuth | None = None
        self._jwks: dict[str, Any] | None = None
        self._jwks_fetched_at = 0.0
        self._last_kid_refetch: float | None = None
        self._discover_lock = asyncio.Lock()
        self._jwks_lock = asyncio.Lock()

    # --- HTTP ----------------------------------------------------------------------------------

    async def _request(self, method: str, url: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """Send one request; network failures and timeouts become :class:`IdpUnavailable`."""
        try:
            return await self._http.request(method, url, timeout=self._config.http_timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise IdpUnavailable(
                "idp_timeout", f"{what}: the IdP did not answer within {self._config.http_timeout}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise IdpUnavailable(
                "idp_unreachable", f"{what}: cannot reach the IdP ({type(exc).__name__})"
            ) from exc

    async def _get_json(self, url: str, *, what: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._request("GET", url, what=what, **kwargs)
        if _unavailable_status(response.status_code):
            raise IdpUnavailable("idp_server_error", f"{what}: the IdP answered HTTP {response.status_code}")
        if response.status_code != 200:
            raise OidcError("unexpected_status", f"{what}: the IdP answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise OidcError("malformed_response", f"{what}: the IdP's answer is not JSON") from exc
        if not isinstance(body, dict):
            raise OidcError("malformed_response", f"{what}: the IdP's answer is not a JSON object")
        return body

    # --- discovery and keys --------------------------------------------------------------------

    async def discover(self) -> None:
        """Read the provider metadata and the JWK Set, and cache them.

        Raises OidcError ``issuer_mismatch`` unless the metadata's ``issuer`` is exactly the
        configured one (OIDC Discovery §4.3), which defeats a metadata document that speaks for
        another issuer.
        """
        async with self._discover_lock:
            await self._discover()

    async def _discover(self) -> None:
        # OIDC Discovery §4: a terminating "/" of the issuer is removed before appending the path.
        url = self._config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        metadata = await self._get_json(url, what="discovery")
        if metadata.get("issuer") != self._config.issuer:
            raise OidcError(
                "issuer_mismatch",
                f"discovery: the IdP says its issuer is {metadata.get('issuer')!r}, "
                f"not {self._config.issuer!r}; set oidc.issuer to the exact value",
            )
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(metadata.get(name), str) or not metadata[name]:
                raise OidcError("malformed_discovery", f"discovery: {name} is missing")
        jwks = await self._get_jwks(metadata["jwks_uri"])
        if self._config.client_auth_method == "private_key_jwt":
            method: Any = _private_key_jwt(self._config, metadata["token_endpoint"])
        else:
            method = self._config.client_auth_method
        self._auth = _HttpxClientAuth(ClientAuth(self._config.client_id, self._credential, method))
        self._metadata = metadata
        self._jwks, self._jwks_fetched_at = jwks, self._clock()

    async def _ensure_discovered(self) -> dict[str, Any]:
        async with self._discover_lock:
            if self._metadata is None:
                await self._discover()
        assert self._metadata is not None
        return self._metadata

    def _discovered(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self._metadata is None or self._jwks is None:
            raise OidcError("not_discovered", "call OidcClient.discover() first")
        return self._metadata, self._jwks

    async def _get_jwks(self, jwks_uri: str) -> dict[str, Any]:
        jwks = await self._get_json(
            jwks_uri, what="JWK Set", headers={"Accept": "application/jwk-set+json, application/json"}
        )
        if not isinstance(jwks.get("keys"), list):
            raise OidcError("malformed_jwks", "JWK Set: 'keys' is not a list")
        return jwks

    async def _refetch_jwks(self, jwks_uri: str) -> None:
        self._jwks = await self._get_jwks(jwks_uri)
        self._jwks_fetched_at = self._clock()

    async def ensure_signing_key(self, token: str) -> None:
        """Re-fetch the JWK Set once when ``token`` names a ``kid`` the cache does not hold.

        This follows the IdP's key rotation (OIDC Core §10.1.1). Refetches for unknown kids happen at
        most every :data:`JWKS_REFETCH_INTERVAL` seconds, and the cache is renewed when older than
        :data:`JWKS_MAX_AGE`. :meth:`exchange_code` and :meth:`refresh` call it for the ID token they
        return; call it before :meth:`validate_logout_token`.
        """
        jwks_uri: str = (await self._ensure_discovered())["jwks_uri"]
        async with self._jwks_lock:
            now = self._clock()
            if now - self._jwks_fetched_at > JWKS_MAX_AGE:
                await self._refetch_jwks(jwks_uri)
            kid = _unverified_kid(token)
            if kid is None or _has_kid(self._jwks, kid):
                return
            if self._last_kid_refetch is not None and now - self._last_kid_refetch < JWKS_REFETCH_INTERVAL:
                return
            self._last_kid_refetch = now
            await self._refetch_jwks(jwks_uri)

    # --- authorization code flow ---------------------------------------------------------------

    async def check_authorization_response_issuer(self, iss: str | None) -> None:
        """Apply RFC 9207 §2.4 to the ``iss`` parameter of an authorization response (the callback).

        Raises OidcError ``iss_mismatch`` when it names another issuer than the configured one
        (simple string comparison), and ``iss_missing`` when it is absent although the IdP's
        metadata says ``authorization_response_iss_parameter_supported``; IdpUnavailable if the
        metadata cannot be read. Check it before acting on anything in the response, errors too.
        """
        metadata = await self._ensure_discovered()
        check_response_issuer(
            iss,
            issuer=self._config.issuer,
            required=metadata.get("authorization_response_iss_parameter_supported") is True,
        )

    def start_authorization(self, redirect_uri: str) -> AuthorizationStart:
        """Build the authentication request (OIDC Core §3.1.2.1) for the browser.

        ``response_type=code`` with a fresh PKCE verifier and its S256 challenge (RFC 7636 §4.1-4.3),
        a fresh ``state`` (RFC 6749 §10.12, bound to the browser by the caller) and a fresh ``nonce``
        (OIDC Core §3.1.2.1); ``prompt`` is left to the IdP. Keep all three single-use until the
        callback; ``redirect_uri`` must be the exact registered one.
        """
        metadata, _ = self._discovered()
        state = generate_token(_RANDOM_LENGTH)
        nonce = generate_token(_RANDOM_LENGTH)
        verifier = generate_token(_VERIFIER_LENGTH)
        url = prepare_grant_uri(
            metadata["authorization_endpoint"],
            self._config.client_id,
            "code",
            redirect_uri=redirect_uri,
            scope=list(self._config.scopes),
            state=state,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        return AuthorizationStart(url=url, state=state, nonce=nonce, code_verifier=verifier)

    async def _token_request(self, body: str, *, what: str) -> TokenSet:
        """POST to the token endpoint with client authentication and map the answer."""
        metadata = await self._ensure_discovered()
        assert self._auth is not None  # set by discovery
        response = await self._request(
            "POST", metadata["token_endpoint"], what=what, content=body, headers=_FORM, auth=self._auth
        )
        status = response.status_code
        code, description = _oauth_error(response)
        detail = f": {description}" if description else ""
        # Some IdPs report their own trouble as an OAuth error code (RFC 6749 §4.1.2.1 codes).
        if _unavailable_status(status) or code in ("temporarily_unavailable", "server_error"):
            raise IdpUnavailable(
                "idp_server_error", f"{what}: the IdP answered HTTP {status} {code or ''}".strip()
            )
        # RFC 6749 §5.2: errors are 400 (401 for invalid_client); a 200 carrying an error is one too.
        if status in (400, 401) or (status == 200 and code is not None):
            raise IdpRefused(
                code or "refused", f"{what}: the IdP refused ({code or f'HTTP {status}'}){detail}"
            )
        if status != 200:
            raise OidcError("unexpected_status", f"{what}: the token endpoint answered HTTP {status}")
        try:
            payload = response.json()
        except ValueError as exc:
            raise OidcError("malformed_token_response", f"{what}: the token response is not JSON") from exc
        if not isinstance(payload, dict):
            raise OidcError("malformed_token_response", f"{what}: the token response is not a JSON object")
        tokens = _token_set(payload)
        if tokens.id_token is not None:
            await self.ensure_signing_key(tokens.id_token)
        return tokens

    async def exchange_code(self, code: str, redirect_uri: str, code_verifier: str) -> TokenSet:
        """Redeem an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.5; OIDC Core §3.1.3.1).

        Validate the returned ID token with :meth:`validate_id_token` and the request's nonce.
        Raises IdpRefused (e.g. ``invalid_grant`` for a replayed code) or IdpUnavailable.
        """
        body = prepare_token_request(
            "authorization_code", code=code, redirect_uri=redirect_uri, code_verifier=code_verifier
        )
        return await self._token_request(body, what="code exchange")

    async def refresh(self, refresh_token: str) -> TokenSet:
        """Use the IdP refresh token (RFC 6749 §6; OIDC Core §12) with the same client authentication.

        Raises IdpRefused when the IdP says no (``invalid_grant``: the user is disabled or the grant
        revoked) and IdpUnavailable when it cannot be asked. Validate a returned ID token with
        ``validate_id_token(..., nonce=None, expected_sub=<the session's sub>)`` (OIDC Core §12.2).
        """
        body = prepare_token_request("refresh_token", refresh_token=refresh_token)
        return await self._token_request(body, what="refresh")

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        """The userinfo claims for ``access_token`` (OIDC Core §5.3); JSON responses only.

        A 401/403 raises IdpRefused (RFC 6750 §3.1); check ``sub`` with :meth:`identity`.
        """
        metadata = await self._ensure_discovered()
        endpoint = metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise OidcError("no_userinfo_endpoint", "userinfo: the IdP publishes no userinfo_endpoint")
        # RFC 6750 §2.1: the access token as a bearer credential.
        headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
        response = await self._request("GET", endpoint, what="userinfo", headers=headers)
        if response.status_code in (400, 401, 403):
            raise IdpRefused(
                "invalid_token", f"userinfo: the IdP refused the access token (HTTP {response.status_code})"
            )
        if response.headers.get("content-type", "").split(";")[0].strip() == "application/jwt":
            raise OidcError(
                "userinfo_jwt_unsupported", "userinfo: signed userinfo responses are not supported"
            )
        if _unavailable_status(response.status_code):
            raise IdpUnavailable(
                "idp_server_error", f"userinfo: the IdP answered HTTP {response.status_code}"
            )
        if response.status_code != 200:
            raise OidcError("unexpected_status", f"userinfo: the IdP answered HTTP {response.status_code}")
        try:
            claims = response.json()
        except ValueError as exc:
            raise OidcError("malformed_response", "userinfo: the answer is not JSON") from exc
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            raise OidcError("malformed_response", "userinfo: the answer has no sub")
        return claims

    # --- validation and admission (pure, with cached keys) -------------------------------------

    def validate_id_token(
        self, id_token: str, *, nonce: str | None, expected_sub: str | None = None
    ) -> dict[str, Any]:
        """Validate ``id_token`` (OIDC Core §3.1.3.7) with the cached keys; see
        :func:`authz.signin.idtoken.validate_id_token`. ``nonce=None`` for a refreshed token."""
        _, jwks = self._discovered()
        return idtoken.validate_id_token(
            id_token,
            jwks=jwks,
            issuer=self._config.issuer,
            client_id=self._config.client_id,
            algorithms=self._config.id_token_algorithms,
            nonce=nonce,
            now=self._clock(),
            skew=self._config.clock_skew,
            expected_sub=expected_sub,
        )

    def validate_logout_token(self, token: str) -> dict[str, Any]:
        """Validate a back-channel logout token (Back-Channel Logout 1.0 §2.6); see
        :func:`authz.signin.idtoken.validate_logout_token`. The caller checks ``jti`` replay."""
        _, jwks = self._discovered()
        return idtoken.validate_logout_token(
            token,
            jwks=jwks,
            issuer=self._config.issuer,
            client_id=self._config.client_id,
            algorithms=self._config.id_token_algorithms,
            now=self._clock(),
            skew=self._config.clock_skew,
        )

    def identity(self, claims: Mapping[str, Any], userinfo: Mapping[str, Any] | None) -> IdpIdentity:
        """Map validated ID token claims (and userinfo) to an :class:`IdpIdentity` per the config."""
        return admission.extract_identity(
            claims,
            userinfo,
            groups_claim=self._config.groups_claim,
            email_claim=self._config.email_claim,
            issuer=self._config.issuer,
            prefer_userinfo=self._config.use_userinfo,
        )

    def admit(self, identity: IdpIdentity) -> str | None:
        """None when the configured admission rules let ``identity`` in, else the reason."""
        return admission.admit(
            identity,
            allowed_email_domains=self._config.allowed_email_domains,
            allowed_groups=self._config.allowed_groups,
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            await self._http.aclose()
