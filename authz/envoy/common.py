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
