"""The route table for :mod:`authz.envoy.render`: ``/healthz`` and the portal (sign-in, discovery,
``/managed/settings``), the inference routes (each sending to the cluster ext_authz names in
``x-gateway-upstream``; a failover cluster selects a variant that retries on the next upstream),
and the 413 and 404 direct responses.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

from envoy_data_plane.envoy.config.core.v3 import DataSource
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryPriority,
    Route,
    RouteAction,
    RouteActionClusterNotFoundResponseCode,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import BufferPerRoute
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthzPerRoute
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ExtProcOverrides, ExtProcPerRoute
from envoy_data_plane.envoy.extensions.retry.priority.previous_priorities.v3 import PreviousPrioritiesConfig
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import Int64Range
from envoy_data_plane.google.protobuf import Any as AnyProto

from authz.configtypes import Limits
from authz.envoy.common import _JSON_BODY, _envelope, _pack, _seconds
from authz.envoy.failover import Chain, attempts_prefix
from authz.envoy.filters import ANSWERED, Mode, mode, route_mode
from authz.envoy.names import (
    BUFFER_FILTER,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    PORTAL_CLUSTER,
    UPSTREAM_HEADER,
)
from authz.translate import messages
from backends.kinds import PASS_THROUGH

_NOT_FOUND_MESSAGE = "Not found: this gateway serves the Messages, Bedrock and Vertex inference routes."

# Envoy adds these to say who the client is (use_remote_address); they go to no cloud.
_CLIENT_ADDRESS_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-envoy-external-address")

_INT64_MAX = 2**63 - 1


def _inference_routes(limits: Limits, chains: Sequence[Chain] = ()) -> list[Route]:
    """One route per path of each client format: the kinds' pass-through grammars, then the
    Messages API's; before each, its failover variants (one per chain length that format's chains
    have), which ext_authz's choice of a failover cluster selects."""
    lengths: dict[str, set[int]] = {}
    for chain in chains:
        for client_format in chain.formats:
            lengths.setdefault(client_format, set()).add(chain.attempts)
    routes = []
    for kind in PASS_THROUGH.values():
        assert kind.passthrough is not None
        client_format = kind.passthrough.name
        for spec in kind.passthrough.routes:
            match = _match(spec.method, regex=spec.regex)
            # The request body reaches gateway.ext_proc only when the upstream signs over it; on a
            # failover route each attempt is signed by the attempt filter, which gets it instead.
            for attempts in sorted(lengths.get(client_format, ())):
                routes.append(_failover(spec.name, match, limits, route_mode(request_body=False), attempts))
            proc = route_mode(request_body=kind.signs_body and spec.method == "POST")
            routes.append(_inference(spec.name, match, limits, proc))
    for spec in messages.ROUTES:
        match = _match(spec.method, regex=spec.regex)
        # The model is in the body, which every Messages call hands to ext_proc (GET /v1/models has
        # none: the exchange answers it from the request headers alone, and never fails over).
        if spec.method != "POST":
            routes.append(_inference(spec.name, match, limits, ANSWERED))
            continue
        proc = route_mode(request_body=True)
        for attempts in sorted(lengths.get(messages.FORMAT, ())):
            routes.append(_failover(spec.name, match, limits, proc, attempts))
        routes.append(_inference(spec.name, match, limits, proc))
    return routes


# Upstream statuses a failover route tries the next upstream on (with connection failures and
# resets before any response): rate limited, and the server-side failures a retry elsewhere can
# cure; 529 is the Anthropic API's and Vertex's "overloaded".
RETRIABLE_STATUSES = (429, 500, 502, 503, 504, 529)
# RetryPolicy.retry_on: no connection, a stream refused (HTTP/2 REFUSED_STREAM), reset before any
# response header, or a status above. Nothing is retried once a response header reached the
# client: Envoy never retries after it forwarded the response.
_RETRY_ON = "connect-failure,refused-stream,reset,retriable-status-codes"
# Each retry goes to another upstream, so there is nothing to back off from (the default waits up to
# 25 ms and more); Envoy requires a positive interval (RetryPolicy.RetryBackOff.base_interval).
_RETRY_BACK_OFF = RetryPolicyRetryBackOff(
    base_interval=datetime.timedelta(milliseconds=1), max_interval=datetime.timedelta(milliseconds=1)
)


