"""The listener's HTTP filters for :mod:`authz.envoy.render`: buffer, ext_authz, the ext_proc
(``gateway.ext_proc``) with its processing modes, the router, the early header strip, and the
local-reply mappers that put Envoy's own errors in the Anthropic envelope.
"""

from __future__ import annotations

import datetime

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    AndFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    ExtensionFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation,
    HeaderMutationRemoveOnMatch,
    HeaderMutationRules,
)
from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    RuntimeUInt32,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import BufferSettings, ExtAuthz
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExternalProcessorRouteCacheAction,
    HeaderForwardingRules,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
    HeaderMutation as HeaderMutationFilter,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import Mutations
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation as EarlyHeaderMutation,
)
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode

from authz.configtypes import Limits
from authz.envoy.common import _JSON_BODY, _envelope, _pack, _seconds
from authz.envoy.names import (
    ANSWERED_HEADER,
    ATTEMPT_COUNT_ATTRIBUTE,
    ATTEMPT_FILTER,
    ATTEMPT_NAMESPACE,
    ATTEMPTS_HEADER,
    AUTHZ_BODY_BYTES,
    BUFFER_FILTER,
    ENDPOINT_NAMESPACE,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    GRPC_CLUSTER,
    RECORDED_NAMESPACE,
    STRIP_RATELIMIT_FILTER,
    UPSTREAM_NAME_ATTRIBUTE,
)

# Client-sent headers that only the gateway itself may set, and client forwarding headers the
# cloud has no use for (they would tell it about the client's network, as the client claims it).
# Removed before routing and before any filter runs
# (HttpConnectionManager.early_header_mutation_extensions), so neither ext_authz, the route table
# nor the upstream ever sees a forged one. Envoy appends its own X-Forwarded-For afterwards
# (use_remote_address); the inference routes drop that too.
_STRIPPED_PREFIXES = ("x-gateway-", "x-envoy-")
_STRIPPED_EXACT = ("x-forwarded-host", "forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-proto")

# Headers gateway.ext_proc may set beyond ext_proc's defaults. ``:authority``/``host`` are "routing"
# headers that ext_proc may not touch unless allowed (HeaderMutationRules.allow_all_routing), and
# allow_expression widens just these instead of also opening ``:method`` and ``:scheme``.
_MUTABLE = r"^(:authority|host|:path|authorization|content-length|x-api-key|x-amz-.*|x-goog-.*)$"


def _strip_internal_headers() -> TypedExtensionConfig:
    matchers = [StringMatcher(prefix=prefix) for prefix in _STRIPPED_PREFIXES]
    matchers += [StringMatcher(exact=name) for name in _STRIPPED_EXACT]
    mutations = [
        HeaderMutation(remove_on_match=HeaderMutationRemoveOnMatch(key_matcher=matcher))
        for matcher in matchers
    ]
    return TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation",
        typed_config=_pack(EarlyHeaderMutation(mutations=mutations)),
    )


def _grpc(timeout: float | None = None) -> GrpcService:
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=GRPC_CLUSTER),
        timeout=_seconds(timeout) if timeout is not None else None,
    )


def _buffer(limits: Limits) -> HttpFilter:
    # The whole body is in memory before ext_authz is asked, and a body over the limit gets 413,
    # with or without Content-Length (Buffer.max_request_bytes, which also sets the stream's buffer
    # limit for gateway.ext_proc's BUFFERED mode). Without it, a body still arriving while ext_authz
    # checks is held by flow-control watermarks instead: seen with the binary, a body over the
    # limit then stalls until the idle timeout or, racing, passes whole, and a body over the
    # 1 MiB connection buffer can stall even under the limit.
    return HttpFilter(
        name=BUFFER_FILTER, typed_config=_pack(Buffer(max_request_bytes=limits.max_request_body_bytes))
    )


