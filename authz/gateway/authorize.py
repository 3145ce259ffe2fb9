"""The ext_authz decision, as plain code over plain data.

:func:`Authorizer.check` takes the request's method, path and headers and returns either an
:class:`Allow` (headers to set and remove, and the context for ext_proc) or a :class:`Deny` (the
Anthropic-envelope reply and the usage row recording why). No protobuf, no I/O: the gRPC servicer in
:mod:`authz.authz_server` converts at the edges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from authz.billing.accounting import denied_row
from authz.billing.usagerow import UsageRow
from authz.configtypes import GatewayConfig
from authz.envoy.upstreams import cluster_name
from authz.errors import TokenError
from authz.gateway.context import RequestContext
from authz.gateway.envelope import ErrorReply, error_reply
from authz.gateway.models import InferenceRoute, parse_route
from authz.gateway.policy import Identity, decide
from authz.signin.tokens import Claims, TokenVerifier

# The header ext_authz sets to pick the upstream cluster (the route's `cluster_header`). Clients
# can never choose it: it is removed from every request and set only here, after policy.
UPSTREAM_HEADER = "x-gateway-upstream"

# Credentials and internal headers that must never travel past the gateway.
_STRIP_EXACT = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
_STRIP_PREFIXES = ("x-amz-", "x-goog-", "x-gateway-", "x-envoy-")

_TOKEN_MESSAGES = {
    "missing": "Missing gateway access token. Run `authz login` and configure apiKeyHelper.",
    "expired": "The gateway access token has expired. Fetch a new one (apiKeyHelper: `authz token`).",
    "revoked": "The gateway session was revoked. Sign in again with `authz login`.",
}


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What ext_authz knows about a request: method, path and lower-cased headers."""

    method: str
    path: str
    headers: Mapping[str, str]
    request_id: str
    now: float


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through with these header changes and this context for ext_proc."""

    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    context: RequestContext


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse the request with ``reply``; ``row`` records the refusal in the usage ledger."""

    reply: ErrorReply
    row: UsageRow


def headers_to_strip(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Names of client credential and internal headers present on the request, sorted."""
    return tuple(sorted(name for name in headers if name in _STRIP_EXACT or name.startswith(_STRIP_PREFIXES)))


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The gateway token from ``Authorization: Bearer`` (Bedrock, Vertex) or ``x-api-key``."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


class Authorizer:
    """Verifies the token, reads the route and model, applies policy."""

    def __init__(
        self,
        config: GatewayConfig,
        verifier: TokenVerifier,
        *,
        is_revoked: Callable[[str], bool] | None = None,
    ) -> None:
        self._config = config
        self._verifier = verifier
        self._is_revoked = is_revoked or (lambda _sid: False)
        self._max_body = config.limits.max_request_body_bytes
        self._regions = {name: up.region for name, up in config.upstreams}

    def check(self, req: CheckInput) -> Allow | Deny:
        """Decide one request."""
        route = parse_route(req.method, req.path)
        if route is None:
            reply = error_reply(
                "not_found_error", f"No inference route for {req.method} {req.path.split('?')[0]}"
            )
            # The answer is 404 whatever the token; the row still says who asked when it can.
            try:
                caller: Claims | None = self._claims(req)
            except TokenError:
                caller = None
            return Deny(reply, denied_row(req, None, caller, reply.status, "unknown_route"))

        try:
            claims = self._claims(req)
        except TokenError as exc:
            message = _TOKEN_MESSAGES.get(exc.reason, "The gateway access token is not valid.")
            reply = error_reply("authentication_error", message, should_retry=False)
            return Deny(reply, denied_row(req, route, None, reply.status, f"token_{exc.reason}"))

        length = req.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_body:
            reply = error_reply(
                "request_too_large",
                f"Request body is {length} bytes; this gateway accepts at most {self._max_body}.",
            )
            return Deny(reply, denied_row(req, route, claims, reply.status, "body_too_large"))

        # Service tokens carry their own model patterns (authz.signin.service_tokens).
        identity = Identity(sub=claims.sub, email=claims.email, groups=claims.groups, models=claims.models)
        decision = decide(identity, route, self._config)
        if not decision.allowed or decision.upstream is None:
            reason = decision.reason or "denied by policy"
            if route.model is not None and "model" in reason:
                reply = error_reply("invalid_request_error", reason)
            else:
                reply = error_reply("permission_error", reason)
            return Deny(reply, denied_row(req, route, claims, reply.status, f"policy: {reason}"))

        regional = route.regional
        if route.format == "vertex":
            # Vertex serves from the configured region, whatever location the client's path names.
            regional = self._regions.get(decision.upstream, "global") != "global"
        context = _context(req, route, claims, decision.upstream, regional)
        return Allow(
            set_headers=((UPSTREAM_HEADER, cluster_name(decision.upstream)),),
            # Envoy applies headers_to_remove after the headers it sets (ext_authz.cc, onComplete),
            # so listing a client's forged x-gateway-upstream would delete ours too; the set
            # (OVERWRITE_IF_EXISTS_OR_ADD) already replaces the forged value.
            remove_headers=tuple(n for n in headers_to_strip(req.headers) if n != UPSTREAM_HEADER),
            context=context,
        )

    def _claims(self, req: CheckInput) -> Claims:
        """The verified, unrevoked claims of the request's token; TokenError otherwise."""
        token = bearer_token(req.headers)
        if token is None:
            raise TokenError("missing")
        claims = self._verifier.verify(token, req.now)
        if self._is_revoked(claims.sid):
            raise TokenError("revoked")
        return claims


def _context(
    req: CheckInput, route: InferenceRoute, claims: Claims, upstream: str, regional: bool
) -> RequestContext:
    h = req.headers
    return RequestContext(
        request_id=req.request_id,
        started_at=req.now,
        sub=claims.sub,
        email=claims.email,
        groups=claims.groups,
        session_id=claims.sid,
        cc_session_id=h.get("x-claude-code-session-id"),
        agent_id=h.get("x-claude-code-agent-id"),
        parent_agent_id=h.get("x-claude-code-parent-agent-id"),
        user_agent=h.get("user-agent"),
        ingress_format=route.format,
        operation=route.operation,
        streaming=route.streaming,
        upstream=upstream,
        model_raw=route.model_raw,
        model=route.model,
        model_segment=route.model_segment,
        regional=regional,
    )
