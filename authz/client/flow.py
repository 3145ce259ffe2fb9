"""A client for the gateway's OAuth endpoints: discovery, the device flow, refresh and revocation.

The endpoints come from the gateway's RFC 8414 metadata. The transport, the clock and the sleep
function are injected, so tests run this very client against an in-process fake of the portal
(``httpx.MockTransport``) without sockets or waiting. Every failure surfaces as a
:class:`ClientError` subclass; httpx's own errors are wrapped where they enter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from authz.errors import GatewayError

USER_AGENT = "claude-gateway-authz/0.1"
DEFAULT_TIMEOUT = 10.0
# RFC 8628 section 3.5: "slow_down ... the interval MUST be increased by 5 seconds".
SLOW_DOWN_STEP = 5
# RFC 8628 section 3.2: "If no value is provided, clients MUST use 5 as the default."
DEFAULT_INTERVAL = 5
# Backoff ceiling for connection failures while polling (RFC 8628 section 3.5 asks for
# exponential backoff on connection timeouts).
MAX_NETWORK_BACKOFF = 60
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# The token endpoint's answers to a device_code grant that RFC 8628 section 3.5 defines.
_POLL_ERRORS = frozenset({"authorization_pending", "slow_down", "access_denied", "expired_token"})


class ClientError(GatewayError):
    """The gateway's sign-in endpoints failed or answered something this client cannot use."""


class DeviceFlowError(ClientError):
    """The device authorization ended without a token (``access_denied`` or ``expired_token``)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class SessionEndedError(ClientError):
    """The refresh token was refused (``invalid_grant``): the user must sign in again."""


class GatewayUnavailableError(ClientError):
    """The gateway could not be reached or is temporarily unable to answer; try again later."""


@dataclass(frozen=True, slots=True)
class Discovery:
    """The endpoints of the gateway's RFC 8414 authorization server metadata."""

    issuer: str
    device_authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str | None


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """An RFC 8628 device authorization response (section 3.2)."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass(frozen=True, slots=True)
class TokenSet:
    """A successful token response: an access token, its lifetime, the refresh token and the user."""

    access_token: str
    expires_in: int
    refresh_token: str | None
    email: str | None


def normalize_gateway(url: str) -> str:
    """``url`` without a trailing slash, after checking it is an absolute http(s) URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(
            f"gateway URL {url!r} is not an absolute http(s) URL such as https://gateway.example"
        )
    if parts.query or parts.fragment:
        raise ClientError(f"gateway URL {url!r} must not carry a query or fragment")
    return url.strip().rstrip("/")


