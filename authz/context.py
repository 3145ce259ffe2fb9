"""The per-request context ext_authz hands to ext_proc as Envoy dynamic metadata.

ext_authz learns who is calling and what the policy decided; ext_proc needs all of it to sign the
upstream request and to write the usage row. Envoy carries it between the two filters in the
``envoy.filters.http.ext_authz`` dynamic-metadata namespace (ext_proc's
``metadata_options.forwarding_namespaces``), so the two services share no state and may run in
different processes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
CONTEXT_KEY = "gateway"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Identity and decisions for one allowed inference request."""

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

        The whole context travels as one JSON string (one Struct field to read on the hot path);
        a few fields are repeated on their own so access logs can use
        ``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:email)%``.
        """
        return {
            CONTEXT_KEY: json.dumps(asdict(self), separators=(",", ":")),
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
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or set(data) != _FIELDS:
            return None
        for name, kinds in _TYPES.items():
            value = data[name]
            if isinstance(value, bool) and bool not in kinds:
                return None
            if not isinstance(value, kinds):
                return None
        groups = data["groups"]
        if not all(isinstance(g, str) for g in groups):
            return None
        data["groups"] = tuple(groups)
        return cls(**data)


# The JSON type each field must have; anything else means the metadata is not ours.
_TYPES: dict[str, tuple[type, ...]] = {
    "request_id": (str,),
    "started_at": (int, float),
    "sub": (str,),
    "email": (str,),
    "groups": (list,),
    "session_id": (str, type(None)),
    "cc_session_id": (str, type(None)),
    "agent_id": (str, type(None)),
    "parent_agent_id": (str, type(None)),
    "user_agent": (str, type(None)),
    "ingress_format": (str,),
    "operation": (str,),
    "streaming": (bool,),
    "upstream": (str,),
    "model_raw": (str, type(None)),
    "model": (str, type(None)),
    "model_segment": (str, type(None)),
    "regional": (bool,),
}
_FIELDS = frozenset(_TYPES)
