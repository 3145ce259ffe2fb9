"""The ext_authz decision, as plain code over plain data.

:meth:`Authorizer.check` takes the request's method, path and headers and returns either an
:class:`Allow` (headers to set and remove, and the request identity for ext_proc) or a
:class:`Deny` (the Anthropic-envelope reply, and the usage row recording why when the caller is
known). No protobuf, no I/O: :mod:`authz.gateway.servicer` converts at the edges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from authz.billing.accounting import usage_row
from authz.billing.pricing import PriceBook
from authz.configtypes import GatewayConfig
from authz.envoy.failover import chain_cluster, chains, cluster_for
from authz.envoy.names import UPSTREAM_HEADER
from authz.errors import BadModelId, TokenError
from authz.gateway.policy import decide
from authz.identity import Caller, ChainUpstream, ClientFacts, RequestIdentity
from authz.signin.tokens import Claims, TokenVerifier, bearer_token
from authz.store.usagerow import UsageRow
from authz.translate import messages
from authz.translate.envelope import ErrorReply, error_reply
from backends.descriptor import PassThroughRoute
from backends.kinds import KINDS, PASS_THROUGH

# Credentials and internal headers that must never travel past the gateway. The early header
# mutation strips x-gateway-* and x-envoy-* before routing; the rest is removed here, after the
# token was read.
_STRIP_EXACT = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
_STRIP_PREFIXES = ("x-amz-", "x-goog-", "x-gateway-", "x-envoy-")

_TOKEN_MESSAGES = {
    "missing": "Missing gateway access token. Run `authz login` and configure apiKeyHelper.",
    "expired": "The gateway access token has expired. Fetch a new one (apiKeyHelper: `authz token`).",
    "revoked": "The gateway session was revoked. Sign in again with `authz login`.",
    "ambiguous": "Send exactly one gateway access token (one Authorization: Bearer header or x-api-key).",
}


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What ext_authz knows about a request: method, path and lower-cased headers.

    ``repeated`` names headers the client sent more than once; ``malformed`` describes a header
    value no client may send (control characters, invalid UTF-8), None when all are clean.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    request_id: str
    now: float
    repeated: frozenset[str] = frozenset()
    malformed: str | None = None


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through with these header changes and this identity for ext_proc;
    ``response_headers`` go on the response to the client (a capped caller's standing)."""

    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    identity: RequestIdentity
    response_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse the request with ``reply``; ``row`` records the refusal in the usage ledger, or is
    None for an anonymous refusal (counted in aggregate, so a token flood cannot load the
    database). ``reason`` is the refusal's short machine-readable cause."""

    reply: ErrorReply
    reason: str
    row: UsageRow | None = field(default=None)


def deny_with_row(identity: RequestIdentity, reply: ErrorReply, reason: str, prices: PriceBook) -> Deny:
    """Refuse a known caller's request, recording the refusal as a ``denied`` row."""
    row = usage_row(
        identity,
        status=reply.status,
        outcome="denied",
        reason=reason,
        prices=prices,
        ended_at=identity.started_at,
        recorded_by="ext_authz",
    )
    return Deny(reply, reason, row)


