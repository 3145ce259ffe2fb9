"""What every upstream (Bedrock, Vertex, ...) offers the ext_proc service, and the backend errors.

An upstream knows where requests go (``scheme``/``authority``), how an ingress path maps onto the
upstream's path, and how to authorise one request with the cloud credential it holds. Everything
here is plain data so the ext_proc servicer can turn it into header mutations at its edge.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


class BackendError(Exception):
    """A backend could not prepare a request: a credential fetch failed, a setting is unusable, ...

    Messages say what failed and never carry a secret (no keys, tokens or signatures), so they
    are safe to log; callers still send clients a generic message because they may name ARNs.
    """


class UnsupportedPathError(BackendError):
    """The ingress path is not one this upstream serves (the caller should answer 400/404)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request is made for; Bedrock records it as the STS SourceIdentity and session tags."""

    sub: str
    email: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """The ``:authority``, ``:path`` and headers (lower-case names) to SET on the upstream request."""

    authority: str
    path: str
    headers: dict[str, str]


class Upstream(Protocol):
    """One configured upstream: a cloud endpoint plus the credential used to call it."""

    name: str
    kind: str  # "bedrock" | "vertex"
    scheme: str  # "https", or "http" only for a loopback base_url (development and tests)
    authority: str  # host[:port] the upstream request goes to (default port omitted)

    def upstream_path(self, ingress_path: str, model_id: str) -> str:
        """Return the path (with any query) to send upstream for this ingress path and model.

        Raises :class:`UnsupportedPathError` when the path is not an inference path this upstream
        serves.
        """
        ...

    async def sign(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        caller: Caller,
    ) -> SignedRequest:
        """Authorise one request whose upstream path is ``path`` (from :meth:`upstream_path`).

        ``headers`` are the request headers as they will be sent upstream. Raises
        :class:`BackendError` when no credential can be obtained.
        """
        ...

    async def aclose(self) -> None:
        """Release what the upstream holds (in-flight credential fetches, HTTP pools)."""
        ...


_DEFAULT_PORTS = {"https": 443, "http": 80}


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or IP literal, without brackets) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_from_url(base_url: str) -> tuple[str, str]:
    """Split an upstream ``base_url`` into ``(scheme, authority)``.

    Only ``https`` is accepted, or ``http`` to a loopback address (development and the local
    emulator): credentials must never cross a network in clear text. The authority is normalised
    the way HTTP clients and botocore compute ``Host`` (lower-case host, default port dropped), so
    the value Envoy sends is the value that was signed. A path, query, fragment or user info is
    refused rather than silently dropped.
    """
    try:
        parts = urlsplit(base_url)
    except ValueError as exc:
        raise BackendError("base_url is not a valid URL (check brackets around an IPv6 host)") from exc
    if "@" in parts.netloc:
        # Reported without the URL: user info may hold a password.
        raise BackendError("base_url must not carry user info (user:password@)")
    try:
        port = parts.port
    except ValueError as exc:
        raise BackendError(f"base_url {base_url!r} has an invalid port") from exc
    host = parts.hostname
    if parts.scheme not in _DEFAULT_PORTS or not host:
        raise BackendError(f"base_url {base_url!r} must look like https://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BackendError(f"base_url {base_url!r} must be scheme://host[:port] with no path or query")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise BackendError(f"base_url {base_url!r}: plain http is allowed only to a loopback address")
    authority = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        authority = f"{authority}:{port}"
    return parts.scheme, authority
