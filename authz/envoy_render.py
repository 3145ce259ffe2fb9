"""Render Envoy's bootstrap from the gateway's typed configuration.

The bootstrap is built from envoy-data-plane's typed messages, so a misspelt field fails here and
not in production, then converted to the plain proto-JSON shape (snake_case keys) Envoy reads as
YAML. Layout (DESIGN.md, "Envoy" and "Inference path"):

* one listener; filters buffer -> ext_authz -> ``gateway.sign`` (ext_proc) -> ``gateway.meter``
  (ext_proc, observability mode) -> router, all failing closed; the ext_procs act only where a
  route switches them on;
* inference routes by path and method only, each sending to the cluster that ext_authz names in
  ``x-gateway-upstream``; ``/healthz`` to the portal; bodies over the limit get a 413 envelope and
  every other path a 404 envelope;
* clusters: the gateway's gRPC workers, the portal, and one fixed cluster per configured upstream.

``python -m authz.envoy_render CONFIG > envoy.yaml`` prints the rendering (see ``envoy/README.md``).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import betterproto2
import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    AndFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    ExtensionFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation,
    HeaderMutationRemoveOnMatch,
    HeaderMutationRules,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpProtocolOptionsHeadersWithUnderscoresAction,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
    UpstreamHttpProtocolOptions,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CoreHttpProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteActionClusterNotFoundResponseCode,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer, BufferPerRoute
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz, ExtAuthzPerRoute
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExternalProcessorRouteCacheAction,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation as EarlyHeaderMutation,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsAutoHttpConfig,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, Int64Range, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyProto

from authz import config as config_loader
from authz import upstreams
from authz.configtypes import GatewayConfig, Limits
from authz.errors import ConfigError

GRPC_CLUSTER = "gateway_grpc"
PORTAL_CLUSTER = "gateway_portal"
UPSTREAM_HEADER = "x-gateway-upstream"
"""Set by ext_authz on every allowed request to the cluster (:func:`authz.upstreams.cluster_name`)."""
BUFFER_FILTER = "envoy.filters.http.buffer"
"""Holds each request body, up to limits.max_request_body_bytes, before any service sees it."""
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
"""Filter name, and so the dynamic-metadata namespace ext_authz's ``dynamic_metadata`` lands in."""
SIGN_FILTER = "gateway.sign"
"""ext_proc that buffers, signs and rewrites requests; also a metadata namespace it may write."""
METER_FILTER = "gateway.meter"
"""ext_proc in observability mode that counts tokens in the relayed response."""
FILTER_METADATA_KEY = "x-gateway-filter"
"""gRPC request metadata naming the filter (one of the three names above) that opened a call."""
DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

_NOT_FOUND_MESSAGE = "Not found: this gateway serves the Bedrock and Vertex inference routes."

# Client-sent headers that only the gateway itself may set. Removed before routing and before any
# filter runs (HttpConnectionManager.early_header_mutation_extensions), so neither ext_authz, the
# route table nor the upstream ever sees a forged one.
_STRIPPED_PREFIXES = ("x-gateway-", "x-envoy-")

# Envoy adds these to say who the client is (use_remote_address); they go to no cloud.
_CLIENT_ADDRESS_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-envoy-external-address")

# Headers gateway.sign may set beyond ext_proc's defaults. ``:authority``/``host`` are "routing"
# headers that ext_proc may not touch unless allowed (HeaderMutationRules.allow_all_routing), and
# allow_expression widens just these instead of also opening ``:method`` and ``:scheme``.
_SIGN_MUTABLE = r"^(:authority|host|:path|authorization|x-amz-.*|x-goog-.*)$"

# Concurrent requests per cluster. Envoy's default circuit breaker is 1024; every in-flight
# inference request holds two ext_proc streams plus, briefly, an ext_authz call on gateway_grpc,
# and streams last minutes, so the default would fail closed at a few hundred users.
_MAX_CONCURRENT = 100_000

