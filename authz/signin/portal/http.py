"""HTTP helpers the portal's OAuth endpoints and browser pages share: form bodies, origins, the
client's address and User-Agent, RFC 6749 JSON answers, and the binding of sealed IdP tokens."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import MultiDictProxy

# What is kept of a client-supplied User-Agent in rows and logs.
MAX_USER_AGENT = 512

# RFC 6749 §5.1 (and RFC 8628 §3.5, RFC 7009 §2.2): token responses must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# The sign-in pages' cookies: the double-submit CSRF token and the value binding a sign-in to the
# browser that started it.
CSRF_COOKIE = "gw_csrf"
BROWSER_COOKIE = "gw_browser"
# RFC 6265bis §4.1.3.2: a browser keeps a cookie so named only if it is Secure, has Path=/ and no
# Domain, and was set from a secure origin: nobody but this host over https can set it.
HOST_PREFIX = "__Host-"


class FormError(Exception):
    """The request body is not a form, or repeats a parameter (RFC 6749 §3.1)."""


class Form:
    """An ``application/x-www-form-urlencoded`` body (RFC 6749 Appendix B)."""

    def __init__(self, data: MultiDictProxy[Any]) -> None:
        self._data = data

    def get(self, name: str) -> str | None:
        """The single value of ``name``, None when absent; FormError when repeated or not text."""
        values = self._data.getall(name, [])
        if not values:
            return None
        # RFC 6749 §3.1: "Request and response parameters MUST NOT be included more than once."
        if len(values) > 1 or not isinstance(values[0], str):
            raise FormError(name)
        value: str = values[0]
        return value


async def read_form(request: web.Request) -> Form:
    """Parse a form body; FormError for any other content type. Unknown parameters are kept and
    ignored by the callers (RFC 6749 §3.1, RFC 8628 §3.1)."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise FormError("content-type")
    try:
        data = await request.post()
    except ValueError as exc:
        raise FormError("body") from exc
    return Form(data)


def cookie_names(secure: bool) -> tuple[str, str]:
    """(CSRF cookie, browser cookie) names: ``__Host-`` prefixed whenever the cookies are Secure."""
    prefix = HOST_PREFIX if secure else ""
    return f"{prefix}{CSRF_COOKIE}", f"{prefix}{BROWSER_COOKIE}"


def origin_of(url: str) -> str | None:
    """The RFC 6454 §6.1 ASCII serialisation of ``url``'s origin, default ports dropped; None if
    ``url`` has no http(s) origin."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def client_ip(request: web.Request) -> str | None:
    """The client's address: the last ``X-Forwarded-For`` entry, which Envoy appends itself
    (``use_remote_address``), else the TCP peer."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    last = forwarded.rsplit(",", 1)[-1].strip()
    return last[:64] if last else request.remote


def user_agent(request: web.Request) -> str | None:
    """The User-Agent, bounded, for audit rows."""
    value = request.headers.get("User-Agent")
    return value[:MAX_USER_AGENT] if value else None


def oauth_json(body: dict[str, Any], status: int = 200) -> web.Response:
    """A JSON answer that no cache keeps."""
    return web.json_response(body, status=status, headers=NO_STORE)


def oauth_error(error: str, status: int = 400, headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 6749 §5.2 error object."""
    return web.json_response({"error": error}, status=status, headers={**NO_STORE, **(headers or {})})


def idp_token_binding(sub: str) -> bytes:
    """Associated data that binds a sealed IdP refresh token to its user, so a sealed value copied
    to another session row does not open there."""
    return b"idp_refresh_token\x00" + sub.encode("utf-8")


def bearer_token(request: web.Request) -> str | None:
    """The one gateway token sent as ``Authorization: Bearer`` or ``x-api-key``; None when
    missing or ambiguous (two different tokens, a repeated header, another scheme)."""
    tokens = set()
    authorization = request.headers.getall("Authorization", [])
    api_keys = request.headers.getall("x-api-key", [])
    if len(authorization) > 1 or len(api_keys) > 1:
        return None
    if authorization:
        scheme, _, value = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        tokens.add(value.strip())
    if api_keys and api_keys[0].strip():
        tokens.add(api_keys[0].strip())
    return tokens.pop() if len(tokens) == 1 else None
