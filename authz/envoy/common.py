"""Small helpers shared by the Envoy bootstrap builders (:mod:`authz.envoy.render`); the names
they share with the gateway services live in :mod:`authz.envoy.names`.
"""

from __future__ import annotations

import datetime
import json

import betterproto2
from envoy_data_plane.envoy.config.core.v3 import Address, DataSource, SocketAddress, SubstitutionFormatString
from envoy_data_plane.google.protobuf import Any as AnyProto

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