# Inference paths (Client contracts in DESIGN.md); the meter runs on the streaming ones only.
_BEDROCK_STREAM = r"^/model/[^/]+/invoke-with-response-stream$"
_BEDROCK_INVOKE = r"^/model/[^/]+/(invoke|count-tokens)$"
_VERTEX_MODEL = r"^/v1/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/[^/:]+"
_VERTEX_STREAM = _VERTEX_MODEL + r":streamRawPredict$"
_VERTEX_INVOKE = _VERTEX_MODEL + r":rawPredict$"
_INT64_MAX = 2**63 - 1

# The body as given (a literal, so no %-operators are interpreted), sent as application/json.
_JSON_BODY = SubstitutionFormatString(
    text_format_source=DataSource(inline_string="%LOCAL_REPLY_BODY%"), content_type="application/json"
)

_HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def render(
    config: GatewayConfig,
    *,
    grpc_ports: Sequence[int] | None = None,
    ca_bundle: str = DEFAULT_CA_BUNDLE,
    access_log: bool = False,
) -> dict[str, Any]:
    """Envoy's bootstrap for ``config`` as plain data (proto JSON, snake_case keys).

    ``grpc_ports`` are the ports of the gateway's gRPC workers (default: ``listen.grpc.port`` and
    the ``workers - 1`` ports after it). ``ca_bundle`` is the PEM file that cloud certificates are
    verified against. ``access_log`` adds an access log on stdout.
    """
    ports = (
        list(grpc_ports)
        if grpc_ports is not None
        else [config.listen.grpc.port + i for i in range(config.workers)]
    )
    if not ports:
        raise ConfigError("listen.grpc", "at least one gRPC port is needed")
    _check_ports(config, ports)
    bootstrap = Bootstrap(
        admin=Admin(address=_address(config.listen.envoy_admin.address, config.listen.envoy_admin.port)),
        static_resources=BootstrapStaticResources(
            listeners=[_listener(config, access_log)],
            clusters=[
                _grpc_cluster(config, ports),
                _portal_cluster(config),
                *_upstream_clusters(config, ca_bundle),
            ],
        ),
    )
    rendered: dict[str, Any] = bootstrap.to_dict(casing=betterproto2.Casing.SNAKE)
    _spell_out_fail_closed(rendered)
    return rendered


def render_yaml(
    config: GatewayConfig,
    *,
    grpc_ports: Sequence[int] | None = None,
    ca_bundle: str = DEFAULT_CA_BUNDLE,
    access_log: bool = False,
) -> str:
    """:func:`render` as YAML text, with a header saying it is generated."""
    body = yaml.safe_dump(
        render(config, grpc_ports=grpc_ports, ca_bundle=ca_bundle, access_log=access_log),
        sort_keys=True,
        default_flow_style=False,
        width=1_000,
    )
    return "# Generated by `python -m authz.envoy_render`; do not edit (see envoy/README.md).\n" + body


def load_for_render(path: str | Path, environ: Mapping[str, str]) -> GatewayConfig:
    """Load a gateway config for rendering only: ``${file:...}`` references are not read.

    Envoy's bootstrap never contains the secrets those references hold (signing keys, passwords),
    so CI and the committed examples can be rendered without them.
    """
    text = Path(path).read_text(encoding="utf-8")
    text = re.sub(r"\$\{file:[^}]*\}", "not-read-for-rendering", text)
    return config_loader.loads(text, environ, base_dir=Path(path).resolve().parent)


def _check_ports(config: GatewayConfig, grpc_ports: Sequence[int]) -> None:
    """Each worker listens on its own gRPC port after ``listen.grpc.port``; none may land on another
    listener's port (port 0, "pick a free one", never clashes)."""
    listen = config.listen
    owners: dict[int, str] = {}
    named = [
        ("listen.envoy", listen.envoy.port),
        ("listen.envoy_admin", listen.envoy_admin.port),
        ("listen.portal", listen.portal.port),
        *((f"gRPC worker {i}", port) for i, port in enumerate(grpc_ports)),
    ]
    for name, port in named:
        if port == 0:
            continue
        if port in owners:
            raise ConfigError("listen", f"{name} and {owners[port]} both use port {port}")
        owners[port] = name


