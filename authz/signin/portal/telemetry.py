"""``POST /v1/metrics``, ``/v1/logs`` and ``/v1/traces``: Claude Code's own OpenTelemetry, relayed.

Claude Code sends its OTLP/HTTP telemetry to the gateway with its gateway token. The token is
judged exactly as ext_authz judges it (the same verifier, the same revocation set); an accepted
body is queued for :class:`~authz.telemetry.relay.Relay`, which stamps the verified user, groups
and session on every resource and forwards it to the configured collector.

The answer is always 200 with an empty export response, whether the body was forwarded or dropped
(no endpoint configured, no valid token, malformed, too large, queue full): the client only logs
errors on anything else, and there is nothing it could do about a drop. Drops are counted in
``gateway.telemetry.relayed`` by reason, never silent.
"""

from __future__ import annotations

from aiohttp import web

from authz.signin.portal.context import PortalContext
from authz.telemetry.otlp_payload import Sender, is_json

# An empty Export*ServiceResponse, in each encoding (OTLP/HTTP "Full Success").
_EMPTY_PROTOBUF = b""
_EMPTY_JSON = b"{}"


async def _read(request: web.Request, limit: int) -> bytes | None:
    """The body, or None past ``limit`` bytes. Read from the stream: aiohttp's portal-wide cap
    suits forms, not telemetry batches. aiohttp inflates a gzip or deflate body (OTLP/HTTP's
    ``Content-Encoding``) chunk by chunk as it is read, so the limit bounds the inflated size."""
    if (request.content_length or 0) > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class TelemetryEndpoints:
    """The handler of the three OTLP/HTTP signal paths."""

    def __init__(self, ctx: PortalContext) -> None:
        self._ctx = ctx

    async def export(self, request: web.Request) -> web.Response:
        """Verify the caller, queue the body for the collector, and answer 200 either way."""
        signal = request.match_info["signal"]
        json_body = is_json(request.content_type)
        answer = web.Response(
            body=_EMPTY_JSON if json_body else _EMPTY_PROTOBUF,
            content_type="application/json" if json_body else "application/x-protobuf",
        )
        relay = self._ctx.deps.relay
        if relay is None:
            return answer
        sender = self._sender(request)
        if sender is None:
            relay.count(signal, "unauthenticated")
            return answer
        if not relay.forwarding:
            relay.count(signal, "no_endpoint")
            return answer
        limit = relay.max_body_bytes
        body = await _read(request, limit)
        if body is None:
            relay.count(signal, "too_large")
            return answer
        relay.submit(signal, body, json_body=json_body, sender=sender)
        return answer

    def _sender(self, request: web.Request) -> Sender | None:
        claims = self._ctx.bearer_claims(request)
        if claims is None:
            return None
        return Sender(user=claims.email or claims.sub, groups=claims.groups, session_id=claims.sid)