def _ext_authz(limits: Limits) -> HttpFilter:
    authz = ExtAuthz(
        grpc_service=_grpc(limits.ext_authz_timeout),
        transport_api_version=ApiVersion.V3,
        # Fail closed: an unreachable or failing service denies with 503 (ExtAuthz.status_on_error).
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # ext_authz writes x-gateway-upstream, which the route's cluster_header reads: the cached
        # route must be recomputed after its header mutations (ExtAuthz.clear_route_cache).
        clear_route_cache=True,
        # Reject malformed header values from the service with a 500 instead of forwarding them.
        validate_mutations=True,
        # Header values as raw bytes, one entry per header line, so a repeated credential header
        # or a value that is not UTF-8 can be refused rather than joined or mangled
        # (ExtAuthz.encode_raw_headers).
        encode_raw_headers=True,
        # The start of the body, for the max_tokens a spend reservation prices (authz.billing.estimate).
        # The buffer filter already holds the whole body; past this many bytes ext_authz gets a
        # prefix (allow_partial_message) and a missing max_tokens is estimated at its maximum. As raw
        # bytes (pack_as_bytes): no UTF-8 string is built for it.
        with_request_body=BufferSettings(
            max_request_bytes=min(AUTHZ_BODY_BYTES, limits.max_request_body_bytes),
            allow_partial_message=True,
            pack_as_bytes=True,
        ),
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=_pack(authz))


def _strip_upstream_ratelimit(*, tag_answer: bool = False) -> HttpFilter:
    # The upstream's own rate-limit headers describe the gateway's cloud account, not the caller, and
    # would contradict the gateway's anthropic-ratelimit-unified-* standing headers: removed by
    # prefix (config.common.mutation_rules.v3.HeaderMutation.remove_on_match). An upstream filter of
    # the router (Router.upstream_http_filters), so it sees only what an upstream answered: the
    # gateway's own refusals (ext_authz local replies) keep their unified headers, and on the way
    # to the client ext_authz adds the caller's standing after this ran.
    mutations = [
        HeaderMutation(
            remove_on_match=HeaderMutationRemoveOnMatch(
                key_matcher=StringMatcher(prefix="anthropic-ratelimit-")
            )
        )
    ]
    if tag_answer:
        # On a failover cluster, the answer also says which upstream it is from and after how many
        # attempts, from Envoy's own records of the attempt (the endpoint's metadata, the attempt
        # count), over anything the upstream sent under those names. gateway.ext_proc reads and
        # removes them. Only upstream answers carry them: a reply Envoy writes itself (every
        # attempt failed without an answer) never does, so none reaches a client.
        mutations += [
            HeaderMutation(remove=ANSWERED_HEADER),
            HeaderMutation(remove=ATTEMPTS_HEADER),
            _set(ANSWERED_HEADER, f"%UPSTREAM_METADATA({ENDPOINT_NAMESPACE}:name)%"),
            _set(ATTEMPTS_HEADER, "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"),
        ]
    mutation = HeaderMutationFilter(mutations=Mutations(response_mutations=mutations))
    return HttpFilter(name=STRIP_RATELIMIT_FILTER, typed_config=_pack(mutation))


