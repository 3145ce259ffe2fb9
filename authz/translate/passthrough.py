"""The pass-through pairs: a client format served byte for byte by the kind that speaks it
(Bedrock's REST API to a Bedrock upstream, Vertex's to a Vertex upstream).

The request keeps its body; only the path is rebuilt from the gateway's own parts (the policy's
model id, the configured project and region). The response reaches the client unchanged while
the kind's meter counts its usage.
"""

from __future__ import annotations

from collections.abc import Mapping

from authz.identity import RequestIdentity
from authz.translate.base import MeteredRelay, ResponseStart, UpstreamRequest
from authz.translate.errors import MappedError, map_upstream_error
from backends.base import Upstream
from backends.usage import Meter

# The meters read the response bytes, so the upstream must answer uncompressed.
_REMOVE_UPSTREAM = ("accept-encoding",)


class PassThrough(MeteredRelay):
    """Relay one request unchanged but for its path and credentials; meter the response."""

    __slots__ = ("_identity", "_meter", "_upstream")

    needs_request_body = False

    def __init__(self, identity: RequestIdentity, upstream: Upstream, meter: Meter) -> None:
        self._identity = identity
        self._upstream = upstream
        self._meter = meter

    def request(self, headers: Mapping[str, str], body: bytes) -> UpstreamRequest:
        """The same request on the path the gateway builds for the policy's model."""
        identity = self._identity
        path = self._upstream.path(
            identity.operation,  # type: ignore[arg-type]
            identity.upstream_model,
            identity.upstream_query,
        )
        return UpstreamRequest(path=path, remove_headers=_REMOVE_UPSTREAM)

    def response_headers(self, status: int, headers: Mapping[str, str]) -> ResponseStart:
        """Errors are buffered to be rewritten; successful bodies flow as they come."""
        return ResponseStart(buffer=status >= 400)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> MappedError:
        """The upstream's error, hidden behind a generic envelope unless clients recover on it."""
        return map_upstream_error(status, body, dict(headers))