# --- listener and HTTP connection manager -------------------------------------------------------


def _listener(config: GatewayConfig, access_log: bool) -> Listener:
    limits = config.limits
    hcm = HttpConnectionManager(
        stat_prefix="gateway",
        route_config=_route_config(limits),
        http_filters=[_buffer(limits), _ext_authz(limits), _sign(limits), _meter(), _router()],
        # Some servers read x_api_key as x-api-key, so such names could slip past header checks;
        # refuse them with 400 rather than drop them silently
        # (HttpProtocolOptions.headers_with_underscores_action).
        common_http_protocol_options=CoreHttpProtocolOptions(
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
        ),
        max_request_headers_kb=limits.max_request_headers_kb,
        # Resets on every byte; long thinking pauses send nothing for minutes.
        stream_idle_timeout=_seconds(limits.stream_idle_timeout),
        request_timeout=_seconds(limits.request_timeout),
        use_remote_address=True,
        # internal_address_config stays unset on purpose: unset, Envoy (1.36 and later) treats no
        # client as internal, so it sanitises x-envoy-* from everyone, loopback included. Set but
        # with no cidr_ranges it would trust RFC1918 and loopback clients (InternalAddressConfig).
        generate_request_id=True,
        always_set_request_id_in_response=True,
        server_name="claude-gateway",
        # RFC 3986 normalisation and slash merging before routing, but %2F stays %2F: Bedrock
        # inference-profile ARNs arrive as /model/arn:...%2Fid/invoke and must still match
        # the single-segment model pattern (path_with_escaped_slashes_action).
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.KEEP_UNCHANGED,
        early_header_mutation_extensions=[_strip_internal_headers()],
        local_reply_config=_local_reply_config(),
        access_log=[_stdout_access_log()] if access_log else [],
    )
    return Listener(
        name="gateway",
        address=_address(config.listen.envoy.address, config.listen.envoy.port),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm))
                ]
            )
        ],
    )


def _strip_internal_headers() -> TypedExtensionConfig:
    mutations = [
        HeaderMutation(remove_on_match=HeaderMutationRemoveOnMatch(key_matcher=StringMatcher(prefix=prefix)))
        for prefix in _STRIPPED_PREFIXES
    ]
    return TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation",
        typed_config=_pack(EarlyHeaderMutation(mutations=mutations)),
    )


def _grpc(filter_name: str, timeout: float | None = None) -> GrpcService:
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=GRPC_CLUSTER),
        timeout=_seconds(timeout) if timeout is not None else None,
        # Both ext_procs call the same Process method on the same port; this gRPC request header
        # tells the service which one opened the stream (GrpcService.initial_metadata).
        initial_metadata=[HeaderValue(key=FILTER_METADATA_KEY, value=filter_name)],
    )


def _buffer(limits: Limits) -> HttpFilter:
    # The whole body is in memory before ext_authz is asked, and a body over the limit gets 413,
    # with or without Content-Length (Buffer.max_request_bytes, which also sets the stream's buffer
    # limit for gateway.sign's BUFFERED mode). Without it, a body still arriving while ext_authz
    # checks is held by flow-control watermarks instead: seen with the binary, a body over the
    # limit then stalls until the idle timeout or, racing, passes whole, and a body over the
    # 1 MiB connection buffer can stall even under the limit.
    return HttpFilter(
        name=BUFFER_FILTER, typed_config=_pack(Buffer(max_request_bytes=limits.max_request_body_bytes))
    )


def _ext_authz(limits: Limits) -> HttpFilter:
    authz = ExtAuthz(
        grpc_service=_grpc(EXT_AUTHZ_FILTER, limits.ext_authz_timeout),
        transport_api_version=ApiVersion.V3,
        # Fail closed: an unreachable or failing service denies with 503 (ExtAuthz.status_on_error).
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # ext_authz writes x-gateway-upstream, which the route's cluster_header reads: the cached
        # route must be recomputed after its header mutations (ExtAuthz.clear_route_cache).
        clear_route_cache=True,
        # Reject malformed header values from the service with a 500 instead of forwarding them.
        validate_mutations=True,
        # with_request_body unset: the token and the path are all ext_authz needs.
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=_pack(authz))