def _set(name: str, value: str) -> HeaderMutation:
    return HeaderMutation(
        append=HeaderValueOption(
            header=HeaderValue(key=name, value=value),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )


# Processing modes as (request headers, request body, response headers, response body); trailers
# are never sent. The ext_proc is idle at filter level and each inference route switches its mode
# on (ExtProcPerRoute.overrides.processing_mode). Why: a request that Envoy rejects in the codec (a
# header name with an underscore, say) matches no route, yet its 400 still runs through the
# encoder filters; a filter waiting there for the service kept the 400 from being written before
# Envoy closed the connection, and the client saw an empty reply.
Mode = tuple[bool, ProcessingModeBodySendMode, bool, ProcessingModeBodySendMode]
_IDLE: Mode = (False, ProcessingModeBodySendMode.NONE, False, ProcessingModeBodySendMode.NONE)


# The only headers the service reads (the exchange and the translators): every other header Envoy
# would serialize into each message, and the service parse, for nothing
# (ExternalProcessor.forward_rules). Header mutations are not limited by this list. The last two
# exist only on the answers of failover clusters, whose upstream filter sets them.
FORWARDED_HEADERS = (
    ":method",
    ":status",
    "content-type",
    "retry-after",
    "anthropic-beta",
    "anthropic-version",
    ANSWERED_HEADER,
    ATTEMPTS_HEADER,
)


def route_mode(*, request_body: bool) -> Mode:
    """The processing mode of one inference route, as configured: the request side only.

    Request headers always (the request is held there until it is prepared; skipping them and
    mutating headers from the body response does not work: with request_header_mode SKIP Envoy has
    already passed the headers on). The request body whole (BUFFERED; the buffer filter has
    bounded it) when the translator rewrites it or the upstream signs over it.

    The response side is off here and switched on by the service's answer to the request headers
    (``mode_override``, see ``authz/gateway/servicer.py``): response headers (an error is then
    switched to BUFFERED and rewritten), and the body whole for non-streaming answers or chunk by
    chunk for streams (STREAMED: Envoy waits for each chunk's answer, so nothing reaches the client
    uncounted). A request ext_authz refuses never reaches the service's request phase, so its local
    reply passes the filter without opening a stream: configured here, the response side would
    send every refusal's response to the service. ``POST /v1/messages`` is a stream or not as its
    body says: it starts STREAMED and the exchange switches a whole answer to BUFFERED, or a stream
    it rewrites with keep-alives to FULL_DUPLEX_STREAMED (in which Envoy relays nothing itself:
    every byte the client gets is one the exchange sent). mode_override may do so because the
    filter-level mode is not FULL_DUPLEX_STREAMED (ExternalProcessor.allow_mode_override).
    """
    body = ProcessingModeBodySendMode.BUFFERED if request_body else ProcessingModeBodySendMode.NONE
    return (True, body, False, ProcessingModeBodySendMode.NONE)


ANSWERED: Mode = (True, ProcessingModeBodySendMode.NONE, False, ProcessingModeBodySendMode.NONE)
"""A route the exchange answers itself from the request headers (``GET /v1/models``): nothing
else of the request or response is sent."""


def mode(mode: Mode) -> ProcessingMode:
    """The ProcessingMode message for a mode tuple."""
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


def _ext_proc(limits: Limits) -> HttpFilter:
    ext_proc = ExternalProcessor(
        grpc_service=_grpc(),
        failure_mode_allow=False,
        # 503 like ext_authz, rather than 500/504, for an unreachable or failing service; it also
        # covers ext_authz's own 503, which passes through this filter's response path.
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # Idle unless the route switches it on (see _IDLE).
        processing_mode=mode(_IDLE),
        # The service answers an error's response headers with mode_override BUFFERED, so it can
        # rewrite the error whole (ExternalProcessor.allow_mode_override).
        allow_mode_override=True,
        message_timeout=_seconds(limits.ext_proc_timeout),
        metadata_options=MetadataOptions(
            # ext_authz's identity and decisions arrive in ProcessingRequest.metadata_context, and on
            # a failover route what an attempt that answered itself says (gateway.attempt); a
            # namespace no filter set costs nothing.
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=[EXT_AUTHZ_FILTER, ATTEMPT_NAMESPACE]
            ),
            # The exchange marks a request whose usage row it wrote (see _service_access_log).
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[RECORDED_NAMESPACE]),
        ),
        forward_rules=HeaderForwardingRules(
            allowed_headers=ListStringMatcher(patterns=[StringMatcher(exact=h) for h in FORWARDED_HEADERS])
        ),
        # Rewriting :path or :authority must not re-run route matching: the route (and so the
        # per-route filter settings and body limit) was chosen on the client's path.
        route_cache_action=ExternalProcessorRouteCacheAction.RETAIN,
        mutation_rules=HeaderMutationRules(
            allow_expression=RegexMatcher(regex=_MUTABLE),
            # A refused mutation would send an unsigned request upstream: fail it with 500 instead.
            disallow_is_error=True,
        ),
    )
    return HttpFilter(name=EXT_PROC_FILTER, typed_config=_pack(ext_proc))