class GatewayClient:
    """Talks to one gateway's OAuth endpoints; use as a context manager to close its connections."""

    def __init__(
        self,
        gateway: str,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.gateway = normalize_gateway(gateway)
        self._clock = clock
        self._sleep = sleep
        self._http = httpx.Client(
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            # The OAuth endpoints never redirect (issue 3); following one could leak a token.
            follow_redirects=False,
        )
        self._discovery: Discovery | None = None

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying connections."""
        self._http.close()

    # --- transport ------------------------------------------------------------------------------

    def _request(self, method: str, url: str, data: Mapping[str, str] | None = None) -> httpx.Response:
        try:
            return self._http.request(method, url, data=data)
        except httpx.HTTPError as exc:
            raise GatewayUnavailableError(
                f"cannot reach the gateway at {self.gateway}: {exc or type(exc).__name__}"
            ) from exc

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            if response.status_code >= 500:
                raise GatewayUnavailableError(
                    f"the gateway at {self.gateway} answered HTTP {response.status_code}; try again later"
                )
            raise ClientError(
                f"the gateway at {self.gateway} answered HTTP {response.status_code} without a JSON object "
                f"at {response.request.url}; is this the gateway's URL?"
            )
        return body

    def _endpoint(self, metadata: Mapping[str, Any], name: str, *, required: bool) -> str | None:
        value = metadata.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise ClientError(f"the gateway's metadata has no {name}; is {self.gateway} the gateway's URL?")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(f"the gateway's metadata names {name} {value!r}, not an absolute http(s) URL")
        # Never downgrade: tokens sent to an https gateway must not travel over plain http.
        if urlsplit(self.gateway).scheme == "https" and parts.scheme != "https":
            raise ClientError(f"the gateway's metadata names {name} {value!r} over plain http")
        return value

    # --- endpoints ------------------------------------------------------------------------------

    def discover(self) -> Discovery:
        """Fetch (once) the RFC 8414 metadata at ``/.well-known/oauth-authorization-server``."""
        if self._discovery is not None:
            return self._discovery
        response = self._request("GET", f"{self.gateway}/.well-known/oauth-authorization-server")
        if response.status_code >= 500:
            raise GatewayUnavailableError(
                f"the gateway at {self.gateway} answered HTTP {response.status_code}; try again later"
            )
        if response.status_code != 200:
            raise ClientError(
                f"the gateway at {self.gateway} has no sign-in metadata (HTTP {response.status_code}); "
                "is this the gateway's URL?"
            )
        metadata = self._json(response)
        device = self._endpoint(metadata, "device_authorization_endpoint", required=True)
        token = self._endpoint(metadata, "token_endpoint", required=True)
        assert device is not None and token is not None  # required=True never returns None
        self._discovery = Discovery(
            issuer=str(metadata.get("issuer", "")),
            device_authorization_endpoint=device,
            token_endpoint=token,
            revocation_endpoint=self._endpoint(metadata, "revocation_endpoint", required=False),
        )
        return self._discovery

    def start_device_authorization(self, *, surface: str = "cli") -> DeviceAuthorization:
        """Ask for a device code and user code (RFC 8628 section 3.1)."""
        endpoint = self.discover().device_authorization_endpoint
        response = self._request("POST", endpoint, data={"surface": surface})
        body = self._json(response)
        if response.status_code != 200:
            raise self._error(response, body, "device authorization")
        try:
            interval = int(body.get("interval", DEFAULT_INTERVAL))
            auth = DeviceAuthorization(
                device_code=_str(body, "device_code"),
                user_code=_str(body, "user_code"),
                verification_uri=_str(body, "verification_uri"),
                verification_uri_complete=_opt_str(body, "verification_uri_complete"),
                expires_in=int(body["expires_in"]),
                interval=max(interval, 1),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ClientError(f"the gateway's device authorization response is malformed: {exc}") from exc
        return auth

    def poll_token(self, auth: DeviceAuthorization) -> TokenSet:
        """Poll the token endpoint until the user approves, denies, or the code expires (RFC 8628 3.4-3.5)."""
        endpoint = self.discover().token_endpoint
        deadline = self._clock() + auth.expires_in
        interval = auth.interval
        backoff = 0
        grant = {"grant_type": DEVICE_CODE_GRANT, "device_code": auth.device_code}
        while True:
            self._sleep(interval + backoff)
            if self._clock() > deadline:
                raise self._device_error("expired_token")
            try:
                response = self._request("POST", endpoint, data=grant)
                body = self._json(response)
                error = body.get("error")
                if response.status_code != 200 and error not in _POLL_ERRORS:
                    raise self._error(response, body, "sign-in")
            except GatewayUnavailableError:
                # A network failure or a 5xx while polling is not the end of the sign-in.
                backoff = min(max(backoff * 2, interval), MAX_NETWORK_BACKOFF)
                continue
            backoff = 0
            if response.status_code == 200:
                return _token_set(body)
            if error == "slow_down":
                interval += SLOW_DOWN_STEP
            elif error in ("access_denied", "expired_token"):
                raise self._device_error(error)

    def refresh(self, refresh_token: str) -> TokenSet:
        """Exchange ``refresh_token`` for a new access token and a rotated refresh token."""
        endpoint = self.discover().token_endpoint
        response = self._request(
            "POST", endpoint, data={"grant_type": "refresh_token", "refresh_token": refresh_token}
        )
        body = self._json(response)
        if response.status_code == 200:
            return _token_set(body)
        if body.get("error") == "invalid_grant":
            raise SessionEndedError(f"session ended: run `authz login --gateway {self.gateway}`")
        raise self._error(response, body, "token refresh")

    def revoke(self, token: str, *, hint: str) -> None:
        """Revoke ``token`` (RFC 7009); ``hint`` is ``refresh_token`` or ``access_token``."""
        endpoint = self.discover().revocation_endpoint
        if endpoint is None:
            raise ClientError(f"the gateway at {self.gateway} publishes no revocation_endpoint")
        response = self._request("POST", endpoint, data={"token": token, "token_type_hint": hint})
        # RFC 7009 section 2.2: 200 whether or not the token was valid; the body is irrelevant.
        if response.status_code != 200:
            raise self._error(response, self._json(response), "revocation")

    # --- errors ---------------------------------------------------------------------------------

    def _device_error(self, code: str) -> DeviceFlowError:
        if code == "access_denied":
            text = "sign-in was denied"
        else:
            text = "the sign-in code expired before it was approved"
        return DeviceFlowError(code, f"{text}: run `authz login --gateway {self.gateway}` to try again")

    def _error(self, response: httpx.Response, body: Mapping[str, Any], what: str) -> ClientError:
        error = body.get("error")
        description = body.get("error_description")
        detail = f"{error}" + (f" ({description})" if isinstance(description, str) else "")
        if response.status_code >= 500 or response.status_code == 429 or error == "temporarily_unavailable":
            return GatewayUnavailableError(
                f"{what} at {self.gateway} is temporarily unavailable (HTTP {response.status_code}"
                f"{', ' + detail if error else ''}); try again later"
            )
        return ClientError(f"{what} at {self.gateway} failed: HTTP {response.status_code} {detail}")


def _str(body: Mapping[str, Any], key: str) -> str:
    value = body[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} is not a non-empty string")
    return value


def _opt_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) and value else None


def _token_set(body: Mapping[str, Any]) -> TokenSet:
    try:
        token_type = body.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise ValueError(f"token_type {token_type!r} is not Bearer")
        expires_in = int(body["expires_in"])
        if expires_in <= 0:
            raise ValueError("expires_in is not positive")
        return TokenSet(
            access_token=_str(body, "access_token"),
            expires_in=expires_in,
            refresh_token=_opt_str(body, "refresh_token"),
            email=_opt_str(body, "email"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ClientError(f"the gateway's token response is malformed: {exc}") from exc