# Processing modes as (request headers, request body, response headers, response body); trailers
# are never sent. Both ext_procs are idle at filter level and each inference route switches its
# mode on (ExtProcPerRoute.overrides.processing_mode). Why: a request that Envoy rejects in the
# codec (a header name with an underscore, say) matches no route, yet its 400 still runs through the
# encoder filters; a sign filter waiting there for the service kept the 400 from being written before
# Envoy closed the connection, and the client saw an empty reply.
_Mode = tuple[bool, ProcessingModeBodySendMode, bool, ProcessingModeBodySendMode]
_IDLE: _Mode = (False, ProcessingModeBodySendMode.NONE, False, ProcessingModeBodySendMode.NONE)
# The whole request body at once (SigV4 signs its hash; the buffer filter has already bounded it);
# response headers, so the service can switch error and non-streaming bodies to BUFFERED with
# mode_override.
_SIGN: _Mode = (True, ProcessingModeBodySendMode.BUFFERED, True, ProcessingModeBodySendMode.NONE)
# (Skipping the request headers and mutating them from the body response does not work: with
# request_header_mode SKIP Envoy has already passed the headers on, and the mutation is dropped.)
# Vertex: a bearer token does not cover the body, so the service never needs to see it.
_SIGN_HEADERS: _Mode = (True, ProcessingModeBodySendMode.NONE, True, ProcessingModeBodySendMode.NONE)
# Copies of the response as it streams (observability mode supports STREAMED, not BUFFERED).
_METER: _Mode = (False, ProcessingModeBodySendMode.NONE, True, ProcessingModeBodySendMode.STREAMED)


def _mode(mode: _Mode) -> ProcessingMode:
    request_headers, request_body, response_headers, response_body = mode

    def header(send: bool) -> ProcessingModeHeaderSendMode:
        return ProcessingModeHeaderSendMode.SEND if send else ProcessingModeHeaderSendMode.SKIP

    return ProcessingMode(
        request_header_mode=header(request_headers),
        request_body_mode=request_body,
        response_header_mode=header(response_headers),
        response_body_mode=response_body,
        request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
    )


def _sign(limits: Limits) -> HttpFilter:
    sign = ExternalProcessor(
        grpc_service=_grpc(SIGN_FILTER),
        failure_mode_allow=False,
        # 503 like ext_authz, rather than 500/504, for an unreachable or failing service; it also
        # covers ext_authz's own 503, which passes through this filter's response path.
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # Idle unless the route switches it on (see _IDLE).
        processing_mode=_mode(_IDLE),
        # The service answers response headers with mode_override BUFFERED for errors and
        # non-streaming responses, so it can rewrite them (ExternalProcessor.allow_mode_override).
        allow_mode_override=True,
        message_timeout=_seconds(limits.ext_proc_timeout),
        metadata_options=MetadataOptions(
            # ext_authz's identity and decisions arrive in ProcessingRequest.metadata_context.
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_AUTHZ_FILTER]),
            # What the signer decided (upstream, resolved model) for the meter to read.
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[SIGN_FILTER]),
        ),
        # Rewriting :path or :authority must not re-run route matching: the route (and so the
        # per-route filter settings and body limit) was chosen on the client's path.
        route_cache_action=ExternalProcessorRouteCacheAction.RETAIN,
        mutation_rules=HeaderMutationRules(
            allow_expression=RegexMatcher(regex=_SIGN_MUTABLE),
            # A refused mutation would send an unsigned request upstream: fail it with 500 instead.
            disallow_is_error=True,
        ),
    )
    return HttpFilter(name=SIGN_FILTER, typed_config=_pack(sign))


