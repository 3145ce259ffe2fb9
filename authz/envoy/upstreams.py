"""Where each configured upstream lives on the network, and the Envoy cluster that reaches it.

The Envoy renderer (:mod:`authz.envoy.render`) builds one cluster per upstream from
:func:`endpoint`; ext_authz names that cluster in the ``x-gateway-upstream`` header with
:func:`cluster_name`; ext_proc sets ``:authority`` to :attr:`Endpoint.authority` when it signs. All
three must agree, so they share this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from authz import configtypes
from backends import bedrock, vertex

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Endpoint:
    """The scheme, host and port of an upstream's base URL."""

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


def endpoint(u: configtypes.Upstream) -> Endpoint:
    """The endpoint of upstream ``u``: its ``base_url`` when set, else the cloud's regional endpoint.

    Bedrock: ``https://bedrock-runtime.{region}.amazonaws.com`` (``bedrock-runtime-fips.`` when
    ``fips``). Vertex: ``https://{region}-aiplatform.googleapis.com``, or
    ``https://aiplatform.googleapis.com`` for the ``global`` region.
    """
    if u.base_url:
        parts = urlsplit(u.base_url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            # authz.config.validate rejects these already; this guards direct construction.
            raise ValueError(f"base_url must be an http(s) URL with a host, got {u.base_url!r}")
        return Endpoint(scheme, parts.hostname, parts.port or _DEFAULT_PORTS[scheme])
    # The backends own each cloud's endpoint, so the host Envoy connects to is the host they sign.
    if u.kind == "bedrock":
        return Endpoint("https", bedrock.default_host(u.region, fips=u.fips), 443)
    return Endpoint("https", vertex.default_host(u.region), 443)


def cluster_name(upstream_name: str) -> str:
    """The Envoy cluster for the upstream called ``upstream_name``: ``upstream_<name>``, with any
    character outside ``[A-Za-z0-9_.-]`` replaced by ``_`` so the name is safe in stats and headers."""
    return "upstream_" + _UNSAFE.sub("_", upstream_name)
