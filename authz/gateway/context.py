"""The per-request context ext_authz hands to ext_proc as Envoy dynamic metadata.

ext_authz learns who is calling and what the policy decided; ext_proc needs all of it to sign the
upstream request and to write the usage row. Envoy carries it between the two filters in the
``envoy.filters.http.ext_authz`` dynamic-metadata namespace (ext_proc's
``metadata_options.forwarding_namespaces``), so the two services share no state and may run in
different processes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from authz._generated.claude_gateway.v1 import context_pb2

METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
CONTEXT_KEY = "gateway"

_OPTIONAL = (
    "session_id",
    "cc_session_id",
    "agent_id",
    "parent_agent_id",
    "user_agent",
    "model_raw",
    "model",
    "model_segment",
)
# email may be empty: service identities (authz.serviceid) have none.
_REQUIRED = ("request_id", "sub", "ingress_format", "operation", "upstream")


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Identity and decisions for one allowed inference request
    (``protos/claude_gateway/v1/context.proto``)."""

    request_id: str
    started_at: float
    sub: str
    email: str
    groups: tuple[str, ...]
    session_id: str | None
    cc_session_id: str | None
    agent_id: str | None
    parent_agent_id: str | None
    user_agent: str | None
    ingress_format: str
    operation: str
    streaming: bool
    upstream: str
    model_raw: str | None
    model: str | None
    model_segment: str | None
    regional: bool

    def to_metadata(self) -> dict[str, str]:
        """Flat string fields for the metadata Struct.

        The whole context travels as one base64 string of the serialized message (one Struct field
        to read on the hot path); a few fields are repeated on their own so access logs can use
        ``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:email)%``.
        """
        message = context_pb2.RequestContext(
            request_id=self.request_id,
            started_at=self.started_at,
            sub=self.sub,
            email=self.email,
            groups=self.groups,
            ingress_format=self.ingress_format,
            operation=self.operation,
            streaming=self.streaming,
            upstream=self.upstream,
            regional=self.regional,
            **{name: value for name in _OPTIONAL if (value := getattr(self, name)) is not None},
        )
        return {
            CONTEXT_KEY: base64.b64encode(message.SerializeToString()).decode("ascii"),
            "email": self.email,
            "model": self.model or "",
            "upstream": self.upstream,
        }

    @classmethod
    def from_metadata(cls, fields: Mapping[str, Any]) -> RequestContext | None:
        """Rebuild the context from the metadata Struct fields; None when absent or unreadable."""
        raw = fields.get(CONTEXT_KEY)
        if not isinstance(raw, str):
            return None
        message = context_pb2.RequestContext()
        try:
            message.ParseFromString(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError, DecodeError):
            return None
        if not all(getattr(message, name) for name in _REQUIRED):
            return None
        optional = {name: getattr(message, name) if message.HasField(name) else None for name in _OPTIONAL}
        return cls(
            request_id=message.request_id,
            started_at=message.started_at,
            sub=message.sub,
            email=message.email,
            groups=tuple(message.groups),
            ingress_format=message.ingress_format,
            operation=message.operation,
            streaming=message.streaming,
            upstream=message.upstream,
            regional=message.regional,
            **optional,
        )
