"""What every portal handler shares: the process's dependencies and what is derived from them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from authz.configtypes import GatewayConfig
from authz.errors import TokenError
from authz.signin.backchannel import BackchannelLogouts
from authz.signin.oidc import AuthorizationStart, IdpIdentity, OidcClient, TokenSet
from authz.signin.portal.device import RateLimiter
from authz.signin.portal.http import cookie_names, origin_of
from authz.signin.secretbox import SecretBox
from authz.signin.tokens import Claims, KeySet, TokenVerifier, bearer_token
from authz.store import sessions as store
from authz.store.db import Pool
from authz.telemetry.relay import Relay


class IdentityProvider(Protocol):
    """The public surface of :class:`authz.signin.oidc.OidcClient` the portal uses (tests pass a stub)."""

    async def discover(self) -> None:
        """Read the IdP's metadata and keys."""

    def start_authorization(self, redirect_uri: str) -> AuthorizationStart:
        """A fresh authentication request (URL, state, nonce, PKCE verifier)."""

    async def check_authorization_response_issuer(self, iss: str | None) -> None:
        """Refuse a callback's ``iss`` that is not the IdP's (RFC 9207)."""

    async def exchange_code(self, code: str, redirect_uri: str, code_verifier: str) -> TokenSet:
        """Redeem an authorization code."""

    def validate_id_token(
        self, id_token: str, *, nonce: str | None, expected_sub: str | None = None
    ) -> dict[str, Any]:
        """Validate an ID token and return its claims."""

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        """Read the userinfo claims."""

    async def refresh(self, refresh_token: str) -> TokenSet:
        """Refresh with the IdP."""

    async def ensure_signing_key(self, token: str) -> None:
        """Follow an IdP key rotation named by ``token``'s kid."""

    def validate_logout_token(self, token: str) -> dict[str, Any]:
        """Validate a back-channel logout token and return its claims."""

    def identity(self, claims: Mapping[str, Any], userinfo: Mapping[str, Any] | None) -> IdpIdentity:
        """Map claims to an identity."""

    def admit(self, identity: IdpIdentity) -> str | None:
        """None if admitted, else why not."""


if TYPE_CHECKING:
    # mypy checks that the real client satisfies the protocol the handlers are written against.
    def _conforms(client: OidcClient) -> IdentityProvider:
        return client


def utc_now() -> datetime:
    """The wall clock as an aware UTC datetime (the default :attr:`PortalDeps.clock`)."""
    return datetime.now(UTC)


def _always_healthy() -> bool:
    return True


def _never_revoked(_claims: Claims) -> bool:
    return False