def _meter() -> HttpFilter:
    meter = ExternalProcessor(
        grpc_service=_grpc(METER_FILTER),
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # Envoy sends copies and never waits for an answer, so the stream is relayed unchanged at
        # full speed while the service counts tokens (ExternalProcessor.observability_mode).
        observability_mode=True,
        processing_mode=_mode(_IDLE),
        metadata_options=MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_AUTHZ_FILTER, SIGN_FILTER]),
        ),
        # Keeps the side stream open after the client's stream ends so the last chunks (with the
        # final usage) still reach the meter (ExternalProcessor.deferred_close_timeout).
        deferred_close_timeout=datetime.timedelta(seconds=5),
    )
    return HttpFilter(name=METER_FILTER, typed_config=_pack(meter))


def _router() -> HttpFilter:
    # No x-envoy-upstream-service-time and friends on responses (Router.suppress_envoy_headers).
    return HttpFilter(
        name="envoy.filters.http.router", typed_config=_pack(Router(suppress_envoy_headers=True))
    )


# --- routes -------------------------------------------------------------------------------------


def _route_config(limits: Limits) -> RouteConfiguration:
    body_limit = limits.max_request_body_bytes
    routes = [
        Route(
            name="healthz",
            match=RouteMatch(path="/healthz"),
            route=RouteAction(cluster=PORTAL_CLUSTER, timeout=datetime.timedelta(seconds=5)),
            typed_per_filter_config=_filters_off(BUFFER_FILTER, EXT_AUTHZ_FILTER, SIGN_FILTER, METER_FILTER),
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
                typed_per_filter_config=_filters_off(EXT_AUTHZ_FILTER, SIGN_FILTER, METER_FILTER),
            )
            for name, prefix in (("well_known", "/.well-known"), ("oauth", "/oauth"), ("device", "/device"))
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
        _inference("bedrock_stream", _match("POST", regex=_BEDROCK_STREAM), True, limits, _SIGN),
        _inference("bedrock_invoke", _match("POST", regex=_BEDROCK_INVOKE), False, limits, _SIGN),
        _inference(
            "bedrock_inference_profiles",
            _match("GET", path_prefix="/inference-profiles"),
            False,
            limits,
            _SIGN_HEADERS,
        ),
        _inference("vertex_stream", _match("POST", regex=_VERTEX_STREAM), True, limits, _SIGN_HEADERS),
        _inference("vertex_invoke", _match("POST", regex=_VERTEX_INVOKE), False, limits, _SIGN_HEADERS),
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
        typed_per_filter_config=_filters_off(BUFFER_FILTER, EXT_AUTHZ_FILTER, SIGN_FILTER, METER_FILTER),
    )


def _envelope(kind: str, message: str) -> str:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}, separators=(",", ":"))


def _match(method: str, *, regex: str | None = None, path_prefix: str | None = None) -> RouteMatch:
    # safe_regex matches the path without its query string (RouteMatch.safe_regex);
    # path_separated_prefix matches "/inference-profiles" and below, but not "/inference-profilesX".
    headers = [HeaderMatcher(name=":method", string_match=StringMatcher(exact=method))]
    if regex is not None:
        return RouteMatch(safe_regex=RegexMatcher(regex=regex), headers=headers)
    if path_prefix is None:
        raise ValueError("a route needs a regex or a path prefix")
    return RouteMatch(path_separated_prefix=path_prefix, headers=headers)


def _inference(name: str, match: RouteMatch, streaming: bool, limits: Limits, sign: _Mode) -> Route:
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
            # gateway.sign sets :authority to the upstream's own host when it signs.
            auto_host_rewrite=False,
        ),
        # The routing header, and the client's address, which the cloud has no use for.
        request_headers_to_remove=[UPSTREAM_HEADER, *_CLIENT_ADDRESS_HEADERS],
        typed_per_filter_config={
            SIGN_FILTER: _pack(ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=_mode(sign)))),
            METER_FILTER: _pack(
                ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=_mode(_METER)))
                if streaming
                else ExtProcPerRoute(disabled=True)
            ),
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


# --- local replies ------------------------------------------------------------------------------

