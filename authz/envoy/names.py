"""The names Envoy's bootstrap and the gateway services agree on: headers, filter names, metadata
namespaces and attributes, the ext_authz body size, the workers' health-check timing, and where
Envoy dials a service. Plain values only, so the services read them without loading the bootstrap
builders (:mod:`authz.envoy.common` and the rest import them from here).
"""

from __future__ import annotations

GRPC_CLUSTER = "gateway_grpc"
PORTAL_CLUSTER = "gateway_portal"
UPSTREAM_HEADER = "x-gateway-upstream"
"""Set by ext_authz on every allowed request to the cluster (:func:`authz.envoy.upstreams.cluster_name`)."""
BUFFER_FILTER = "envoy.filters.http.buffer"
"""Holds each request body, up to limits.max_request_body_bytes, before any service sees it."""
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
"""Filter name, and so the dynamic-metadata namespace ext_authz's ``dynamic_metadata`` lands in."""
EXT_PROC_FILTER = "gateway.ext_proc"
"""The ext_proc filter that translates, signs and meters each inference request."""
STRIP_RATELIMIT_FILTER = "gateway.strip_upstream_ratelimit"
"""Removes the upstream's ``anthropic-ratelimit-*`` response headers (the gateway sends its own)."""
RECORDED_NAMESPACE = "gateway.recorded"
"""Dynamic metadata the exchange sets once it wrote a request's usage row (the access log's filter)."""

# --- failover (authz.envoy.failover) ---------------------------------------------------------------
ATTEMPT_FILTER = "gateway.attempt"
"""The upstream ext_proc filter of a failover cluster: signs (and translates) each attempt for the
upstream Envoy picked (Router upstream filters run once per attempt)."""
ENDPOINT_NAMESPACE = "gateway.upstream"
"""Endpoint metadata of a failover cluster: ``name``, the configured upstream an endpoint is."""
UPSTREAM_NAME_ATTRIBUTE = f"xds.upstream_host_metadata.filter_metadata['{ENDPOINT_NAMESPACE}']['name']"
"""The attribute (a CEL expression) the attempt filter sends: the upstream Envoy picked for it."""
ATTEMPT_COUNT_ATTRIBUTE = "upstream.request_attempt_count"
"""The attribute the attempt filter sends too: which attempt of the request this is (1, 2, ...)."""
ANSWERED_HEADER = "x-gateway-answered"
"""Set by a failover route on the response: the upstream whose answer it is (or that failed last)."""
ATTEMPTS_HEADER = "x-gateway-attempts"
"""Set by a failover route on the response: how many upstreams Envoy tried."""
ATTEMPT_NAMESPACE = "gateway.attempt"
"""Dynamic metadata an attempt sets when it answers itself instead of reaching its upstream (it
could not prepare the request): what happened, for the usage row."""

# How much of a request body ext_authz receives: Claude Code's requests (50-80 KB) whole.
AUTHZ_BODY_BYTES = 128 * 1024


# Active gRPC health checks on the workers (grpc.health.v1, served by authz.ops.health): Envoy's
# main thread asks each worker once a second, whether or not traffic flowed (one tiny RPC per
# worker per second: negligible next to the requests, even on two cores). A worker answering
# NOT_SERVING (draining) or not answering within the timeout (stuck) twice in a row stops getting
# new requests; one SERVING answer brings it back. Envoy's default panic threshold (50%) is kept
# on purpose: when every worker of a replica drains at once, Envoy keeps using them rather than
# refusing the requests still on their way to it.
HEALTH_CHECK_INTERVAL = 1.0
HEALTH_CHECK_TIMEOUT = 1.0
HEALTH_CHECK_UNHEALTHY_THRESHOLD = 2
HEALTH_CHECK_HEALTHY_THRESHOLD = 1
# The longest a draining worker may keep receiving new requests: `unhealthy_threshold` checks, one
# interval apart, each answered NOT_SERVING at once. authz.service waits at least this long.
HEALTH_CHECK_DETECTION_SECONDS = HEALTH_CHECK_INTERVAL * HEALTH_CHECK_UNHEALTHY_THRESHOLD


def connect_host(listen_host: str) -> str:
    """The address Envoy dials for a service that listens on ``listen_host`` (a wildcard bind is
    reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)  # noqa: S104
