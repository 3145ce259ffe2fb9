"""The OAuth endpoints Claude Code's gateway sign-in talks to, and the IdP's back-channel logout.

RFC 8414 metadata, the JWK Set, RFC 8628 device authorization, the RFC 6749 token endpoint (device
code and refresh token grants), RFC 7009 revocation and OIDC Back-Channel Logout 1.0. Every answer
is JSON (errors as RFC 6749 §5.2 objects), carries ``Cache-Control: no-store`` and never redirects;
every outcome that changes or refuses something is audited with the client's User-Agent and
address.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from authz.errors import StoreError, TokenError
from authz.signin.backchannel import LOGOUT_REASON, write_logout
from authz.signin.idtoken import ID_TOKEN_REASONS, LOGOUT_TOKEN_MAX_AGE
from authz.signin.oidc import IdpRefused, IdpUnavailable, OidcError
from authz.signin.portal.device import (
    generate_device_code,
    generate_secret,
    generate_user_code,
    normalise_user_code,
    secret_hash,
)
from authz.signin.portal.http import (
    NO_STORE,
    FormError,
    client_ip,
    idp_token_binding,
    oauth_error,
    oauth_json,
    read_form,
    user_agent,
)
from authz.signin.secretbox import SecretBoxError
from authz.signin.tokens import mint
from authz.store import sessions as store
from authz.store.logout_spool import SpooledLogout, new_entry_id

if TYPE_CHECKING:
    from authz.signin.portal.context import PortalContext

log = logging.getLogger("authz.signin.portal.oauth")

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_TOKEN_GRANT = "refresh_token"  # noqa: S105 -- an RFC 6749 §6 grant type name, not a secret

# What is kept of a client-supplied surface name in rows and logs.
MAX_SURFACE = 64

# A user code collides with a live one about once in 20^8 / (live codes) draws; a few retries make
# a failure to allocate practically impossible without looping forever on a broken store.
_USER_CODE_ATTEMPTS = 8

# Reasons from the IdP's answer at refresh that mean "this is not (or no longer) the user": the
# session ends. Anything else the IdP does wrong is treated as it being unavailable.
_REFUSING_REASONS = ID_TOKEN_REASONS | {"userinfo_sub_mismatch"}


@dataclass(frozen=True, slots=True)
class _Caller:
    ip: str | None
    user_agent: str | None


class _Refusal(Exception):
    """The refresh must end the session: the IdP (or admission) says this user may not continue."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class OAuthEndpoints:
    """Request handlers for the JSON endpoints; one instance per application."""

    def __init__(self, ctx: PortalContext) -> None:
        self._ctx = ctx

    async def _audit(
        self,
        caller: _Caller,
        kind: str,
        outcome: str,
        reason: str | None = None,
        *,
        email: str | None = None,
        session_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        await self._ctx.audit(
            caller.ip,
            caller.user_agent,
            kind,
            outcome,
            reason,
            email=email,
            session_id=session_id,
            detail=detail,
        )

    # --- discovery ------------------------------------------------------------------------------

    async def metadata(self, _request: web.Request) -> web.Response:
        """RFC 8414 §2 authorization server metadata; URLs are under ``portal.public_url``."""
        ctx = self._ctx
        body = {
            # RFC 8414 §2: the issuer identifier; it is also the access tokens' `iss`.
            "issuer": ctx.config.sessions.issuer,
            "device_authorization_endpoint": ctx.url("/oauth/device_authorization"),
            "token_endpoint": ctx.url("/oauth/token"),
            "revocation_endpoint": ctx.url("/oauth/revoke"),
            "jwks_uri": ctx.url("/.well-known/jwks.json"),
            "grant_types_supported": [DEVICE_CODE_GRANT, REFRESH_TOKEN_GRANT],
            # No authorization endpoint is offered to clients: only the device flow signs in.
            "response_types_supported": [],
            # Public clients (RFC 6749 §2.1): Claude Code holds no client secret.
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
        }
        return web.json_response(body, headers={"Cache-Control": "public, max-age=300"})

    async def jwks(self, _request: web.Request) -> web.Response:
        """The public keys that verify gateway access tokens (RFC 7517 §5)."""
        return web.json_response(
            self._ctx.keyset.jwks(),
            content_type="application/jwk-set+json",
            headers={"Cache-Control": "public, max-age=300"},
        )

    # --- device authorization (RFC 8628 §3.1-3.2) --------------------------------------------------

    async def device_authorization(self, request: web.Request) -> web.Response:
        """Issue a device code and user code. No client_id or scope is required (Claude Code sends
        neither); the optional ``surface`` is recorded and other parameters are ignored."""
        ctx = self._ctx
        caller = _Caller(client_ip(request), user_agent(request))
        try:
            form = await read_form(request)
            surface = form.get("surface")
        except FormError:
            return oauth_error("invalid_request")
        if ctx.oidc is None:
            return oauth_error("temporarily_unavailable", 503)
        surface = surface[:MAX_SURFACE] if surface else None
        now = ctx.now()
        portal = ctx.config.portal
        device_code = generate_device_code()
        for _ in range(_USER_CODE_ATTEMPTS):
            user_code = generate_user_code()
            row = await store.create_device_code(
                ctx.pool,
                # RFC 8628 §5.2: the device code is a bearer secret; only its hash is stored.
                device_code_hash=secret_hash(device_code),
                user_code=normalise_user_code(user_code) or "",
                ttl=timedelta(seconds=portal.device_code_ttl),
                interval=portal.device_poll_interval,
                surface=surface,
                user_agent=caller.user_agent,
                client_ip=caller.ip,
                now=now,
            )
            if row is not None:
                break
        else:
            log.error("could not allocate a free user code in %d attempts", _USER_CODE_ATTEMPTS)
            return oauth_error("temporarily_unavailable", 503)
        await self._audit(caller, "device_authorization", "ok", detail={"surface": surface})
        # RFC 8628 §3.2 response parameters.
        body: dict[str, Any] = {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": ctx.url("/device"),
            "verification_uri_complete": ctx.url(f"/device?user_code={user_code}"),
            "expires_in": portal.device_code_ttl,
            "interval": portal.device_poll_interval,
        }
        if portal.login_notice is not None:
            # Claude Code's extension: plain text shown beside the code on its sign-in screen.
            body["login_notice"] = portal.login_notice
        return oauth_json(body)

    # --- token endpoint (RFC 6749 §3.2, RFC 8628 §3.4-3.5) -----------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        """The device code and refresh token grants."""
        caller = _Caller(client_ip(request), user_agent(request))
        try:
            form = await read_form(request)
            grant_type = form.get("grant_type")
            device_code = form.get("device_code")
            refresh_token = form.get("refresh_token")
        except FormError:
            return oauth_error("invalid_request")
        if grant_type == DEVICE_CODE_GRANT:
            if not device_code:
                return oauth_error("invalid_request")
            if self._ctx.oidc is None:
                return oauth_error("temporarily_unavailable", 503)
            return await self._device_code_grant(caller, device_code)
        if grant_type == REFRESH_TOKEN_GRANT:
            if not refresh_token:
                return oauth_error("invalid_request")
            if self._ctx.oidc is None:
                return oauth_error("temporarily_unavailable", 503)
            return await self._refresh_grant(caller, refresh_token)
        if not grant_type:
            return oauth_error("invalid_request")
        await self._audit(
            caller, "token", "denied", "unsupported_grant_type", detail={"grant_type": grant_type[:100]}
        )
        return oauth_error("unsupported_grant_type")

    def _tokens(
        self, session: store.Session, groups: tuple[str, ...], refresh_token: str, now: datetime
    ) -> web.Response:
        """RFC 6749 §5.1 success, plus the account's ``email`` that Claude Code shows."""
        sessions = self._ctx.config.sessions
        access = mint(
            self._ctx.keyset,
            issuer=sessions.issuer,
            audience=sessions.audience,
            sub=session.sub,
            email=session.email,
            groups=groups,
            sid=session.id,
            ttl=sessions.access_token_ttl,
            now=now.timestamp(),
            # What a back-channel logout is matched on while PostgreSQL is unreachable.
            auth_time=session.created_at.timestamp(),
            idp_sid=session.idp_sid,
        )
        return oauth_json(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": sessions.access_token_ttl,
                "refresh_token": refresh_token,
                "email": session.email,
            }
        )

    async def _device_code_grant(self, caller: _Caller, device_code: str) -> web.Response:
        ctx = self._ctx
        now = ctx.now()
        # The session's first refresh token is drawn here and recorded by hash in the same
        # transaction that consumes the code: its clear value exists only in this response.
        refresh_token = generate_secret()
        result = await store.poll_device(
            ctx.pool, secret_hash(device_code), now, refresh_token_hash=secret_hash(refresh_token)
        )
        if result.error is not None or result.session is None:
            error = result.error or "invalid_grant"
            # authorization_pending is the normal wait, every few seconds: not worth a row each.
            if error != "authorization_pending":
                await self._audit(caller, "token", "denied", error, detail={"grant_type": "device_code"})
            # RFC 8628 §3.5: these are RFC 6749 §5.2 error responses, HTTP 400.
            return oauth_error(error)
        session = result.session
        await self._audit(
            caller,
            "token",
            "ok",
            email=session.email,
            session_id=session.id,
            detail={"grant_type": "device_code"},
        )
        return self._tokens(session, session.groups, refresh_token, now)

    async def _refresh_grant(self, caller: _Caller, refresh_token: str) -> web.Response:
        """Rotate the refresh token after asking the IdP again (issue 3, scope 5).

        The IdP is asked *before* the presented token is spent: when it cannot be reached the
        client gets ``temporarily_unavailable`` and may retry with the same token, which would
        otherwise count as reuse and end the session.
        """
        ctx = self._ctx
        now = ctx.now()
        old_hash = secret_hash(refresh_token)
        session_id = await store.session_id_for_refresh_token(ctx.pool, old_hash)
        session = await store.get_session(ctx.pool, session_id) if session_id is not None else None
        if session is None or not session.is_active(now):
            reason = (
                "unknown_refresh_token" if session is None else (session.revoked_reason or "session_expired")
            )
            await self._audit(caller, "refresh", "denied", reason, session_id=session_id)
            return oauth_error("invalid_grant", 401)
        if ctx.logouts is not None and ctx.logouts.revocations.logged_out(
            session.sub, session.idp_sid, session.created_at.timestamp()
        ):
            # A back-channel logout still waiting in the journal (PostgreSQL was down when it came).
            await store.revoke_session(ctx.pool, session.id, LOGOUT_REASON, now)
            await self._audit(
                caller, "refresh", "denied", LOGOUT_REASON, email=session.email, session_id=session.id
            )
            return oauth_error("invalid_grant", 401)

        groups = session.groups
        new_idp_token: bytes | None = None
        rechecked = True
        try:
            groups, new_idp_token = await self._recheck_idp(session)
        except _Refusal as refusal:
            await store.revoke_session(ctx.pool, session.id, refusal.reason, now)
            await self._audit(
                caller, "refresh", "denied", refusal.reason, email=session.email, session_id=session.id
            )
            return oauth_error("invalid_grant", 401)
        except IdpUnavailable as exc:
            grace = ctx.config.oidc.refresh_grace if ctx.config.oidc is not None else 0
            within = grace > 0 and now - session.last_refresh_at <= timedelta(seconds=grace)
            await self._audit(
                caller,
                "refresh",
                "ok" if within else "error",
                "idp_unavailable_grace" if within else "idp_unavailable",
                email=session.email,
                session_id=session.id,
                detail={"idp_reason": exc.reason},
            )
            if not within:
                return oauth_error("temporarily_unavailable", 503)
            rechecked = False

        new_refresh = generate_secret()
        rotated = await store.rotate_refresh_token(ctx.pool, old_hash, secret_hash(new_refresh), now)
        if rotated.status != "ok" or rotated.session is None:
            # "reused": rotate_refresh_token has revoked the session (RFC 9700 §4.14.2).
            reason = store.REFRESH_TOKEN_REUSE if rotated.status == "reused" else "invalid_refresh_token"
            await self._audit(caller, "refresh", "denied", reason, email=session.email, session_id=session.id)
            return oauth_error("invalid_grant", 401)
        current: store.Session | None = rotated.session
        if rechecked:
            current = await store.update_session_after_refresh(
                ctx.pool, session.id, groups, new_idp_token, now
            )
        if current is None:
            await self._audit(caller, "refresh", "denied", "session_inactive", session_id=session.id)
            return oauth_error("invalid_grant", 401)
        if rechecked:
            await self._audit(caller, "refresh", "ok", email=current.email, session_id=current.id)
        return self._tokens(current, groups, new_refresh, now)

    async def _recheck_idp(self, session: store.Session) -> tuple[tuple[str, ...], bytes | None]:
        """Refresh with the IdP using the session's sealed IdP refresh token; return the groups and
        the IdP's rotated refresh token, sealed. _Refusal when the user may not continue;
        IdpUnavailable when the IdP could not say."""
        ctx = self._ctx
        oidc = ctx.oidc
        assert oidc is not None  # checked by the caller
        if session.idp_refresh_token_enc is None or ctx.box is None:
            # Without an IdP refresh token (no offline_access) a disabled user could not be noticed.
            raise _Refusal("no_idp_refresh_token")
        binding = idp_token_binding(session.sub)
        try:
            idp_refresh = ctx.box.open(session.idp_refresh_token_enc, associated_data=binding).decode("utf-8")
        except (SecretBoxError, UnicodeDecodeError) as exc:
            log.warning("session %s: the stored IdP refresh token cannot be opened: %s", session.id, exc)
            raise _Refusal("idp_token_unreadable") from exc
        try:
            tokens = await oidc.refresh(idp_refresh)
            userinfo = None
            if ctx.config.oidc is not None and ctx.config.oidc.use_userinfo and tokens.access_token:
                userinfo = await oidc.userinfo(tokens.access_token)
            claims: dict[str, Any] | None = None
            if tokens.id_token is not None:
                # OIDC Core §12.2: no nonce on a refreshed ID token, and the same sub.
                claims = oidc.validate_id_token(tokens.id_token, nonce=None, expected_sub=session.sub)
            elif userinfo is not None:
                claims = {"sub": session.sub}
            groups = session.groups
            if claims is not None:
                identity = oidc.identity(claims, userinfo)
                # A refreshed ID token may omit the email (OIDC Core §12.2 lists no required
                # claims beyond §2's): keep the one the user signed in with, never a verified flag.
                if identity.email is None:
                    identity = replace(identity, email=session.email)
                refused = oidc.admit(identity)
                if refused is not None:
                    raise _Refusal(refused)
                groups = identity.groups
        except IdpRefused as exc:
            raise _Refusal("idp_refused") from exc
        except IdpUnavailable:
            raise
        except OidcError as exc:
            if exc.reason in _REFUSING_REASONS:
                raise _Refusal(f"idp_{exc.reason}") from exc
            raise IdpUnavailable(exc.reason, str(exc)) from exc
        sealed = (
            ctx.box.seal(tokens.refresh_token.encode("utf-8"), associated_data=binding)
            if tokens.refresh_token
            else None
        )
        return groups, sealed

    # --- revocation (RFC 7009) ----------------------------------------------------------------------

    async def revoke(self, request: web.Request) -> web.Response:
        """Revoke the session behind an access or refresh token; 200 even for unknown tokens."""
        ctx = self._ctx
        caller = _Caller(client_ip(request), user_agent(request))
        try:
            form = await read_form(request)
            token = form.get("token")
            hint = form.get("token_type_hint")
        except FormError:
            return oauth_error("invalid_request")
        if not token:
            # RFC 7009 §2.1: `token` is REQUIRED; §2.2.1 errors are RFC 6749 §5.2 ones.
            return oauth_error("invalid_request")
        now = ctx.now()
        # RFC 7009 §2.1: the hint only orders the lookups; the other kind is tried too.
        lookups = [self._access_sid, self._refresh_sid]
        if hint == "refresh_token":
            lookups.reverse()
        session_id = None
        for lookup in lookups:
            session_id = await lookup(token, now)
            if session_id is not None:
                break
        if session_id is None:
            await self._audit(caller, "revoke", "ok", "unknown_token")
        else:
            revoked = await store.revoke_session(ctx.pool, session_id, "rfc7009", now)
            await self._audit(
                caller, "revoke", "ok", None if revoked else "already_inactive", session_id=session_id
            )
        # RFC 7009 §2.2: 200 whether or not the token was valid; the body is ignored.
        return web.Response(status=200, headers=NO_STORE)

    async def _access_sid(self, token: str, now: datetime) -> str | None:
        if token.count(".") != 2:
            return None
        try:
            return self._ctx.revocation_verifier.verify(token, now.timestamp()).sid
        except TokenError:
            return None

    async def _refresh_sid(self, token: str, _now: datetime) -> str | None:
        return await store.session_id_for_refresh_token(self._ctx.pool, secret_hash(token))

    # --- OIDC Back-Channel Logout 1.0 ------------------------------------------------------------

    async def backchannel_logout(self, request: web.Request) -> web.Response:
        """Revoke the sessions a valid logout token names (§2.5-2.8), PostgreSQL or not.

        The answer is 200 once the logout is durable: in PostgreSQL, or in the local journal while
        PostgreSQL does not answer (:mod:`authz.signin.backchannel`); the IdP does not retry.
        Audit rows are best effort here, since this must work without the database.
        """
        ctx = self._ctx
        caller = _Caller(client_ip(request), user_agent(request))
        try:
            form = await read_form(request)
            token = form.get("logout_token")
        except FormError:
            token = None
        if not token:
            await self._audit_if_possible(caller, "backchannel_logout", "denied", "logout_token_missing")
            return oauth_error("invalid_request")
        oidc = ctx.oidc
        if oidc is None:
            return oauth_error("temporarily_unavailable", 503)
        now = ctx.now()
        try:
            await oidc.ensure_signing_key(token)
            claims = oidc.validate_logout_token(token)
        except IdpUnavailable as exc:
            await self._audit_if_possible(
                caller, "backchannel_logout", "error", "idp_unavailable", detail={"idp_reason": exc.reason}
            )
            return oauth_error("temporarily_unavailable", 503)
        except OidcError as exc:
            # §2.8: a logout token that fails validation gets 400.
            await self._audit_if_possible(caller, "backchannel_logout", "denied", exc.reason)
            return oauth_error("invalid_request")
        # §2.6 step 7: refuse a jti already seen; remember it as long as the token could still pass.
        skew = ctx.config.oidc.clock_skew if ctx.config.oidc is not None else 0
        until = float(claims["iat"]) + LOGOUT_TOKEN_MAX_AGE
        if isinstance(claims.get("exp"), int | float) and not isinstance(claims.get("exp"), bool):
            until = max(until, float(claims["exp"]))
        sub = claims.get("sub") if isinstance(claims.get("sub"), str) else None
        sid = claims.get("sid") if isinstance(claims.get("sid"), str) else None
        logout = SpooledLogout(
            entry=new_entry_id(),
            issuer=str(claims["iss"]),
            jti=str(claims["jti"]),
            sub=sub or None,
            sid=sid or None,
            accepted_at=now.timestamp(),
            jti_expires_at=until + skew,
            client_ip=caller.ip,
            user_agent=caller.user_agent,
        )
        if ctx.logouts is not None:
            replay = (await ctx.logouts.accept(logout)).status == "replay"
        else:
            # No journal (a portal run on its own): PostgreSQL or a 503.
            replay = (await write_logout(ctx.pool, logout, now=logout.accepted_at)).status == "replay"
        if replay:
            await self._audit_if_possible(caller, "backchannel_logout", "denied", "logout_jti_replay")
            return oauth_error("invalid_request")
        # §2.8: 200 on success, with Cache-Control: no-store.
        return web.Response(status=200, headers=NO_STORE)

    async def _audit_if_possible(
        self, caller: _Caller, kind: str, outcome: str, reason: str, *, detail: dict[str, Any] | None = None
    ) -> None:
        try:
            await self._audit(caller, kind, outcome, reason, detail=detail)
        except StoreError as exc:
            log.warning("%s %s (%s) not audited: %s", kind, outcome, reason, exc)