class ReadinessCheck(Protocol):
    """One line of ``/readyz`` (:class:`authz.ops.health.CheckResult` satisfies this)."""

    @property
    def ok(self) -> bool: ...
    @property
    def detail(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PortalDeps:
    """What the portal needs from the process that runs it.

    ``oidc`` is None when the configuration has no ``oidc`` section: the sign-in endpoints then
    answer 503 ``temporarily_unavailable`` while discovery, JWKS and revocation keep working.
    ``clock`` returns an aware datetime (tests move it); ``healthy`` is False while the worker
    drains; ``readiness`` builds the ``/readyz`` report (None: ready unless draining).
    ``logouts`` lets back-channel logouts be accepted while PostgreSQL is unreachable; without it
    they need PostgreSQL (503 otherwise). ``verifier`` and ``is_revoked`` judge the gateway tokens
    on the bearer-authenticated endpoints (the client telemetry relay, ``/managed/settings``,
    ``GET /api/oauth/usage``) exactly as ext_authz does: the worker passes its own verifier and
    revocation set (without a verifier the telemetry endpoints drop everything, and
    ``/managed/settings`` builds one from ``keyset`` and ``sessions``); ``relay`` forwards the
    telemetry they accept (none: dropped). ``config_status`` is what ``/readyz`` reports under
    ``config`` (the running configuration's file hash, a reload's error; None: nothing).
    """

    config: GatewayConfig
    pool: Pool
    keyset: KeySet
    oidc: IdentityProvider | None
    clock: Callable[[], datetime] = field(default=utc_now)
    healthy: Callable[[], bool] = field(default=_always_healthy)
    logouts: BackchannelLogouts | None = None
    readiness: Callable[[], Awaitable[tuple[bool, Mapping[str, ReadinessCheck]]]] | None = None
    verifier: TokenVerifier | None = None
    is_revoked: Callable[[Claims], bool] = field(default=_never_revoked)
    relay: Relay | None = None
    config_status: Callable[[], Mapping[str, object]] | None = None


class PortalContext:
    """Everything a handler needs, derived once from :class:`PortalDeps`."""

    def __init__(self, deps: PortalDeps) -> None:
        config = deps.config
        self.deps = deps
        self.config = config
        self.pool = deps.pool
        self.keyset = deps.keyset
        self.oidc = deps.oidc
        self.logouts = deps.logouts
        self.public_url = config.portal.public_url.rstrip("/")
        origin = origin_of(self.public_url)
        if origin is None:
            raise ValueError("portal.public_url must be an http(s) URL")
        self.origin = origin
        # Cookies are Secure, and __Host- prefixed, whenever the browser reaches us over https
        # (RFC 6265bis §4.1.2.5, §4.1.3.2). A plain-http public URL is the loopback development
        # setup: browsers other than Chromium and Firefox keep no Secure cookie over http.
        self.secure_cookies = urlsplit(self.public_url).scheme == "https"
        self.csrf_cookie, self.browser_cookie = cookie_names(self.secure_cookies)
        self.callback_url = f"{self.public_url}/oauth/callback"
        self.limiter = RateLimiter(
            config.portal.user_code_attempts_per_minute, lambda: deps.clock().timestamp()
        )
        self.box = SecretBox(config.sessions.encryption_key) if config.sessions.encryption_key else None
        sessions = config.sessions
        self.verifier = deps.verifier or TokenVerifier(
            deps.keyset, issuer=sessions.issuer, audience=sessions.audience, clock_skew=sessions.clock_skew
        )
        # RFC 7009 §2.1 lets a client revoke a token it still holds even once expired: accept a
        # signature for as long as the session could live.
        self.revocation_verifier = TokenVerifier(
            deps.keyset,
            issuer=config.sessions.issuer,
            audience=config.sessions.audience,
            clock_skew=config.sessions.session_lifetime + config.sessions.access_token_ttl,
            cache_size=0,
        )
        # Origins the sign-in form may end up at: the browser follows our 303 to the IdP's
        # authorization endpoint, and CSP form-action applies to that redirect (CSP 3 §6.3.1).
        self.idp_origins: set[str] = set()
        self.authorization_origin_known = False
        if config.oidc is not None and (issuer := origin_of(config.oidc.issuer)) is not None:
            self.idp_origins.add(issuer)

    def reconfigure(self, config: GatewayConfig) -> None:
        """Serve from now on with a reloaded ``config``: its policies (managed settings, the usage
        document's caps), spend section and portal texts. Handlers read ``config`` once per
        request. What was derived here at start-up (URLs, cookies, keys, the code-entry limiter)
        comes from restart-only keys, which a reload keeps at their running values
        (authz.reload.scope)."""
        self.config = config

    def now(self) -> datetime:
        """The portal's clock."""
        return self.deps.clock()

    def bearer_claims(self, request: web.Request) -> Claims | None:
        """The claims of the request's one gateway token when it verifies and is not revoked, by
        the worker's own verifier (none given: None); the wall clock, as ext_authz's (the portal's
        clock is the sign-in flows' and the tests')."""
        if self.deps.verifier is None:
            return None
        try:
            return self.token_claims(request, time.time())
        except TokenError:
            return None

    def token_claims(self, request: web.Request, now: float) -> Claims:
        """The claims of the request's one gateway token (``Authorization: Bearer`` or
        ``x-api-key``, read by ext_authz's rules: :func:`authz.signin.tokens.bearer_token`);
        :class:`TokenError` when it is missing, ambiguous, does not verify or is revoked."""
        names = ("authorization", "x-api-key")
        headers = {name: request.headers[name] for name in names if name in request.headers}
        repeated = frozenset(name for name in names if len(request.headers.getall(name, [])) > 1)
        token = bearer_token(headers, repeated)
        if token is None:
            raise TokenError("missing")
        claims = self.verifier.verify(token, now)
        if self.deps.is_revoked(claims):
            raise TokenError("revoked")
        return claims

    async def audit(
        self,
        client_ip: str | None,
        user_agent: str | None,
        kind: str,
        outcome: str,
        reason: str | None = None,
        *,
        email: str | None = None,
        session_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record one audit event (who, from where, what happened and why)."""
        await store.audit(
            self.pool,
            kind=kind,
            outcome=outcome,
            reason=reason,
            email=email,
            session_id=session_id,
            client_ip=client_ip,
            user_agent=user_agent,
            detail=detail,
            now=self.now(),
        )

    def url(self, path: str) -> str:
        """An absolute URL under ``portal.public_url``."""
        return f"{self.public_url}{path}"

    def learn_idp_origin(self, authorization_url: str) -> None:
        """Allow the origin of the IdP's authorization endpoint in later pages' form-action."""
        origin = origin_of(authorization_url)
        if origin is not None:
            self.idp_origins.add(origin)
            self.authorization_origin_known = True
