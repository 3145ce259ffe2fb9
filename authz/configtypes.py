"""Typed, frozen configuration schema.

Each dataclass is one section of the YAML file; field names are the YAML keys. Defaults here are
the documented defaults (docs/configuration.md). Validation that concerns more than one field lives
in :mod:`authz.config`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from authz.jsondoc import JsonObject
from backends.descriptor import UpstreamSettings


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on. Port 0 picks a free port (tests, ``authz run``)."""

    address: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """The certificate Envoy's listener serves: PEM files, reloaded when they are replaced."""

    certificate_file: str
    private_key_file: str


@dataclass(frozen=True, slots=True)
class EnvoyAddress(Address):
    """Envoy's client-facing listener: an address, and how it speaks TLS.

    Without ``tls`` it is plain HTTP, which start-up refuses on a non-loopback address unless
    ``allow_plaintext`` says a TLS terminator is in front (Claude Code requires https beyond
    loopback).
    """

    tls: ListenerTls | None = None
    allow_plaintext: bool = False


@dataclass(frozen=True, slots=True)
class Listen:
    """Where each process listens."""

    envoy: EnvoyAddress = field(default_factory=lambda: EnvoyAddress(port=8080))
    envoy_admin: Address = field(default_factory=lambda: Address(port=9901))
    grpc: Address = field(default_factory=lambda: Address(port=9001))
    portal: Address = field(default_factory=lambda: Address(port=9100))


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One session key. ``private_key`` is set on the signing key only; verify keys may hold just
    the public half."""

    kid: str
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    private_key: str | None = None
    public_key: str | None = None


@dataclass(frozen=True, slots=True)
class Sessions:
    """Gateway sessions and access tokens (DESIGN.md, Sessions)."""

    issuer: str = "https://claude-gateway.invalid"
    audience: str = "claude-gateway"
    access_token_ttl: int = 900
    clock_skew: int = 30
    signing_key: SigningKey | None = None
    verify_keys: tuple[SigningKey, ...] = ()
    session_lifetime: int = 7 * 24 * 3600
    encryption_key: str | None = None
    revocation_resync_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class Oidc:
    """The company IdP the gateway signs users in with (an OpenID Connect relying party)."""

    issuer: str = ""
    client_id: str = ""
    client_secret: str | None = None
    client_auth_method: Literal["client_secret_basic", "client_secret_post", "private_key_jwt"] = (
        "client_secret_basic"
    )
    private_key: str | None = None
    private_key_kid: str | None = None
    private_key_algorithm: Literal["RS256", "ES256", "PS256"] = "RS256"
    scopes: tuple[str, ...] = ("openid", "email", "profile", "offline_access")
    id_token_algorithms: tuple[str, ...] = ("RS256", "ES256")
    groups_claim: str = "groups"
    email_claim: str = "email"
    use_userinfo: bool = False
    allowed_email_domains: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    clock_skew: int = 60
    refresh_grace: int = 0
    http_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Portal:
    """The sign-in pages and OAuth endpoints served on Envoy's listener."""

    public_url: str = "http://127.0.0.1:8080"
    device_code_ttl: int = 600
    device_poll_interval: int = 5
    user_code_attempts_per_minute: int = 10
    admin_groups: tuple[str, ...] = ()
    admin_session_ttl: int = 3600
    login_notice: str | None = None


@dataclass(frozen=True, slots=True)
class Store:
    """PostgreSQL and the local spool used while it is unreachable."""

    url: str = ""
    spool_dir: str = ""
    logout_spool_dir: str = ""
    batch_size: int = 200
    flush_interval: float = 0.2
    replay_interval: float = 5.0
    connect_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """A named upstream: one Envoy cluster and one credential source.

    ``settings`` is the kind's own typed section: every key of ``upstreams.<name>`` but ``kind``,
    built into the dataclass its descriptor names (``backends.bedrock.BedrockConfig``,
    ``backends.vertex.VertexConfig``, ...; the table is ``backends.kinds.KINDS``).
    """

    kind: str
    settings: UpstreamSettings


Period = Literal["daily", "weekly", "monthly"]


@dataclass(frozen=True, slots=True)
class SpendCap:
    """At most ``usd`` dollars per ``period`` (the UTC day, the week from Monday 00:00 UTC, the UTC
    month)."""

    period: Period
    usd: float