def attempt_ext_proc(limits: Limits, *, request_body: bool) -> HttpFilter:
    """The upstream ext_proc of a failover cluster (``gateway.attempt``): Envoy runs a cluster's
    upstream filters once per attempt (HttpProtocolOptions.http_filters), so each attempt is
    translated and signed for the upstream Envoy picked, which the filter sends as an attribute
    read from that endpoint's metadata, with the attempt's number
    (ExternalProcessor.request_attributes). The request side only: the response is metered by
    ``gateway.ext_proc`` once Envoy stopped retrying, and a failed attempt's answer never reaches
    the service. The body is sent whole when an attempt may need it (a Messages request is
    translated from it, SigV4 signs it); the service skips it per request when the upstream does
    not (mode_override, allow_mode_override)."""
    body = ProcessingModeBodySendMode.BUFFERED if request_body else ProcessingModeBodySendMode.NONE
    attempt = ExternalProcessor(
        grpc_service=_grpc(),
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        processing_mode=mode((True, body, False, ProcessingModeBodySendMode.NONE)),
        allow_mode_override=True,
        request_attributes=[UPSTREAM_NAME_ATTRIBUTE, ATTEMPT_COUNT_ATTRIBUTE],
        message_timeout=_seconds(limits.ext_proc_timeout),
        metadata_options=MetadataOptions(
            # The identity ext_authz decided (upstream filters share the request's metadata).
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_AUTHZ_FILTER]),
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[ATTEMPT_NAMESPACE]),
        ),
        forward_rules=HeaderForwardingRules(
            allowed_headers=ListStringMatcher(patterns=[StringMatcher(exact=h) for h in FORWARDED_HEADERS])
        ),
        route_cache_action=ExternalProcessorRouteCacheAction.RETAIN,
        mutation_rules=HeaderMutationRules(
            allow_expression=RegexMatcher(regex=_MUTABLE), disallow_is_error=True
        ),
    )
    return HttpFilter(name=ATTEMPT_FILTER, typed_config=_pack(attempt))


def upstream_filters(*first: HttpFilter, tag_answer: bool = False) -> list[HttpFilter]:
    """A router's or cluster's upstream filter chain: ``first``, the strip of the upstream's
    rate-limit headers (which on a failover cluster, ``tag_answer``, also says whose answer it is),
    then the codec filter, which ends every such chain (Router.upstream_http_filters; a cluster's own
    list replaces the router's)."""
    codec = HttpFilter(name="envoy.filters.http.upstream_codec", typed_config=_pack(UpstreamCodec()))
    return [*first, _strip_upstream_ratelimit(tag_answer=tag_answer), codec]


def _router() -> HttpFilter:
    # No x-envoy-upstream-service-time and friends on responses (Router.suppress_envoy_headers).
    router = Router(suppress_envoy_headers=True, upstream_http_filters=upstream_filters())
    return HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router))


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


# The access-log service hears about a request only when no usage row was written for it by
# the end of its exchange: Envoy answered it itself (404, 413, 431, a fail-closed 503), a refusal
# with no caller, or an exchange that never reached its end (the client or the upstream cut the
# stream, the worker died or stalled). A row that was written says so in the dynamic metadata
# (RECORDED_NAMESPACE from ext_proc, the ext_authz namespace's `recorded` from a denial), and those
# requests are not logged, so the common case costs one CEL evaluation.
_NOT_RECORDED = (
    f"!('{RECORDED_NAMESPACE}' in metadata.filter_metadata)"
    f" && !('{EXT_AUTHZ_FILTER}' in metadata.filter_metadata"
    f" && 'recorded' in metadata.filter_metadata['{EXT_AUTHZ_FILTER}'])"
)
# Request headers the access-log service reads: the credential (to name the caller of a request
# Envoy refused before ext_authz ran) and Claude Code's session and agent ids.
_LOGGED_HEADERS = (
    "authorization",
    "x-api-key",
    "user-agent",
    "x-claude-code-session-id",
    "x-claude-code-agent-id",
    "x-claude-code-parent-agent-id",
)


def _service_access_log() -> AccessLog:
    config = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name="gateway",
            grpc_service=_grpc(),
            transport_api_version=ApiVersion.V3,
            # Entries are batched into one stream message per second or per 16 KiB.
            buffer_flush_interval=datetime.timedelta(seconds=1),
            buffer_size_bytes=16 * 1024,
        ),
        additional_request_headers_to_log=list(_LOGGED_HEADERS),
    )
    not_recorded = AccessLogFilter(
        extension_filter=ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=_pack(ExpressionFilter(expression=_NOT_RECORDED)),
        )
    )
    return AccessLog(name="envoy.access_loggers.http_grpc", filter=not_recorded, typed_config=_pack(config))


def _stdout_access_log() -> AccessLog:
    return AccessLog(name="envoy.access_loggers.stdout", typed_config=_pack(StdoutAccessLog()))
