"""The portal application: sign-in pages and OAuth endpoints on Envoy's listener.

:func:`build_portal` assembles an aiohttp application from :class:`PortalDeps`. The handlers live
in :mod:`authz.signin.portal.oauth` (JSON endpoints for clients: RFC 8414, 8628, 6749, 7009 and OIDC
Back-Channel Logout) and :mod:`authz.signin.portal.web` (the browser pages of the device flow). All state
is in PostgreSQL, so any replica can serve any step; the only per-process state is the user-code
rate limiter, which is a brake on guessing, not a source of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from authz.errors import StoreError
from authz.signin.portal import oauth, usage
from authz.signin.portal import web as pages_web
from authz.signin.portal.admin import AdminPages
from authz.signin.portal.context import PortalContext, PortalDeps, ReadinessCheck
from authz.signin.portal.http import anthropic_error, oauth_error
from authz.signin.portal.managed import MANAGED_SETTINGS_PATH, ManagedSettingsEndpoint
from authz.signin.portal.telemetry import TelemetryEndpoints

log = logging.getLogger("authz.signin.portal")

# Forms and OAuth requests are a few hundred bytes; anything large is refused before parsing.
MAX_REQUEST_BYTES = 64 * 1024


PORTAL = web.AppKey("portal", PortalContext)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_json_path(path: str) -> bool:
    return path.startswith("/.well-known/") or (path.startswith("/oauth/") and path != "/oauth/callback")


def _envelope_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """An aiohttp refusal (wrong method, oversized body) in the Anthropic envelope."""
    if exc.status == 405:
        kind, message = "invalid_request_error", f"{request.method} is not supported here; use GET."
    elif exc.status == 413:
        kind, message = "request_too_large", exc.reason
    else:
        kind, message = ("invalid_request_error" if exc.status < 500 else "api_error"), exc.reason
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return anthropic_error(exc.status, kind, message, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Failures in the caller's format: the OAuth endpoints only ever answer RFC 6749 §5.2 JSON
    (also for a wrong method or an oversized body), the bearer-authenticated ``/managed/settings``
    the Anthropic error envelope, and PostgreSQL trouble is a 503."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path == MANAGED_SETTINGS_PATH:
            return _envelope_error(request, exc)
        if exc.status < 400 or not _is_json_path(request.path):
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return oauth_error("invalid_request", exc.status, allow)
    except StoreError as exc:
        log.warning("portal %s %s: %s", request.method, request.path, exc)
        if _is_json_path(request.path):
            return oauth_error("temporarily_unavailable", 503)
        return pages_web.unavailable(request.app[PORTAL])


def build_portal(deps: PortalDeps) -> web.Application:
    """The portal application: health, RFC 8414 discovery, JWKS, the device flow, revocation, the
    admin page, the client telemetry relay and Claude Code's managed settings."""
    context = PortalContext(deps)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_errors])
    app[PORTAL] = context

    async def healthz(_request: web.Request) -> web.Response:
        # Liveness only: a draining worker is alive, and must not be restarted mid-drain.
        return web.json_response({"status": "ok" if deps.healthy() else "draining"})

    async def readyz(_request: web.Request) -> web.Response:
        # Readiness (authz.ops.health): 503 with the failing checks, and while draining.
        checks: Mapping[str, ReadinessCheck] = {}
        if deps.readiness is None:
            ready = deps.healthy()
        else:
            ready, checks = await deps.readiness()
        if not deps.healthy():
            ready = False
        body: dict[str, object] = {
            "status": "ready" if ready else ("draining" if not deps.healthy() else "not_ready"),
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in sorted(checks.items())},
        }
        if deps.config_status is not None:
            # The running configuration's file hash: which version each replica serves.
            body["config"] = dict(deps.config_status())
        return web.json_response(body, status=200 if ready else 503)

    endpoints = oauth.OAuthEndpoints(context)
    browser = pages_web.BrowserPages(context)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
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
    admin = AdminPages(context)
    app.router.add_get("/admin", admin.dashboard)
    app.router.add_get("/admin/login", admin.login)
    app.router.add_get("/admin/usage.csv", admin.export)
    relayed = TelemetryEndpoints(context)
    app.router.add_post("/v1/{signal:metrics|logs|traces}", relayed.export)
    managed = ManagedSettingsEndpoint(context)
    app.router.add_get(MANAGED_SETTINGS_PATH, managed.get)
    app.router.add_get("/api/oauth/usage", usage.UsageEndpoint(context).get)
    return app