@dataclass(frozen=True, slots=True)
class GroupBudget:
    """A budget the members of ``group`` share: their spend together is capped."""

    group: str
    period: Period
    usd: float


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-user request and token rates (tokens: input, cache and output, counted when the usage row
    is written). Null: no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def any(self) -> bool:
        """Whether either limit is set."""
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may use which models through which upstreams.

    A user matches when they are in any of ``groups`` or their email domain is in
    ``email_domains``. Policies are tried in file order and the first match applies.
    ``managed_settings`` is the Claude Code managed-settings document the users it admits receive
    from ``GET /managed/settings`` (None: that endpoint answers 404, "no managed policy").
    """

    name: str
    groups: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()
    models: tuple[str, ...] = ("claude-*",)
    upstreams: tuple[str, ...] = ()
    spend_caps: tuple[SpendCap, ...] = ()
    rate_limits: RateLimits = field(default_factory=RateLimits)
    managed_settings: JsonObject | None = None

    def admits(self, email: str, groups: Iterable[str]) -> bool:
        """Whether this policy lists one of ``groups`` (exact, case-sensitive IdP group names) or
        the domain of ``email`` (case-insensitive, exact: no subdomains)."""
        if set(self.groups).intersection(groups):
            return True
        domain = _email_domain(email)
        return domain is not None and domain in {d.lower() for d in self.email_domains}


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float


@dataclass(frozen=True, slots=True)
class Pricing:
    """Prices per model family (longest matching prefix of the canonical model id wins)."""

    models: tuple[tuple[str, Price], ...] = ()
    fallback: Price = field(default_factory=lambda: Price(5.0, 25.0, 6.25, 10.0, 0.5))
    regional_premium: float = 0.10


@dataclass(frozen=True, slots=True)
class Limits:
    """Request size and timing limits enforced by Envoy and the services."""

    max_request_body_bytes: int = 20 * 1024 * 1024
    max_request_headers_kb: int = 96
    stream_idle_timeout: float = 600.0
    request_timeout: float = 0.0
    ext_authz_timeout: float = 2.0
    ext_proc_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Translate:
    """Translating a client format for an upstream of another kind (Messages API to Bedrock)."""

    ping_interval: float = 10.0


@dataclass(frozen=True, slots=True)
class Failover:
    """Retrying a request on a policy's next upstream when one fails before answering
    (docs/architecture.md, "Failover")."""

    max_attempts: int | None = None
    """Upstreams tried per request at most; None: every upstream of the policy that serves the
    client's format, once; 1: no failover."""


@dataclass(frozen=True, slots=True)
class ServiceTokens:
    """Access tokens for service identities (``authz service-tokens``): CI jobs, batch agents."""

    max_ttl: int = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Retention:
    """How long rows are kept, and how the pruner deletes them (in bounded batches, no long locks)."""

    usage_days: int = 400
    audit_days: int = 400
    interval: float = 3600.0
    batch_size: int = 5000
    expired_session_days: int = 7


@dataclass(frozen=True, slots=True)
class Spend:
    """Spend caps beyond the policies' own, and how admission leases budget (docs/architecture.md,
    "Money and limits")."""

    group_budgets: tuple[GroupBudget, ...] = ()
    org_caps: tuple[SpendCap, ...] = ()
    increase_url: str | None = None
    on_store_error: Literal["closed", "open"] = "closed"
    open_grace: float = 300.0
    lease_fraction: float = 0.1
    sync_interval: float = 2.0
    lease_ttl: float = 60.0


@dataclass(frozen=True, slots=True)
class Reload:
    """How the running services notice a changed configuration file (SIGHUP always reloads)."""

    watch_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class Otlp:
    """Where metrics, traces and relayed client telemetry are pushed (OTLP). An empty ``endpoint``
    pushes nothing; the ``OTEL_EXPORTER_OTLP_*`` variables stand in for keys the file leaves out
    (:func:`authz.config.loads`)."""

    endpoint: str = ""
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    headers: tuple[tuple[str, str], ...] = ()
    interval: float = 60.0
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class PrometheusEndpoint:
    """The Prometheus scrape endpoint (``/metrics``) of each worker: ``port + worker index``."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class Traces:
    """Tracing of inference requests through Envoy, ext_authz and ext_proc (needs ``otlp.endpoint``)."""

    sample_ratio: float = 1.0


@dataclass(frozen=True, slots=True)
class Relay:
    """Claude Code's own OTLP telemetry (``POST /v1/metrics|logs|traces``), forwarded to ``otlp.endpoint``."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_queue: int = 256


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Metrics (OTLP push and Prometheus pull), traces and the client telemetry relay."""

    service_name: str = "claude-gateway"
    otlp: Otlp = field(default_factory=Otlp)
    prometheus: PrometheusEndpoint = field(default_factory=PrometheusEndpoint)
    traces: Traces = field(default_factory=Traces)
    relay: Relay = field(default_factory=Relay)
    per_user_attributes: bool = False

    @property
    def tracing(self) -> bool:
        """Whether inference requests are traced (an OTLP endpoint and a positive sample ratio)."""
        return bool(self.otlp.endpoint) and self.traces.sample_ratio > 0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole gateway configuration."""

    listen: Listen = field(default_factory=Listen)
    workers: int = 1
    sessions: Sessions = field(default_factory=Sessions)
    oidc: Oidc | None = None
    portal: Portal = field(default_factory=Portal)
    store: Store = field(default_factory=Store)
    upstreams: tuple[tuple[str, Upstream], ...] = ()
    policies: tuple[Policy, ...] = ()
    pricing: Pricing = field(default_factory=Pricing)
    limits: Limits = field(default_factory=Limits)
    translate: Translate = field(default_factory=Translate)
    failover: Failover = field(default_factory=Failover)
    service_tokens: ServiceTokens = field(default_factory=ServiceTokens)
    retention: Retention = field(default_factory=Retention)
    telemetry: Telemetry = field(default_factory=Telemetry)
    spend: Spend = field(default_factory=Spend)
    reload: Reload = field(default_factory=Reload)

    def upstream(self, name: str) -> Upstream:
        """The upstream called ``name``; KeyError if none."""
        for key, value in self.upstreams:
            if key == name:
                return value
        raise KeyError(name)

    def policy_for(self, email: str, groups: Iterable[str]) -> Policy | None:
        """The policy that applies to a user: the first, in file order, that admits them (one rule
        for inference, authz/gateway/policy.py, and the managed settings, authz/signin/portal);
        None when none does."""
        groups = tuple(groups)
        return next((p for p in self.policies if p.admits(email, groups)), None)


def _email_domain(email: str) -> str | None:
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain:
        return None
    return domain.lower()
