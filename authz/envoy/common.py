"""Names and small helpers shared by the Envoy bootstrap builders (:mod:`authz.envoy.render`).

The public names are re-exported by :mod:`authz.envoy.render`, which stays the entry point.
"""

from __future__ import annotations

import datetime
import json

import betterproto2
from envoy_data_plane.envoy.config.core.v3 import Address, DataSource, SocketAddress, SubstitutionFormatString
from envoy_data_plane.google.protobuf import Any as AnyProto

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

# The body as given (a literal, so no %-operators are interpreted), sent as application/json.
_JSON_BODY = SubstitutionFormatString(
    text_format_source=DataSource(inline_string="%LOCAL_REPLY_BODY%"), content_type="application/json"
)


# --- helpers ------------------------------------------------------------------------------------


def _pack(message: betterproto2.Message) -> AnyProto:
    return AnyProto.pack(message)


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _envelope(kind: str, message: str) -> str:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}, separators=(",", ":"))
