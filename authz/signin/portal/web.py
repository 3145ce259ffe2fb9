"""The browser side of the device flow: the verification page, the IdP round trip, the approval.

``GET /device`` shows the code form (pre-filled from ``verification_uri_complete``, never
submitted for the user: RFC 8628 §5.4). ``POST /device`` checks the code and sends the browser to
the IdP (OIDC Core §3.1.2.1, PKCE per RFC 7636), with ``state`` bound to this browser by a cookie.
``GET /oauth/callback`` finishes the sign-in at the IdP and asks the user to approve;
``POST /device/approve`` creates the session and approves the device code.

Defences: state-changing POSTs must come from our own origin (the ``Origin`` header, or
``Referer`` without it) and carry a double-submit CSRF token; user-code entry is rate limited per
client address (RFC 8628 §5.1); the only redirect ever issued goes to the URL the OIDC client
built for the IdP's authorization endpoint, whatever ``next`` or ``redirect_uri`` parameters a
request carries; the callback refuses a response naming another issuer (RFC 9207); pages carry a
script-free Content-Security-Policy. Every refusal is audited.

Cookies (against session fixation): the CSRF and browser-binding values are always fresh random
values minted here, never taken from the request: the form page mints a CSRF value, and each
login step (code entry, callback, approval) mints new ones, re-binding the sign-in to the new
browser value in PostgreSQL; a value the server did not mint is never set back. Over https they
are ``__Host-`` cookies (RFC 6265bis §4.1.3.2: Secure, ``Path=/``, no ``Domain``), so a sibling
subdomain or a plain-http response cannot plant or overwrite them. A plain-http public URL (the
loopback development and test setups) gets the same cookies without the prefix and without
Secure, which browsers other than Chromium and Firefox do not store over http.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from authz.signin.oidc import IdpRefused, IdpUnavailable, OidcError
from authz.signin.portal import pages
from authz.signin.portal.admin import PURPOSE as ADMIN_PURPOSE
from authz.signin.portal.admin import AdminPages
from authz.signin.portal.device import (
    format_user_code,
    generate_secret,
    normalise_user_code,
    same_secret,
    secret_hash,
)
from authz.signin.portal.http import FormError, client_ip, idp_token_binding, origin_of, read_form, user_agent
from authz.store import sessions as store

if TYPE_CHECKING:
    from authz.signin.oidc import AuthorizationStart
    from authz.signin.portal.context import PortalContext

log = logging.getLogger("authz.signin.portal.web")

# The round trip to the IdP, and the wait on the approval page, are bounded well inside the
# device code's own lifetime.
AUTH_REQUEST_TTL = timedelta(minutes=10)
APPROVAL_TTL = timedelta(minutes=5)
BROWSER_COOKIE_MAX_AGE = 3600

# Our own cookie values are token_urlsafe(32): anything else is ignored and replaced.
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_PARAM = 512


def _cookie(request: web.Request, name: str) -> str | None:
    # Only compared with what the server stored or put in the form: never set back to the browser.
    value = request.cookies.get(name)
    return value if value is not None and _COOKIE_VALUE.fullmatch(value) else None


def content_security_policy(ctx: PortalContext) -> str:
    """A policy with no scripts at all; forms may post to us and (via our 303) to the IdP."""
    form_action = " ".join(["'self'", *sorted(ctx.idp_origins)])
    return (
        "default-src 'none'; style-src 'self' 'unsafe-inline'; "
        f"form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
    )


def _harden(ctx: PortalContext, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = content_security_policy(ctx)
    # Clickjacking: frame-ancestors for CSP-aware browsers, X-Frame-Options for the rest (RFC 7034).
    response.headers["X-Frame-Options"] = "DENY"
    # same-origin rather than no-referrer: under no-referrer browsers send `Origin: null` on our own
    # form POSTs (Fetch, "append a request Origin header"), which the same-origin check must refuse.
    # Nothing is sent to other origins either way, so the IdP never sees our URLs.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"


def harden(ctx: PortalContext, response: web.StreamResponse) -> None:
    """The portal's security headers (CSP without scripts, no framing, no caching), for other pages."""
    _harden(ctx, response)


def html(
    ctx: PortalContext, body: str, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """An HTML page with the portal's security headers."""
    response = web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=headers
    )
    _harden(ctx, response)
    return response


def unavailable(ctx: PortalContext) -> web.Response:
    """503: the IdP or the database cannot be reached."""
    return html(
        ctx,
        pages.error_page(
            "Sign-in unavailable", "Sign-in is temporarily unavailable. Try again in a few minutes."
        ),
        503,
    )


