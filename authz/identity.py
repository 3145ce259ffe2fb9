"""Who made one request and what the gateway decided for it: built once, carried everywhere.

ext_authz builds a :class:`RequestIdentity` from the verified token, the request line and headers
and the policy decision; Envoy carries it to ext_proc (``authz.gateway.context``, a protobuf in
dynamic metadata); the usage row is built from it by one builder (``authz.billing.accounting``).
A refused request carries what was known when it was refused (no policy, perhaps no user).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal

# Bounds on client-supplied strings kept in rows (the header limit bounds them already; these
# keep one request from making a row several kilobytes wide).
_MAX_HEADER_VALUE = 256


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified subject of a gateway token."""

    sub: str
    email: str
    groups: tuple[str, ...]
    session_id: str | None
    models: tuple[str, ...] | None = None
    """The token's own model limit (a service token's ``--models``, authz.signin.service_tokens),
    applied on top of the policy's, by ext_authz or, for a model named in the body, by ext_proc."""


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What the client said about itself in headers (recorded, never trusted for decisions)."""

    cc_session_id: str | None = None
    agent_id: str | None = None
    parent_agent_id: str | None = None
    user_agent: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ClientFacts:
        """Claude Code's session and agent ids and the User-Agent, bounded."""

        def get(name: str) -> str | None:
            value = headers.get(name)
            return value[:_MAX_HEADER_VALUE] if value else None

        return cls(
            cc_session_id=get("x-claude-code-session-id"),
            agent_id=get("x-claude-code-agent-id"),
            parent_agent_id=get("x-claude-code-parent-agent-id"),
            user_agent=get("user-agent"),
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """What admission reserved for a request: ``usd`` (its estimate) on each of ``leases``, one per
    capped spend (authz.billing.leases). Settled when the request's usage row is written."""

    usd: Decimal
    leases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChainUpstream:
    """One upstream of a request's failover chain, with what ext_authz decided for it: the id it
    receives for the requested model and whether that is priced as regional (None and False for a
    Messages request, whose model the body names: ext_proc resolves it per upstream)."""

    upstream: str
    kind: str
    upstream_model: str | None = None
    regional: bool = False


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """Identity and decisions for one request (``protos/claude_gateway/v1/context.proto``).

    ``requested_model`` is the model as the client named it, parsed by the upstream kind's
    grammar and re-serialised; ``model`` its canonical first-party id (policy and prices);
    ``upstream_model`` the id the upstream receives. ``request_bytes`` is the declared body length.

    ``chain`` is empty for a request only one upstream can serve. When it holds two or more
    (authz.envoy.failover), Envoy tries them in order and ``upstream`` and its fields name the
    first until the answer says which one answered (:meth:`answered_by`).
    """

    request_id: str
    started_at: float
    client_format: str
    operation: str
    streaming: bool = False
    caller: Caller | None = None
    client: ClientFacts = ClientFacts()
    policy: str | None = None
    upstream: str | None = None
    upstream_kind: str | None = None
    requested_model: str | None = None
    model: str | None = None
    upstream_model: str | None = None
    regional: bool = False
    upstream_query: str = ""
    request_bytes: int = 0
    reservation: Reservation | None = None
    chain: tuple[ChainUpstream, ...] = ()

    def answered_by(self, upstream: str) -> RequestIdentity | None:
        """This identity with ``upstream`` of its chain as the upstream (its kind, model id and
        pricing); None when the chain holds no such upstream."""
        for member in self.chain:
            if member.upstream == upstream:
                return replace(
                    self,
                    upstream=member.upstream,
                    upstream_kind=member.kind,
                    upstream_model=member.upstream_model,
                    regional=member.regional,
                )
        return None
