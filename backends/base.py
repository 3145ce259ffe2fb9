"""What every upstream (Bedrock, Vertex, the Anthropic API, ...) offers the gateway.

An upstream knows where requests go (:class:`Endpoint`), how to spell a request path for each
operation, and how to authorise one request with the cloud credential it holds. Everything here
is plain data so the ext_proc servicer can turn it into header mutations at its edge.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import unquote_to_bytes, urlsplit

from backends.errors import BackendError, BadModelId

Operation = Literal["invoke", "stream", "count_tokens", "list_profiles", "list_models"]

_DEFAULT_PORTS = {"https": 443, "http": 80}
_DATE_SUFFIX = re.compile(r"-[0-9]{8}$")

# Bytes allowed in the still-encoded path segment: RFC 3986 pchar (unreserved, sub-delims, ':',
# '@' and pct-encoded). Anything else never reaches the decoder.
_SEGMENT = re.compile(r"[A-Za-z0-9._~%:@!$&'()*+,;=-]{1,2048}")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")


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


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model id a client named, parsed by the upstream kind's exact grammar.

    ``upstream_id`` is the id re-serialised by the gateway from its parsed parts (what the upstream
    receives unless ``model_map`` says otherwise), never the client's bytes; ``canonical`` is the
    first-party form (``claude-haiku-4-5-20251001``) that policy and prices are written against;
    ``regional`` marks a regional or geographic endpoint, priced at a premium over global ones.
    """

    upstream_id: str
    canonical: str
    regional: bool


def model_family(canonical: str) -> str:
    """A canonical model id without its trailing ``-YYYYMMDD`` snapshot date."""
    return _DATE_SUFFIX.sub("", canonical)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The scheme, host and port an upstream is reached at, parsed once from its base URL."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host`` or ``host:port`` (the port only when not the scheme's default), as sent in
        ``:authority`` and signed by SigV4; IPv6 literals are bracketed (RFC 3986, section 3.2.2)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if _DEFAULT_PORTS.get(self.scheme) == self.port:
            return host
        return f"{host}:{self.port}"

    @property
    def tls(self) -> bool:
        """True when the upstream is reached over TLS."""
        return self.scheme == "https"

    @classmethod
    def https(cls, host: str) -> Endpoint:
        """A cloud's public endpoint: TLS on port 443."""
        return cls("https", host, 443)

    @classmethod
    def parse(cls, base_url: str) -> Endpoint:
        """Parse an upstream ``base_url``.

        Only ``https`` is accepted, or ``http`` to a loopback address (development and the local
        emulator): credentials must never cross a network in clear text. The host is lower-cased
        the way HTTP clients and botocore compute ``Host``, so the value Envoy sends is the value
        that was signed. A path, query, fragment or user info is refused rather than dropped.
        Raises :class:`BackendError` with a message that does not repeat user info.
        """
        try:
            parts = urlsplit(base_url)
        except ValueError as exc:
            raise BackendError("is not a valid URL (check brackets around an IPv6 host)") from exc
        if "@" in parts.netloc:
            # Reported without the URL: user info may hold a password.
            raise BackendError("must not carry user info (user:password@)")
        try:
            port = parts.port
        except ValueError as exc:
            raise BackendError(f"is not a valid URL: {base_url!r} has an invalid port") from exc
        host = parts.hostname
        if parts.scheme not in _DEFAULT_PORTS or not host:
            raise BackendError(f"must be an http(s) URL with a host, got {base_url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise BackendError(f"must not carry a path, query or fragment, got {base_url!r}")
        if parts.scheme == "http" and not is_loopback_host(host):
            raise BackendError(f"plain http is allowed only to loopback; use https, got {base_url!r}")
        return cls(parts.scheme, host.lower(), port if port is not None else _DEFAULT_PORTS[parts.scheme])


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or IP literal, brackets allowed) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def decode_segment(segment: str) -> str:
    """Percent-decode one path segment exactly once; :class:`BadModelId` unless the result is
    printable ASCII (a model id never needs more)."""
    if not _SEGMENT.fullmatch(segment) or _PCT.search(segment):
        raise BadModelId("the model id in the path is not a valid path segment")
    raw = unquote_to_bytes(segment)
    if any(b < 0x21 or b > 0x7E for b in raw):
        raise BadModelId("the model id contains characters no model id has")
    return raw.decode("ascii")


class Upstream(Protocol):
    """One configured upstream: a cloud endpoint plus the credential used to call it."""

    name: str
    kind: str
    endpoint: Endpoint

    def model_id(self, model: ModelRef) -> str:
        """The id to send upstream for ``model``: ``model_map``'s entry for its canonical id, else
        the parsed id as re-serialised."""
        ...

    def path(self, operation: Operation, model_id: str | None, query: str = "") -> str:
        """The upstream path for ``operation`` on ``model_id``, built from the gateway's own parts
        (configured project and region, percent-encoding of the id), never the client's bytes.

        Raises :class:`BackendError` when this upstream does not serve ``operation``.
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
        """Authorise one request whose upstream path is ``path``.

        ``headers`` are the request headers as they will be sent upstream and ``body`` the exact
        bytes. Raises :class:`BackendError` when no credential can be obtained.
        """
        ...

    async def aclose(self) -> None:
        """Release what the upstream holds (in-flight credential fetches, HTTP pools)."""
        ...