def _set_cookie(
    ctx: PortalContext, response: web.StreamResponse, name: str, value: str, *, samesite: str
) -> None:
    # Path=/ and no Domain: required of __Host- cookies, and host-only cookies elsewhere too.
    response.set_cookie(
        name,
        value,
        path="/",
        max_age=BROWSER_COOKIE_MAX_AGE,
        httponly=True,
        secure=ctx.secure_cookies,
        samesite=samesite,
    )


def _new_csrf(ctx: PortalContext, response: web.StreamResponse) -> str:
    """Mint a CSRF value and set its cookie. SameSite=Strict (RFC 6265bis §5.4.7): the cookie half
    of the token never rides a cross-site request."""
    csrf = generate_secret()
    _set_cookie(ctx, response, ctx.csrf_cookie, csrf, samesite="Strict")
    return csrf


def _new_browser(ctx: PortalContext, response: web.StreamResponse) -> str:
    """Mint a browser-binding value and set its cookie. SameSite=Lax: the browser must send it back
    on the IdP's cross-site redirect to /oauth/callback, a top-level GET navigation
    (RFC 6265bis §5.4.7.1); Strict would not."""
    browser = generate_secret()
    _set_cookie(ctx, response, ctx.browser_cookie, browser, samesite="Lax")
    return browser


def new_browser_cookie(ctx: PortalContext, response: web.StreamResponse) -> str:
    """Mint a browser-binding value for a sign-in that starts elsewhere (the admin page's)."""
    return _new_browser(ctx, response)


async def start_authorization(ctx: PortalContext) -> AuthorizationStart:
    """A fresh authentication request, reading the IdP's metadata first if not yet done."""
    oidc = ctx.oidc
    assert oidc is not None  # checked by the callers
    try:
        start = oidc.start_authorization(ctx.callback_url)
    except OidcError as exc:
        if exc.reason != "not_discovered":
            raise
        await oidc.discover()
        start = oidc.start_authorization(ctx.callback_url)
    ctx.learn_idp_origin(start.url)
    return start


def _end_cookies(ctx: PortalContext, response: web.StreamResponse) -> None:
    """Expire both cookies: the sign-in they bound is over. Secure is repeated, since a browser
    ignores a __Host- Set-Cookie without it, the expiring one included."""
    for name in (ctx.csrf_cookie, ctx.browser_cookie):
        response.del_cookie(name, path="/", secure=ctx.secure_cookies, httponly=True)