# Envoy's own error replies (413 over the body limit, 503 when a service is unreachable, ...) in the
# Anthropic envelope. Denials from ext_authz and immediate responses from ext_proc are local replies
# too, but the services already write them as application/json envelopes; the CEL condition leaves
# any reply that carries a JSON content-type alone. (An access-log header_filter cannot do this: it
# matches the *request* headers.)
_NOT_JSON = (
    "!('content-type' in response.headers)"
    " || !response.headers['content-type'].startsWith('application/json')"
)
_LOCAL_REPLIES: tuple[tuple[int, int, str, str], ...] = (
    (413, 413, "request_too_large", "Request exceeds the maximum allowed size."),
    (404, 404, "not_found_error", "Not found."),
    (429, 429, "rate_limit_error", "Too many requests; retry later."),
    (400, 499, "invalid_request_error", "The request could not be processed."),
    (500, 599, "api_error", "The gateway could not complete the request; retry later."),
)


def _local_reply_config() -> LocalReplyConfig:
    return LocalReplyConfig(
        mappers=[_mapper(low, high, kind, message) for low, high, kind, message in _LOCAL_REPLIES]
    )


def _mapper(low: int, high: int, kind: str, message: str) -> ResponseMapper:
    bounds = (
        [(ComparisonFilterOp.EQ, low)]
        if low == high
        else [(ComparisonFilterOp.GE, low), (ComparisonFilterOp.LE, high)]
    )
    status_filters = [
        AccessLogFilter(
            status_code_filter=StatusCodeFilter(
                comparison=ComparisonFilter(op=op, value=RuntimeUInt32(default_value=code))
            )
        )
        for op, code in bounds
    ]
    not_json = AccessLogFilter(
        extension_filter=ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=_pack(ExpressionFilter(expression=_NOT_JSON)),
        )
    )
    return ResponseMapper(
        filter=AccessLogFilter(and_filter=AndFilter(filters=[*status_filters, not_json])),
        body=DataSource(inline_string=_envelope(kind, message)),
        body_format_override=_JSON_BODY,
    )


def _stdout_access_log() -> AccessLog:
    return AccessLog(name="envoy.access_loggers.stdout", typed_config=_pack(StdoutAccessLog()))


# --- clusters -----------------------------------------------------------------------------------


def _grpc_cluster(config: GatewayConfig, ports: Sequence[int]) -> Cluster:
    host = _connect_host(config.listen.grpc.address)
    return _cluster(
        GRPC_CLUSTER,
        host,
        ports,
        connect_timeout=1.0,
        # gRPC needs HTTP/2 (HttpProtocolOptions.explicit_http_config).
        protocol=HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http2_protocol_options=Http2ProtocolOptions()
            )
        ),
    )


def _portal_cluster(config: GatewayConfig) -> Cluster:
    return _cluster(
        PORTAL_CLUSTER,
        _connect_host(config.listen.portal.address),
        [config.listen.portal.port],
        connect_timeout=1.0,
        protocol=HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http_protocol_options=Http1ProtocolOptions()
            )
        ),
    )


def _upstream_clusters(config: GatewayConfig, ca_bundle: str) -> list[Cluster]:
    clusters: list[Cluster] = []
    seen: dict[str, str] = {}
    for name, upstream in config.upstreams:
        cluster = upstreams.cluster_name(name)
        if cluster in seen:
            raise ConfigError(
                f"upstreams.{name}",
                f"name clashes with upstream {seen[cluster]!r} as Envoy cluster {cluster}",
            )
        seen[cluster] = name
        ep = upstreams.endpoint(upstream)
        if ep.tls:
            protocol = HttpProtocolOptions(
                # SNI and certificate SAN follow the :authority that gateway.sign sets, which is
                # the same host as the cluster's fixed sni below
                # (UpstreamHttpProtocolOptions.auto_sni, auto_san_validation).
                upstream_http_protocol_options=UpstreamHttpProtocolOptions(
                    auto_sni=not _is_ip(ep.host), auto_san_validation=not _is_ip(ep.host)
                ),
                # HTTP/2 when the server offers it over ALPN, else HTTP/1.1 (auto_config).
                auto_config=HttpProtocolOptionsAutoHttpConfig(
                    http_protocol_options=Http1ProtocolOptions(),
                    http2_protocol_options=Http2ProtocolOptions(),
                ),
            )
            transport = _upstream_tls(ep.host, ca_bundle)
        else:
            # Plain HTTP only reaches loopback (authz.config.validate enforces it).
            protocol = HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http_protocol_options=Http1ProtocolOptions()
                )
            )
            transport = None
        clusters.append(
            _cluster(
                cluster,
                ep.host,
                [ep.port],
                connect_timeout=upstream.connect_timeout,
                protocol=protocol,
                transport=transport,
            )
        )
    return clusters


