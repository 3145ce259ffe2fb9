"""The admin page: ``GET /admin`` (spend over time, top users, models and refusals for a period),
``GET /admin/usage.csv`` (the period's sums as CSV) and ``GET /admin/login`` (sign-in).

Admins sign in through the company IdP with the same OIDC code flow, client and redirect URI as the
device flow (:mod:`authz.signin.portal.web`); the auth request is marked ``admin`` so the shared
callback finishes it here. Members of ``portal.admin_groups`` then hold a cookie sealed with
``sessions.encryption_key`` (AES-GCM: email, groups, expiry; HttpOnly, SameSite=Lax, ``__Host-``
behind https) for ``portal.admin_session_ttl`` seconds; the groups are checked against the
configuration on every request. Anyone else signed in gets 403; nobody signed in is sent to sign
in. Every sign-in, refusal and export is audited.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from aiohttp import web

from authz.billing.usage_report import render_summary
from authz.signin.oidc import OidcError
from authz.signin.portal import admin_pages as pages
from authz.signin.portal.device import secret_hash
from authz.signin.portal.http import HOST_PREFIX, client_ip, user_agent
from authz.signin.secretbox import SecretBoxError
from authz.store import reports
from authz.store import sessions as store

if TYPE_CHECKING:
    from authz.signin.oidc import IdpIdentity
    from authz.signin.portal.context import PortalContext

log = logging.getLogger("authz.signin.portal.admin")

PURPOSE = "admin"
COOKIE = "gw_admin"
_SEALED_FOR = b"admin_session"
DEFAULT_DAYS = 30
MAX_DAYS = 366
TOP = 10
CSV_GROUPINGS = ("user", "group", "model", "day", "agent-session", "policy")


@dataclass(frozen=True, slots=True)
class Admin:
    """Who holds a valid admin cookie."""

    email: str
    groups: tuple[str, ...]


def cookie_name(ctx: PortalContext) -> str:
    """``__Host-gw_admin`` behind https (RFC 6265bis §4.1.3.2), ``gw_admin`` on plain-http loopback."""
    return f"{HOST_PREFIX}{COOKIE}" if ctx.secure_cookies else COOKIE


def period_of(query: dict[str, str], today: date) -> pages.Period:
    """The period the page shows: ``from`` and ``to`` (ISO dates, inclusive), by default the last
    30 days; ValueError for dates that do not parse, run backwards or span more than a year."""
    end = date.fromisoformat(query["to"]) if query.get("to") else today
    start = date.fromisoformat(query["from"]) if query.get("from") else end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end or (end - start).days >= MAX_DAYS:
        raise ValueError("the period must run forwards and span at most a year")
    return pages.Period(start, end)


class AdminPages:
    """Handlers of the admin area."""

    def __init__(self, ctx: PortalContext) -> None:
        self._ctx = ctx

    # --- who is asking ------------------------------------------------------------------------

    def _admin(self, request: web.Request) -> Admin | None:
        ctx = self._ctx
        value = request.cookies.get(cookie_name(ctx))
        if not value or ctx.box is None:
            return None
        try:
            data = json.loads(ctx.box.open(base64.urlsafe_b64decode(value), associated_data=_SEALED_FOR))
        except (SecretBoxError, binascii.Error, ValueError):
            return None
        if not isinstance(data, dict) or float(data.get("exp", 0)) <= ctx.now().timestamp():
            return None
        return Admin(email=str(data.get("email", "")), groups=tuple(str(g) for g in data.get("groups", [])))

    def _allowed(self, admin: Admin) -> bool:
        return bool(set(admin.groups) & set(self._ctx.config.portal.admin_groups))

    async def _authorize(self, request: web.Request, kind: str) -> Admin | web.Response:
        """The admin, or the response for someone who is not one (sign in, or 403)."""
        admin = self._admin(request)
        if admin is None:
            # 303 to a GET that starts the sign-in: never a redirect to a URL from the request.
            return _harden(self._ctx, web.Response(status=303, headers={"Location": "/admin/login"}))
        if not self._allowed(admin):
            await self._audit(request, kind, "denied", "not_admin", email=admin.email)
            return self._page(403, pages.message_page("Not an administrator", _NOT_ADMIN))
        return admin

    # --- GET /admin -------------------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.Response:
        """The period's spend chart, totals and top lists."""
        admin = await self._authorize(request, "admin_view")
        if isinstance(admin, web.Response):
            return admin
        try:
            period = period_of(dict(request.query), self._ctx.now().date())
        except ValueError as exc:
            return self._page(400, pages.message_page("Bad period", str(exc)))
        since, until = _bounds(period)
        pool = self._ctx.pool
        report = pages.Report(
            period=period,
            days=await reports.usage_summary(pool, "day", since=since, until=until),
            users=await reports.usage_summary(pool, "user", since=since, until=until, limit=TOP),
            models=await reports.usage_summary(pool, "model", since=since, until=until, limit=TOP),
            denials=await reports.denial_reasons(pool, since=since, until=until, limit=TOP),
        )
        return self._page(200, pages.dashboard_page(report, signed_in_as=admin.email))

    # --- GET /admin/usage.csv ---------------------------------------------------------------------

    async def export(self, request: web.Request) -> web.Response:
        """The period's sums per user (or ``by`` group, model, day, agent session, policy) as CSV."""
        admin = await self._authorize(request, "admin_export")
        if isinstance(admin, web.Response):
            return admin
        by = request.query.get("by", "user")
        try:
            if by not in CSV_GROUPINGS:
                raise ValueError(f"by must be one of {', '.join(CSV_GROUPINGS)}")
            period = period_of(dict(request.query), self._ctx.now().date())
        except ValueError as exc:
            return self._page(400, pages.message_page("Bad request", str(exc)))
        since, until = _bounds(period)
        rows = await reports.usage_summary(self._ctx.pool, by, since=since, until=until)
        await self._audit(
            request,
            "admin_export",
            "ok",
            email=admin.email,
            detail={"by": by, "from": str(period.start), "to": str(period.end)},
        )
        filename = f"gateway-usage-by-{by}-{period.start}-{period.end}.csv"
        response = web.Response(
            text=render_summary(by, rows, "csv"),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
        return _harden(self._ctx, response)

    # --- GET /admin/login -------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Send the browser to the IdP, with an admin auth request bound to it by a fresh cookie."""
        from authz.signin.portal import web as browser_pages

        ctx = self._ctx
        if ctx.oidc is None or ctx.box is None:
            return browser_pages.unavailable(ctx)
        try:
            start = await browser_pages.start_authorization(ctx)
        except OidcError as exc:
            await self._audit(
                request, "admin_signin", "error", "idp_unavailable", detail={"idp_reason": exc.reason}
            )
            return browser_pages.unavailable(ctx)
        response = _harden(ctx, web.Response(status=303, headers={"Location": start.url}))
        browser = browser_pages.new_browser_cookie(ctx, response)
        now = ctx.now()
        await store.create_auth_request(
            ctx.pool,
            state=start.state,
            browser_hash=secret_hash(browser),
            user_code="",
            nonce=start.nonce,
            code_verifier=start.code_verifier,
            ttl=browser_pages.AUTH_REQUEST_TTL,
            now=now,
            purpose=PURPOSE,
        )
        return response

    async def signed_in(
        self, request: web.Request, identity: IdpIdentity, refused: str | None
    ) -> web.Response:
        """Finish an admin sign-in at the callback: the cookie for members of ``portal.admin_groups``
        (whom admission also admits), 403 for anyone else."""
        ctx = self._ctx
        email = identity.email or identity.sub
        admin = Admin(email=email, groups=identity.groups)
        if refused is not None or not self._allowed(admin):
            reason = refused or "not_admin"
            await self._audit(
                request, "admin_signin", "denied", reason, email=email, detail={"sub": identity.sub}
            )
            return self._page(403, pages.message_page("Not an administrator", _NOT_ADMIN))
        assert ctx.box is not None  # login() refuses to start without it
        ttl = ctx.config.portal.admin_session_ttl
        sealed = ctx.box.seal(
            json.dumps(
                {"email": email, "groups": list(identity.groups), "exp": ctx.now().timestamp() + ttl}
            ).encode(),
            associated_data=_SEALED_FOR,
        )
        await self._audit(request, "admin_signin", "ok", email=email)
        response = _harden(ctx, web.Response(status=303, headers={"Location": "/admin"}))
        # SameSite=Lax: the cookie must ride the 303 that ends the IdP's cross-site redirect chain.
        response.set_cookie(
            cookie_name(ctx),
            base64.urlsafe_b64encode(sealed).decode("ascii"),
            path="/",
            max_age=ttl,
            httponly=True,
            secure=ctx.secure_cookies,
            samesite="Lax",
        )
        return response

    # --- helpers ----------------------------------------------------------------------------------

    def _page(self, status: int, body: str) -> web.Response:
        response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
        return _harden(self._ctx, response)

    async def _audit(
        self,
        request: web.Request,
        kind: str,
        outcome: str,
        reason: str | None = None,
        *,
        email: str | None = None,
        detail: dict[str, str] | None = None,
    ) -> None:
        await self._ctx.audit(
            client_ip(request), user_agent(request), kind, outcome, reason, email=email, detail=detail
        )


_NOT_ADMIN = "Your account may not see the gateway's usage. Ask to be added to an admin group."


def _bounds(period: pages.Period) -> tuple[datetime, datetime]:
    start = datetime(period.start.year, period.start.month, period.start.day, tzinfo=UTC)
    end = datetime(period.end.year, period.end.month, period.end.day, tzinfo=UTC) + timedelta(days=1)
    return start, end


def _harden(ctx: PortalContext, response: web.Response) -> web.Response:
    from authz.signin.portal.web import harden

    harden(ctx, response)
    return response