def _failover(name: str, match: RouteMatch, limits: Limits, proc: Mode, attempts: int) -> Route:
    """An inference route for the failover clusters of ``attempts`` upstreams (matched on the
    cluster ext_authz named, whose name says how many): up to ``attempts - 1`` retries, each on the
    next priority of the cluster, that is the policy's next upstream
    (envoy.retry_priorities.previous_priorities with update_frequency 1: every attempted priority is
    excluded from the next choice)."""
    chain_match = dataclasses.replace(
        match,
        headers=[
            *match.headers,
            HeaderMatcher(name=UPSTREAM_HEADER, string_match=StringMatcher(prefix=attempts_prefix(attempts))),
        ],
    )
    route = _inference(f"{name}_failover{attempts}", chain_match, limits, proc)
    assert route.route is not None
    route.route.retry_policy = RetryPolicy(
        retry_on=_RETRY_ON,
        retriable_status_codes=list(RETRIABLE_STATUSES),
        num_retries=attempts - 1,
        retry_priority=RetryPolicyRetryPriority(
            name="envoy.retry_priorities.previous_priorities",
            typed_config=_pack(PreviousPrioritiesConfig(update_frequency=1)),
        ),
        retry_back_off=_RETRY_BACK_OFF,
    )
    # Envoy keeps the request body to send it again; beyond this it gives up retrying
    # (Route.request_body_buffer_limit; the buffer filter has bounded the body to the same).
    route.request_body_buffer_limit = limits.max_request_body_bytes
    return route


# --- routes -------------------------------------------------------------------------------------


def _route_config(limits: Limits, chains: Sequence[Chain] = ()) -> RouteConfiguration:
    body_limit = limits.max_request_body_bytes
    routes = [
        Route(
            name="healthz",
            match=RouteMatch(path="/healthz"),
            route=RouteAction(cluster=PORTAL_CLUSTER, timeout=datetime.timedelta(seconds=5)),
            typed_per_filter_config=_filters_off(BUFFER_FILTER, EXT_AUTHZ_FILTER, EXT_PROC_FILTER),
        ),
        # The sign-in portal: discovery, JWKS, the OAuth endpoints and the verification pages. They
        # authenticate by their own means (device codes, refresh tokens, the IdP), so ext_authz and
        # the ext_procs stay out; X-Forwarded-For is kept for the per-IP rate limit and audit rows.
        *(
            Route(
                name=f"portal_{name}",
                match=RouteMatch(path_separated_prefix=prefix)
                if prefix != "/device"
                else RouteMatch(prefix=prefix),
                route=RouteAction(cluster=PORTAL_CLUSTER, timeout=datetime.timedelta(seconds=30)),
                typed_per_filter_config=_filters_off(EXT_AUTHZ_FILTER, EXT_PROC_FILTER),
            )
            for name, prefix in (
                ("well_known", "/.well-known"),
                ("oauth", "/oauth"),
                ("device", "/device"),
                ("admin", "/admin"),
            )
        ),
        # Claude Code's own OTLP/HTTP telemetry: the portal checks the gateway token itself (as
        # ext_authz would) and relays it; the buffer filter still caps the body.
        Route(
            name="portal_telemetry",
            match=_match("POST", regex=r"/v1/(metrics|logs|traces)"),
            route=RouteAction(cluster=PORTAL_CLUSTER, timeout=datetime.timedelta(seconds=30)),
            typed_per_filter_config=_filters_off(EXT_AUTHZ_FILTER, EXT_PROC_FILTER),
        ),
        # Claude Code's managed settings (authz/signin/portal/managed.py): the portal judges the
        # gateway token itself, by ext_authz's rules, and answers from the configuration.
        Route(
            name="portal_managed_settings",
            match=RouteMatch(path="/managed/settings"),
            route=RouteAction(cluster=PORTAL_CLUSTER, timeout=datetime.timedelta(seconds=30)),
            typed_per_filter_config=_filters_off(EXT_AUTHZ_FILTER, EXT_PROC_FILTER),
        ),
        # The caller's spend and caps (GET /api/oauth/usage): the portal checks the gateway token.
        Route(
            name="portal_usage",
            match=RouteMatch(path="/api/oauth/usage"),
            route=RouteAction(cluster=PORTAL_CLUSTER, timeout=datetime.timedelta(seconds=30)),
            typed_per_filter_config=_filters_off(EXT_AUTHZ_FILTER, EXT_PROC_FILTER),
        ),
        # A declared length over the limit is refused before a byte of the body is read.
        _direct(
            "too_large",
            RouteMatch(
                prefix="/",
                headers=[
                    HeaderMatcher(
                        name="content-length", range_match=Int64Range(start=body_limit + 1, end=_INT64_MAX)
                    )
                ],
            ),
            413,
            "request_too_large",
            f"Request body exceeds the gateway's limit of {body_limit} bytes.",
        ),
        *_inference_routes(limits, chains),
        _direct("not_found", RouteMatch(prefix="/"), 404, "not_found_error", _NOT_FOUND_MESSAGE),
    ]
    return RouteConfiguration(
        name="gateway",
        virtual_hosts=[VirtualHost(name="gateway", domains=["*"], routes=routes)],
    )