def _upstream_tls(host: str, ca_bundle: str) -> TransportSocket:
    ip = _is_ip(host)
    san = SubjectAltNameMatcher(
        san_type=SubjectAltNameMatcherSanType.IP_ADDRESS if ip else SubjectAltNameMatcherSanType.DNS,
        matcher=StringMatcher(exact=host),
    )
    tls = UpstreamTlsContext(
        # RFC 6066 forbids IP literals in SNI.
        sni="" if ip else host,
        common_tls_context=CommonTlsContext(
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=ca_bundle),
                match_typed_subject_alt_names=[san],
            ),
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(tls))


def _cluster(
    name: str,
    host: str,
    ports: Sequence[int],
    *,
    connect_timeout: float,
    protocol: HttpProtocolOptions,
    transport: TransportSocket | None = None,
) -> Cluster:
    ip = _is_ip(host)
    return Cluster(
        name=name,
        # A host name is resolved by Envoy and re-resolved as DNS changes; one connection target
        # at a time suits cloud endpoints behind their own load balancers (LOGICAL_DNS).
        type=ClusterDiscoveryType.STATIC if ip else ClusterDiscoveryType.LOGICAL_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.AUTO if ip else ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_seconds(connect_timeout),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[
                        LbEndpoint(endpoint=Endpoint(address=_address(host, port))) for port in ports
                    ]
                )
            ],
        ),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=_MAX_CONCURRENT,
                    max_pending_requests=_MAX_CONCURRENT,
                    max_requests=_MAX_CONCURRENT,
                )
            ]
        ),
        typed_extension_protocol_options={_HPO_KEY: _pack(protocol)},
        transport_socket=transport,
    )


# --- helpers ------------------------------------------------------------------------------------


def _pack(message: betterproto2.Message) -> AnyProto:
    return AnyProto.pack(message)


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _connect_host(listen_host: str) -> str:
    """The address Envoy dials for a service that listens on ``listen_host`` (a wildcard bind is
    reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)  # noqa: S104


def _spell_out_fail_closed(rendered: dict[str, Any]) -> None:
    """Write ``failure_mode_allow: false`` into the output although it is the proto default (proto
    JSON omits defaults), so a reviewer of the rendered YAML sees that every service fails closed."""
    for listener in rendered["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] in (EXT_AUTHZ_FILTER, SIGN_FILTER, METER_FILTER):
                        http_filter["typed_config"].setdefault("failure_mode_allow", False)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the Envoy bootstrap for a gateway config file."""
    parser = argparse.ArgumentParser(prog="python -m authz.envoy_render", description=main.__doc__)
    parser.add_argument("config", help="gateway YAML configuration")
    parser.add_argument("--grpc-port", type=int, action="append", dest="grpc_ports", help="repeat per worker")
    parser.add_argument("--ca-bundle", default=DEFAULT_CA_BUNDLE, help="PEM bundle for upstream certificates")
    parser.add_argument("--access-log", action="store_true", help="log each request on stdout")
    parser.add_argument(
        "--skip-file-refs",
        action="store_true",
        help="do not read ${file:...} references (secrets never appear in the bootstrap)",
    )
    args = parser.parse_args(argv)
    try:
        if args.skip_file_refs:
            config = load_for_render(args.config, os.environ)
        else:
            config = config_loader.load(args.config, os.environ)
        text = render_yaml(
            config, grpc_ports=args.grpc_ports, ca_bundle=args.ca_bundle, access_log=args.access_log
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