def headers_to_strip(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Names of client credential and internal headers present on the request, sorted."""
    return tuple(sorted(name for name in headers if name in _STRIP_EXACT or name.startswith(_STRIP_PREFIXES)))


def parse_route(method: str, path: str) -> tuple[str, PassThroughRoute] | None:
    """``(client format, route)`` for an inference path; None for any other path.

    Raises :class:`BadModelId` when a route names a model id outside its kind's exact forms. A
    Messages-format route names no model: its body does, and the exchange checks it.
    """
    for name, kind in PASS_THROUGH.items():
        assert kind.passthrough is not None
        route = kind.passthrough.parse(method, path)
        if route is not None:
            return name, route
    route = messages.parse_route(method, path)
    return (messages.FORMAT, route) if route is not None else None


class Authorizer:
    """Verifies the token, reads the route and model, applies policy."""

    def __init__(
        self,
        config: GatewayConfig,
        verifier: TokenVerifier,
        *,
        is_revoked: Callable[[Claims], bool] | None = None,
        prices: PriceBook | None = None,
        failover_clusters: frozenset[str] | None = None,
    ) -> None:
        """``failover_clusters``: the failover clusters Envoy was started with (default: every chain
        ``config`` needs); a chain a reload added that Envoy lacks is served by its first upstream."""
        self._config = config
        self._failover_clusters = (
            failover_clusters
            if failover_clusters is not None
            else frozenset(chain.cluster for chain in chains(config))
        )
        self._verifier = verifier
        self._is_revoked = is_revoked or (lambda _claims: False)
        self._max_body = config.limits.max_request_body_bytes
        self._prices = prices or PriceBook(config.pricing)
        self._model_maps = {name: dict(up.settings.model_map) for name, up in config.upstreams}

    def check(self, req: CheckInput) -> Allow | Deny:
        """Decide one request."""
        headers = req.headers
        client = ClientFacts.from_headers(headers)
        if req.malformed is not None:
            reply = error_reply("invalid_request_error", f"Malformed request header: {req.malformed}.")
            return Deny(reply, "malformed_header")
        try:
            parsed = parse_route(req.method, req.path)
        except BadModelId as exc:
            parsed = None
            bad_model: str | None = str(exc)
        else:
            bad_model = None
        try:
            caller: Caller | None = self._caller(req)
        except TokenError as exc:
            if parsed is None and bad_model is None:
                caller = None  # an unknown route is a 404 whatever the token
            else:
                message = _TOKEN_MESSAGES.get(exc.reason, "The gateway access token is not valid.")
                # Anonymous refusals write no row each (a token flood must not load the
                # database); the servicer counts them.
                reply = error_reply("authentication_error", message, should_retry=False)
                return Deny(reply, f"token_{exc.reason}")

        client_format, route = parsed if parsed is not None else ("unknown", None)
        identity = RequestIdentity(
            request_id=req.request_id,
            started_at=req.now,
            client_format=client_format,
            operation=route.operation if route else "unknown",
            streaming=route.streaming if route else False,
            caller=caller,
            client=client,
            requested_model=route.model.upstream_id if route and route.model else None,
            model=route.model.canonical if route and route.model else None,
            request_bytes=_content_length(headers),
        )
        if bad_model is not None:
            reply = error_reply("invalid_request_error", f"Invalid model id: {bad_model}.")
            return self._deny(identity, reply, "bad_model_id")
        if route is None:
            path = req.path.split("?")[0]
            reply = error_reply("not_found_error", f"No inference route for {req.method} {path}")
            return self._deny(identity, reply, "unknown_route") if caller else Deny(reply, "unknown_route")
        if identity.request_bytes > self._max_body:
            reply = error_reply(
                "request_too_large",
                f"Request body is {identity.request_bytes} bytes; "
                f"this gateway accepts at most {self._max_body}.",
            )
            return self._deny(identity, reply, "body_too_large")

        assert caller is not None  # every route but an unknown one needed a verified token
        decision = decide(caller, route, client_format, self._config)
        if not decision.upstreams:
            identity = replace(identity, policy=decision.policy)
            reason = decision.reason or "denied by policy"
            kind = (
                "invalid_request_error"
                if route.model is not None and "model" in reason
                else "permission_error"
            )
            return self._deny(identity, error_reply(kind, reason), f"policy: {reason}")

        # Each upstream the request may be tried on, with the model id it receives (model_map's
        # entry, else the client's id as parsed) and its pricing; the first serves unless it fails.
        upstreams = decision.upstreams
        if len(upstreams) > 1 and chain_cluster(upstreams) not in self._failover_clusters:
            # A reload gave the policy a chain Envoy has no cluster for (until a restart renders
            # it): the first upstream serves alone rather than the route failing.
            upstreams = upstreams[:1]
        chain = tuple(self._chain_upstream(name, route) for name in upstreams)
        first = chain[0]
        identity = replace(
            identity,
            policy=decision.policy,
            upstream=first.upstream,
            upstream_kind=first.kind,
            upstream_model=first.upstream_model,
            regional=first.regional,
            upstream_query=route.query,
            chain=chain if len(chain) > 1 else (),
        )
        return Allow(
            set_headers=((UPSTREAM_HEADER, cluster_for(upstreams)),),
            # Envoy applies headers_to_remove after the headers it sets (ext_authz.cc, onComplete),
            # so listing a client's forged x-gateway-upstream would delete ours too; the set
            # (OVERWRITE_IF_EXISTS_OR_ADD) already replaces the forged value.
            remove_headers=tuple(n for n in headers_to_strip(headers) if n != UPSTREAM_HEADER),
            identity=identity,
        )

    def _chain_upstream(self, name: str, route: PassThroughRoute) -> ChainUpstream:
        upstream = self._config.upstream(name)
        model = route.model
        upstream_model = None
        if model is not None:
            upstream_model = self._model_maps[name].get(model.canonical, model.upstream_id)
        regional = KINDS[upstream.kind].regional(upstream.settings, model)
        return ChainUpstream(name, upstream.kind, upstream_model, regional)

    def _deny(self, identity: RequestIdentity, reply: ErrorReply, reason: str) -> Deny:
        return deny_with_row(identity, reply, reason, self._prices)

    def identify(self, headers: Mapping[str, str], now: float) -> Caller | None:
        """The verified, unrevoked caller a set of request headers names, or None."""
        try:
            return self._caller(CheckInput(method="", path="", headers=headers, request_id="", now=now))
        except TokenError:
            return None

    def _caller(self, req: CheckInput) -> Caller:
        """The verified, unrevoked caller of the request's token; TokenError otherwise."""
        token = bearer_token(req.headers, req.repeated)
        if token is None:
            raise TokenError("missing")
        claims = self._verifier.verify(token, req.now)
        # By session id, or by the IdP subject/session a back-channel logout named (RevocationSet.blocks).
        if self._is_revoked(claims):
            raise TokenError("revoked")
        # A service token's own model patterns (authz.signin.service_tokens) narrow the policy.
        return Caller(
            sub=claims.sub,
            email=claims.email,
            groups=claims.groups,
            session_id=claims.sid,
            models=claims.models,
        )


def _content_length(headers: Mapping[str, str]) -> int:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() and len(value) < 19 else 0
