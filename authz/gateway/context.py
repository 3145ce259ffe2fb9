"""The request identity as Envoy dynamic metadata, from ext_authz to ext_proc.

Envoy carries it between the two filters in the ``envoy.filters.http.ext_authz`` dynamic-metadata
namespace (ext_proc's ``metadata_options.forwarding_namespaces``), so the two services share no
state and may run in different processes. The whole identity travels as one base64 string of the
serialized message: Envoy copies the metadata into every ext_proc message, so it stays one field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf.message import DecodeError

from authz._generated.claude_gateway.v1 import context_pb2
from authz.identity import Caller, ChainUpstream, ClientFacts, RequestIdentity, Reservation

METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
CONTEXT_KEY = "gateway"
# A spend reservation, when admission made one: "<usd> <lease id> <lease id> ...". Kept out of the
# protobuf so that requests without caps carry nothing more.
RESERVATION_KEY = "reservation"

_OPTIONAL = ("policy", "upstream", "upstream_kind", "requested_model", "model", "upstream_model")
_CLIENT = ("cc_session_id", "agent_id", "parent_agent_id", "user_agent")


def to_metadata(identity: RequestIdentity) -> dict[str, str]:
    """Flat string fields for the metadata Struct."""
    message = context_pb2.RequestContext(
        request_id=identity.request_id,
        started_at=identity.started_at,
        client_format=identity.client_format,
        operation=identity.operation,
        streaming=identity.streaming,
        regional=identity.regional,
        upstream_query=identity.upstream_query,
        request_bytes=identity.request_bytes,
        **{n: v for n in _OPTIONAL if (v := getattr(identity, n)) is not None},
        **{n: v for n in _CLIENT if (v := getattr(identity.client, n)) is not None},
    )
    caller = identity.caller
    if caller is not None:
        message.sub = caller.sub
        message.email = caller.email
        message.groups.extend(caller.groups)
        if caller.session_id is not None:
            message.session_id = caller.session_id
        if caller.models is not None:
            message.models.patterns.extend(caller.models)
    for member in identity.chain:
        entry = message.chain.add(
            upstream=member.upstream, upstream_kind=member.kind, regional=member.regional
        )
        if member.upstream_model is not None:
            entry.upstream_model = member.upstream_model
    fields = {CONTEXT_KEY: base64.b64encode(message.SerializeToString()).decode("ascii")}
    if identity.reservation is not None:
        fields[RESERVATION_KEY] = " ".join((str(identity.reservation.usd), *identity.reservation.leases))
    return fields


def _reservation(value: Any) -> Reservation | None:
    if not isinstance(value, str):
        return None
    usd, *leases = value.split(" ")
    try:
        amount = Decimal(usd)
    except InvalidOperation:
        return None
    return Reservation(amount, tuple(leases)) if amount.is_finite() and amount >= 0 else None


def from_metadata(fields: Mapping[str, Any]) -> RequestIdentity | None:
    """Rebuild the identity from the metadata Struct fields; None when absent or unreadable, or
    when it names no caller or upstream (ext_authz always sets both on an allowed request)."""
    raw = fields.get(CONTEXT_KEY)
    if not isinstance(raw, str):
        return None
    m = context_pb2.RequestContext()
    try:
        m.ParseFromString(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, DecodeError):
        return None
    if not (
        m.request_id and m.client_format and m.operation and m.HasField("sub") and m.HasField("upstream")
    ):
        return None
    return RequestIdentity(
        request_id=m.request_id,
        started_at=m.started_at,
        client_format=m.client_format,
        operation=m.operation,
        streaming=m.streaming,
        caller=Caller(
            sub=m.sub,
            email=m.email,
            groups=tuple(m.groups),
            session_id=m.session_id if m.HasField("session_id") else None,
            models=tuple(m.models.patterns) if m.HasField("models") else None,
        ),
        client=ClientFacts(**{n: getattr(m, n) if m.HasField(n) else None for n in _CLIENT}),
        regional=m.regional,
        upstream_query=m.upstream_query,
        request_bytes=m.request_bytes,
        reservation=_reservation(fields.get(RESERVATION_KEY)),
        chain=tuple(
            ChainUpstream(
                upstream=c.upstream,
                kind=c.upstream_kind,
                upstream_model=c.upstream_model if c.HasField("upstream_model") else None,
                regional=c.regional,
            )
            for c in m.chain
        ),
        **{n: getattr(m, n) if m.HasField(n) else None for n in _OPTIONAL},
    )