def _direct(name: str, match: RouteMatch, status: int, kind: str, message: str) -> Route:
    return Route(
        name=name,
        match=match,
        direct_response=DirectResponseAction(
            status=status,
            body=DataSource(inline_string=_envelope(kind, message)),
            # The JSON content-type also keeps the local-reply mappers off this body.
            body_format=_JSON_BODY,
        ),
        # Nothing is forwarded, so there is nothing to hold, authorise or sign.
        typed_per_filter_config=_filters_off(BUFFER_FILTER, EXT_AUTHZ_FILTER, EXT_PROC_FILTER),
    )


def _match(method: str, *, regex: str | None = None, path_prefix: str | None = None) -> RouteMatch:
    # safe_regex matches the path without its query string (RouteMatch.safe_regex);
    # path_separated_prefix matches "/inference-profiles" and below, but not "/inference-profilesX".
    headers = [HeaderMatcher(name=":method", string_match=StringMatcher(exact=method))]
    if regex is not None:
        return RouteMatch(safe_regex=RegexMatcher(regex=regex), headers=headers)
    if path_prefix is None:
        raise ValueError("a route needs a regex or a path prefix")
    return RouteMatch(path_separated_prefix=path_prefix, headers=headers)


def _inference(name: str, match: RouteMatch, limits: Limits, proc: Mode) -> Route:
    return Route(
        name=name,
        match=match,
        route=RouteAction(
            # The cluster comes from ext_authz alone (the client's copy is stripped before routing);
            # a missing or unknown one is a gateway bug, hence 500 (cluster_not_found_response_code).
            cluster_header=UPSTREAM_HEADER,
            cluster_not_found_response_code=RouteActionClusterNotFoundResponseCode.INTERNAL_SERVER_ERROR,
            # No overall deadline: streams run as long as the model writes; idleness is bounded.
            timeout=datetime.timedelta(0),
            idle_timeout=_seconds(limits.stream_idle_timeout),
            # gateway.ext_proc sets :authority to the upstream's own host when it signs.
            auto_host_rewrite=False,
        ),
        # The routing header, and the client's address, which the cloud has no use for.
        request_headers_to_remove=[UPSTREAM_HEADER, *_CLIENT_ADDRESS_HEADERS],
        typed_per_filter_config={
            EXT_PROC_FILTER: _pack(ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=mode(proc)))),
        },
    )


def _filters_off(*names: str) -> dict[str, AnyProto]:
    off: dict[str, AnyProto] = {}
    for name in names:
        if name == BUFFER_FILTER:
            off[name] = _pack(BufferPerRoute(disabled=True))
        elif name == EXT_AUTHZ_FILTER:
            off[name] = _pack(ExtAuthzPerRoute(disabled=True))
        else:
            off[name] = _pack(ExtProcPerRoute(disabled=True))
    return off
