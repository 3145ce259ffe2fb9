"""The portal application: sign-in pages and OAuth endpoints on Envoy's listener.

:func:`build_portal` assembles an aiohttp application from :class:`PortalDeps`. The handlers live
in :mod:`authz.portal.oauth` (JSON endpoints for clients: RFC 8414, 8628, 6749, 7009 and OIDC
Back-Channel Logout) and :mod:`authz.portal.web` (the browser pages of the device flow). All state
is in PostgreSQL, so any replica can serve any step; the only per-process state is the user-code
rate limiter, which is a brake on guessing, not a source of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from authz.configtypes import GatewayConfig
from authz.errors import StoreError
from authz.oidc import AuthorizationStart, IdpIdentity, OidcClient, TokenSet
from authz.portal import oauth
from authz.portal import web as pages_web
from authz.portal.device import RateLimiter
from authz.portal.oauth import origin_of
from authz.secretbox import SecretBox
from authz.store import sessions as store
from authz.store.db import Pool
from authz.tokens import KeySet, TokenVerifier

log = logging.getLogger("authz.portal")

# Forms and OAuth requests are a few hundred bytes; anything large is refused before parsing.
MAX_REQUEST_BYTES = 64 * 1024


class IdentityProvider(Protocol):
    """The public surface of :class:`authz.oidc.OidcClient` the portal uses (tests pass a stub)."""

    async def discover(self) -> None:
        """Read the IdP's metadata and keys."""

    def start_authorization(self, redirect_uri: str) -> AuthorizationStart:
        """A fresh authentication request (URL, state, nonce, PKCE verifier)."""

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


@dataclass(frozen=True, slots=True)
class PortalDeps:
    """What the portal needs from the process that runs it.

    ``oidc`` is None when the configuration has no ``oidc`` section: the sign-in endpoints then
    answer 503 ``temporarily_unavailable`` while discovery, JWKS and revocation keep working.
    ``clock`` returns an aware datetime (tests move it); ``healthy`` feeds ``/healthz`` (False
    while the worker drains).
    """

    config: GatewayConfig
    pool: Pool
    keyset: KeySet
    oidc: IdentityProvider | None
    clock: Callable[[], datetime] = field(default=utc_now)
    healthy: Callable[[], bool] = field(default=_always_healthy)


class PortalContext:
    """Everything a handler needs, derived once from :class:`PortalDeps`."""

    def __init__(self, deps: PortalDeps) -> None:
        config = deps.config
        self.deps = deps
        self.config = config
        self.pool = deps.pool
        self.keyset = deps.keyset
        self.oidc = deps.oidc
        self.public_url = config.portal.public_url.rstrip("/")
        origin = origin_of(self.public_url)
        if origin is None:
            raise ValueError("portal.public_url must be an http(s) URL")
        self.origin = origin
        # Cookies are Secure whenever the browser reaches us over https (RFC 6265bis §4.1.2.5);
        # tests on http://127.0.0.1 could not send them back otherwise.
        self.secure_cookies = urlsplit(self.public_url).scheme == "https"
        self.callback_url = f"{self.public_url}/oauth/callback"
        self.limiter = RateLimiter(
            config.portal.user_code_attempts_per_minute, lambda: deps.clock().timestamp()
        )
        self.box = SecretBox(config.sessions.encryption_key) if config.sessions.encryption_key else None
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

    def now(self) -> datetime:
        """The portal's clock."""
        return self.deps.clock()

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


PORTAL = web.AppKey("portal", PortalContext)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_json_path(path: str) -> bool:
    return path.startswith("/.well-known/") or (path.startswith("/oauth/") and path != "/oauth/callback")


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Failures in the caller's format: the OAuth endpoints only ever answer RFC 6749 §5.2 JSON
    (also for a wrong method or an oversized body), and PostgreSQL trouble is a 503."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not _is_json_path(request.path):
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return oauth.oauth_error("invalid_request", exc.status, allow)
    except StoreError as exc:
        log.warning("portal %s %s: %s", request.method, request.path, exc)
        if _is_json_path(request.path):
            return oauth.oauth_error("temporarily_unavailable", 503)
        return pages_web.unavailable(request.app[PORTAL])


def build_portal(deps: PortalDeps) -> web.Application:
    """The portal application: health, RFC 8414 discovery, JWKS, the device flow and revocation."""
    context = PortalContext(deps)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_errors])
    app[PORTAL] = context

    async def healthz(_request: web.Request) -> web.Response:
        if deps.healthy():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "draining"}, status=503)

    endpoints = oauth.OAuthEndpoints(context)
    browser = pages_web.BrowserPages(context)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/.well-known/oauth-authorization-server", endpoints.metadata)
    app.router.add_get("/.well-known/jwks.json", endpoints.jwks)
    app.router.add_post("/oauth/device_authorization", endpoints.device_authorization)
    app.router.add_post("/oauth/token", endpoints.token)
    app.router.add_post("/oauth/revoke", endpoints.revoke)
    app.router.add_post("/oauth/backchannel-logout", endpoints.backchannel_logout)
    app.router.add_get("/device", browser.device_form)
    app.router.add_post("/device", browser.device_submit)
    app.router.add_post("/device/approve", browser.approve)
    app.router.add_get("/oauth/callback", browser.callback)
    return app