class BrowserPages:
    """Request handlers for the verification page and the IdP round trip."""

    def __init__(self, ctx: PortalContext) -> None:
        self._ctx = ctx
        self._admin = AdminPages(ctx)

    async def _audit(
        self,
        request: web.Request,
        kind: str,
        outcome: str,
        reason: str | None = None,
        *,
        email: str | None = None,
        session_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        await self._ctx.audit(
            client_ip(request),
            user_agent(request),
            kind,
            outcome,
            reason,
            email=email,
            session_id=session_id,
            detail=detail,
        )

    def _error(self, status: int, title: str, message: str) -> web.Response:
        return html(self._ctx, pages.error_page(title, message), status)

    def _form_page(self, *, user_code: str, error: str | None, status: int) -> web.Response:
        """The code form, with a freshly minted CSRF token in the form and in its cookie."""
        response = html(self._ctx, "", status)
        csrf = _new_csrf(self._ctx, response)
        response.text = pages.device_page(user_code=user_code, csrf=csrf, error=error)
        return response

    def _same_origin(self, request: web.Request) -> bool:
        """The POST came from a page of ours (RFC 6454 §7 Origin; Referer when Origin is absent)."""
        value = request.headers.get("Origin")
        if value is None:
            value = request.headers.get("Referer")
        if not value:
            return False
        return origin_of(value) == self._ctx.origin

    async def _check_post(
        self, request: web.Request, kind: str
    ) -> tuple[dict[str, str], web.Response | None]:
        """Parse a browser form and apply the same-origin and double-submit CSRF checks."""
        try:
            form = await read_form(request)
            values = {
                name: (form.get(name) or "")[:_MAX_PARAM]
                for name in ("user_code", "csrf", "approval_id", "decision")
            }
        except FormError:
            return {}, self._error(400, "Bad request", "The form could not be read. Start again.")
        if not self._same_origin(request):
            await self._audit(
                request,
                kind,
                "denied",
                "cross_origin",
                detail={"origin": request.headers.get("Origin", "")[:200]},
            )
            return values, self._error(
                403, "Request refused", "This form must be sent from the sign-in page itself."
            )
        cookie = _cookie(request, self._ctx.csrf_cookie)
        if cookie is None or not values["csrf"] or not same_secret(cookie, values["csrf"]):
            await self._audit(request, kind, "denied", "csrf_mismatch")
            return values, self._error(
                403, "Request refused", "The page expired. Open the sign-in link again."
            )
        return values, None

    async def _start(self) -> AuthorizationStart:
        """A fresh authentication request, reading the IdP's metadata first if not yet done."""
        return await start_authorization(self._ctx)

    # --- GET /device ------------------------------------------------------------------------------

    async def device_form(self, request: web.Request) -> web.Response:
        """Show the code form; a valid ``user_code`` query parameter only pre-fills it. Any other
        parameter (``next``, ``redirect_uri``, ...) is ignored: this page never redirects."""
        ctx = self._ctx
        if ctx.oidc is None:
            return unavailable(ctx)
        if not ctx.authorization_origin_known:
            # Learn the IdP's authorization endpoint for form-action before showing the form.
            try:
                await self._start()
            except OidcError as exc:
                log.warning("cannot read the IdP's metadata yet: %s", exc)
        normalised = normalise_user_code(request.query.get("user_code", ""))
        prefill = format_user_code(normalised) if normalised else ""
        return self._form_page(user_code=prefill, error=None, status=200)

    # --- POST /device -----------------------------------------------------------------------------

    async def device_submit(self, request: web.Request) -> web.Response:
        """Check the code, then send the browser to the IdP with a browser-bound ``state``."""
        ctx = self._ctx
        kind = "device_verify"
        values, refused = await self._check_post(request, kind)
        if refused is not None:
            return refused
        if ctx.oidc is None:
            return unavailable(ctx)
        ip = client_ip(request) or "unknown"
        # RFC 8628 §5.1: bound the rate of guesses per client; every attempt counts.
        if not ctx.limiter.allow(ip):
            retry = ctx.limiter.retry_after(ip)
            await self._audit(request, kind, "denied", "rate_limited")
            return html(ctx, pages.rate_limited_page(retry), 429, headers={"Retry-After": str(retry)})
        now = ctx.now()
        user_code = normalise_user_code(values["user_code"])
        if user_code is None:
            await self._audit(request, kind, "denied", "malformed_code")
            return self._form_page(
                user_code="",
                error="That is not a valid code. Check your terminal and try again.",
                status=400,
            )
        device = await store.find_device_by_user_code(ctx.pool, user_code, now)
        if device is None or device.status != "pending":
            reason = "unknown_code" if device is None else "code_not_pending"
            await self._audit(request, kind, "denied", reason)
            return self._form_page(
                user_code=format_user_code(user_code),
                error="That code is unknown, expired or already used. Start again in your terminal.",
                status=400,
            )
        try:
            start = await self._start()
        except OidcError as exc:
            await self._audit(request, kind, "error", "idp_unavailable", detail={"idp_reason": exc.reason})
            return unavailable(ctx)
        # 303 (RFC 9110 §15.4.4) turns the POST into a GET at the IdP. The target is the URL the OIDC
        # client built from the IdP's own authorization endpoint, never a request parameter.
        response = web.Response(status=303, headers={"Location": start.url})
        _harden(ctx, response)
        # A login step: fresh values, whatever the browser sent (a planted value is never bound).
        browser = _new_browser(ctx, response)
        _new_csrf(ctx, response)
        remaining = device.expires_at - now
        await store.create_auth_request(
            ctx.pool,
            state=start.state,
            # RFC 6749 §10.12 / RFC 9700 §4.7.1: state is bound to this browser; only the cookie's
            # hash is stored, so a database reader cannot replay the callback either.
            browser_hash=secret_hash(browser),
            user_code=user_code,
            nonce=start.nonce,
            code_verifier=start.code_verifier,
            ttl=min(AUTH_REQUEST_TTL, remaining),
            now=now,
        )
        await self._audit(request, kind, "ok", detail={"surface": device.surface})
        return response

    # --- GET /oauth/callback ----------------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.Response:
        """Finish the authorization code flow (OIDC Core §3.1.2.5-3.1.3.7) and ask for approval."""
        ctx = self._ctx
        kind = "callback"
        query = request.query
        state = query.get("state", "")[:_MAX_PARAM]
        if not state:
            await self._audit(request, kind, "denied", "state_missing")
            return self._error(400, "Sign-in failed", "The sign-in response is incomplete. Start again.")
        browser = _cookie(request, ctx.browser_cookie) or ""
        now = ctx.now()
        oidc = ctx.oidc
        if oidc is None:
            return unavailable(ctx)
        # Consumed first, before anything in the response is believed: an IdP error or a code
        # only counts for the browser that started this sign-in, and only once.
        auth = await store.consume_auth_request(ctx.pool, state, secret_hash(browser), now)
        if isinstance(auth, str):
            await self._audit(request, kind, "denied", auth)
            return self._error(
                400,
                "Sign-in failed",
                "This sign-in link is not valid in this browser, or was already used. Start again.",
            )
        # RFC 9207 §2.4: a response (an error one too) naming another issuer is a mix-up attack's.
        iss = query.get("iss")
        try:
            await oidc.check_authorization_response_issuer(iss)
        except IdpUnavailable as exc:
            await self._audit(request, kind, "error", "idp_unavailable", detail={"idp_reason": exc.reason})
            return unavailable(ctx)
        except OidcError as exc:
            detail = None if iss is None else {"iss": iss[:200]}
            await self._audit(request, kind, "denied", exc.reason, detail=detail)
            return self._error(
                400,
                "Sign-in failed",
                "The sign-in response did not come from your identity provider. Start again.",
            )
        error = query.get("error")
        if error is not None:
            error = error[:64]
            if error == "access_denied":
                # OIDC Core §3.1.2.6: the user (or the IdP's policy) declined.
                await store.deny_device(ctx.pool, auth.user_code, now)
                await self._audit(request, kind, "denied", "idp_access_denied")
                return self._error(
                    403, "Sign-in cancelled", "The sign-in was cancelled at your identity provider."
                )
            await self._audit(request, kind, "error", "idp_error", detail={"error": error})
            return self._error(
                400, "Sign-in failed", "Your identity provider reported an error. Start again."
            )
        code = query.get("code", "")[:4096]
        if not code:
            await self._audit(request, kind, "denied", "code_missing")
            return self._error(400, "Sign-in failed", "The sign-in response is incomplete. Start again.")
        try:
            tokens = await oidc.exchange_code(code, ctx.callback_url, auth.code_verifier)
            if tokens.id_token is None:
                raise OidcError("no_id_token", "the IdP returned no ID token")
            # OIDC Core §3.1.3.7, with the nonce of this (single-use) request.
            claims = oidc.validate_id_token(tokens.id_token, nonce=auth.nonce)
            userinfo = None
            if ctx.config.oidc is not None and ctx.config.oidc.use_userinfo and tokens.access_token:
                userinfo = await oidc.userinfo(tokens.access_token)
            identity = oidc.identity(claims, userinfo)
        except IdpUnavailable as exc:
            await self._audit(request, kind, "error", "idp_unavailable", detail={"idp_reason": exc.reason})
            return unavailable(ctx)
        except IdpRefused as exc:
            # A replayed or foreign authorization code is refused by the IdP (RFC 6749 §4.1.2).
            await self._audit(
                request, kind, "denied", "code_exchange_refused", detail={"idp_error": exc.reason}
            )
            return self._error(
                400, "Sign-in failed", "Your identity provider refused the sign-in. Start again."
            )
        except OidcError as exc:
            await self._audit(request, kind, "denied", exc.reason)
            return self._error(
                400, "Sign-in failed", "The sign-in response could not be verified. Start again."
            )
        refused = oidc.admit(identity)
        if auth.purpose == ADMIN_PURPOSE:
            # The admin page's sign-in (authz/signin/portal/admin.py): no device to approve.
            return await self._admin.signed_in(request, identity, refused)
        if refused is not None:
            await store.deny_device(ctx.pool, auth.user_code, now, email=identity.email)
            await self._audit(
                request, kind, "denied", refused, email=identity.email, detail={"sub": identity.sub}
            )
            return self._error(
                403,
                "Access not allowed",
                _ADMISSION_MESSAGES.get(refused, "This account may not use the gateway."),
            )
        assert identity.email is not None  # admit() refuses an identity without one
        device = await store.find_device_by_user_code(ctx.pool, auth.user_code, now)
        if device is None or device.status != "pending":
            await self._audit(request, kind, "denied", "code_not_pending", email=identity.email)
            return self._error(
                400, "Sign-in expired", "The code expired or was already used. Start again in your terminal."
            )
        sealed = None
        if tokens.refresh_token and ctx.box is not None:
            sealed = ctx.box.seal(
                tokens.refresh_token.encode("utf-8"), associated_data=idp_token_binding(identity.sub)
            )
        approval_id = generate_secret()
        response = html(ctx, "")
        # A login step: the approval is bound to a new browser value, and a new CSRF value (the
        # Strict one did not ride the IdP's cross-site redirect anyway).
        new_browser = _new_browser(ctx, response)
        csrf = _new_csrf(ctx, response)
        stored = await store.store_approval(
            ctx.pool,
            state=auth.state,
            approval_id=approval_id,
            browser_hash=secret_hash(new_browser),
            identity=store.VerifiedIdentity(
                sub=identity.sub,
                email=identity.email,
                groups=identity.groups,
                idp_sid=identity.sid,
                idp_refresh_token_enc=sealed,
            ),
            ttl=APPROVAL_TTL,
            now=now,
        )
        if not stored:
            await self._audit(request, kind, "denied", "approval_not_stored", email=identity.email)
            return self._error(400, "Sign-in failed", "This sign-in was already completed. Start again.")
        await self._audit(request, kind, "ok", email=identity.email)
        response.text = pages.approval_page(
            surface=device.surface,
            email=identity.email,
            user_code=format_user_code(auth.user_code),
            approval_id=approval_id,
            csrf=csrf,
        )
        return response

    # --- POST /device/approve ---------------------------------------------------------------------

    async def approve(self, request: web.Request) -> web.Response:
        """Approve (create the session) or deny the device code the signed-in user confirmed."""
        ctx = self._ctx
        kind = "approval"
        values, refused = await self._check_post(request, kind)
        if refused is not None:
            return refused
        decision = values["decision"]
        if decision not in ("approve", "deny") or not values["approval_id"]:
            return self._error(400, "Bad request", "The form could not be read. Start again.")
        now = ctx.now()
        browser = _cookie(request, ctx.browser_cookie) or ""
        taken = await store.take_approval(ctx.pool, values["approval_id"], secret_hash(browser), now)
        if isinstance(taken, str):
            await self._audit(request, kind, "denied", taken)
            return self._error(
                400, "Sign-in failed", "This approval is not valid in this browser, or was already used."
            )
        identity = taken.identity
        if decision == "deny":
            await store.deny_device(ctx.pool, taken.user_code, now, email=identity.email)
            await self._audit(request, kind, "denied", "user_denied", email=identity.email)
            response = html(ctx, pages.denied_page())
            _end_cookies(ctx, response)
            return response
        device = await store.find_device_by_user_code(ctx.pool, taken.user_code, now)
        if device is None or device.status != "pending":
            await self._audit(request, kind, "denied", "code_not_pending", email=identity.email)
            return self._error(
                400, "Sign-in expired", "The code expired or was already used. Start again in your terminal."
            )
        session = await store.create_session(
            ctx.pool,
            session_id=store.new_session_id(),
            sub=identity.sub,
            email=identity.email,
            groups=identity.groups,
            idp_sid=identity.idp_sid,
            idp_refresh_token_enc=identity.idp_refresh_token_enc,
            surface=device.surface,
            user_agent=device.user_agent,
            lifetime=timedelta(seconds=ctx.config.sessions.session_lifetime),
            now=now,
            # The device flow's first refresh token is drawn at the token poll (RFC 8628 §3.5),
            # so its clear value is never stored anywhere.
            refresh_token_hash=None,
        )
        if not await store.approve_device(ctx.pool, taken.user_code, session.id, identity.email, now):
            # The code expired or was decided between the check and now: the session must not live.
            await store.revoke_session(ctx.pool, session.id, "device_not_pending", now)
            await self._audit(
                request, kind, "denied", "code_not_pending", email=identity.email, session_id=session.id
            )
            return self._error(
                400, "Sign-in expired", "The code expired or was already used. Start again in your terminal."
            )
        await self._audit(request, kind, "ok", email=identity.email, session_id=session.id)
        response = html(ctx, pages.done_page(email=identity.email))
        # The last login step: the values that bound this sign-in are of no further use.
        _end_cookies(ctx, response)
        return response


_ADMISSION_MESSAGES = {
    "email_not_verified": "Your identity provider says your e-mail address is not verified.",
    "no_email": "Your identity provider did not share an e-mail address for your account.",
    "email_domain_not_allowed": "Accounts of your e-mail domain may not use this gateway.",
    "group_not_allowed": "Your account is in no group allowed to use this gateway. Ask your administrator.",
}
