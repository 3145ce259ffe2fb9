"""The gateway's metrics and how a usage row, a refusal or a timing adds to them. Pure.

Names follow the OpenTelemetry GenAI semantic conventions where they exist
(``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration``,
``gen_ai.client.operation.time_to_first_chunk``, attributes ``gen_ai.*``); the rest are the
gateway's own (``gateway.*``). Every figure derives from what the request path hands over: the
finished :class:`~authz.store.usagerow.UsageRow` the ledger records, a refusal's reason, a
handling time. Per-user attributes (``enduser.id``) are added only when configured: the usage
table is where per-user detail lives.
"""

from __future__ import annotations

from collections.abc import Mapping

from authz.store.usagerow import UsageRow
from authz.telemetry.aggregate import Histogram, Instrument, Sum

# Attribute names.
TOKEN_TYPE = "gen_ai.token.type"  # noqa: S105 - an attribute name, not a secret
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
ERROR_TYPE = "error.type"
USER = "enduser.id"
OUTCOME = "gateway.outcome"
DENIAL_REASON = "gateway.denial_reason"
CLIENT_FORMAT = "gateway.client_format"
UPSTREAM = "gateway.upstream"
POLICY = "gateway.policy"
OPERATION = "gateway.operation"
STATUS = "http.response.status_code"
STREAM = "gateway.ext_proc.stream"

# gen_ai.provider.name per upstream kind (semantic-conventions registry values).
PROVIDERS = {"bedrock": "aws.bedrock", "vertex": "gcp.vertex_ai", "anthropic": "anthropic"}

# Bucket bounds advised by the GenAI conventions for tokens and for operation durations
# (gen_ai.client.token.usage, gen_ai.client.operation.duration).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# ext_authz and ext_proc answer in well under a millisecond; these resolve that range.
HANDLING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

STREAMING_OPERATIONS = frozenset({"stream"})
TOKEN_TYPES = ("input", "output", "cache_creation", "cache_read")
"""``gen_ai.token.type`` values: the usage row's input, output, cache-write and cache-read columns."""


def denial_reason(reason: str | None) -> str:
    """The bounded part of a refusal reason (``policy: model x is not allowed`` -> ``policy``)."""
    return (reason or "unknown").split(":", 1)[0].strip()[:64]


class GatewayMetrics:
    """Every metric the gateway keeps, and the one place rows turn into measurements."""

    def __init__(self, upstream_kinds: Mapping[str, str], *, per_user: bool = False) -> None:
        self._providers = {name: PROVIDERS.get(kind, kind) for name, kind in upstream_kinds.items()}
        self._per_user = per_user
        user = (USER,) if per_user else ()
        genai = (OPERATION_NAME, PROVIDER, REQUEST_MODEL, UPSTREAM, POLICY, *user)
        self.tokens = Histogram(
            Instrument("gen_ai.client.token.usage", "{token}", "Tokens used, by type.", (*genai, TOKEN_TYPE)),
            TOKEN_BUCKETS,
        )
        self.duration = Histogram(
            Instrument(
                "gen_ai.client.operation.duration",
                "s",
                "Time from the request's arrival to its last byte, for requests sent upstream.",
                (*genai, ERROR_TYPE),
            ),
            DURATION_BUCKETS,
        )
        self.first_chunk = Histogram(
            Instrument(
                "gen_ai.client.operation.time_to_first_chunk",
                "s",
                "Time from a streamed request's arrival to the upstream's first response bytes.",
                genai,
            ),
            DURATION_BUCKETS,
        )
        self.requests = Sum(
            Instrument(
                "gateway.requests",
                "{request}",
                "Requests decided by the gateway, by outcome (refusals without a known user included).",
                (
                    OUTCOME,
                    DENIAL_REASON,
                    CLIENT_FORMAT,
                    OPERATION,
                    UPSTREAM,
                    REQUEST_MODEL,
                    POLICY,
                    STATUS,
                    *user,
                ),
            )
        )
        self.estimated = Sum(
            Instrument(
                "gateway.usage.estimated",
                "{request}",
                "Requests whose token counts are partly estimated from the bytes sent (the answer "
                "was cut short before the upstream reported usage), by outcome and which counts.",
                (OUTCOME, "gateway.estimated"),
            )
        )
        self.cost = Sum(
            Instrument(
                "gateway.cost",
                "USD",
                "Cost of requests at the configured prices.",
                (REQUEST_MODEL, POLICY, UPSTREAM, *user),
            )
        )
        self.check_time = Histogram(
            Instrument("gateway.ext_authz.duration", "s", "Time ext_authz spent deciding a request.", ()),
            HANDLING_BUCKETS,
        )
        self.exchange_time = Histogram(
            Instrument(
                "gateway.ext_proc.duration",
                "s",
                "Time ext_proc spent on a request, all its messages together (a failover attempt's"
                " stream apart).",
                (STREAM,),
            ),
            HANDLING_BUCKETS,
        )
        self.credential_failures = Sum(
            Instrument(
                "gateway.upstream.credential_refresh_failures",
                "{failure}",
                "Failed refreshes of an upstream's cloud credential.",
                (UPSTREAM,),
            )
        )
        # Zero from the start for every upstream, so a dashboard shows "no failures" rather than nothing.
        for name in upstream_kinds:
            self.credential_failures.add((name,), 0)
        self.spend_reserved = Sum(
            Instrument(
                "gateway.spend.reserved",
                "USD",
                "Spend reserved at admission against caps.",
                ("gateway.spend.scope",),
            )
        )
        self.spend_refusals = Sum(
            Instrument(
                "gateway.spend.refusals",
                "{request}",
                "Requests refused because a spend cap was reached.",
                ("gateway.spend.scope",),
            )
        )
        self.relayed = Sum(
            Instrument(
                "gateway.telemetry.relayed",
                "{request}",
                "Client telemetry requests, forwarded or dropped (and why).",
                ("gateway.telemetry.signal", "gateway.telemetry.result"),
            )
        )

    @property
    def histograms(self) -> tuple[Histogram, ...]:
        """Every histogram, for the exporters."""
        return (self.tokens, self.duration, self.first_chunk, self.check_time, self.exchange_time)

    @property
    def sums(self) -> tuple[Sum, ...]:
        """Every counter, for the exporters."""
        return (
            self.requests,
            self.estimated,
            self.cost,
            self.credential_failures,
            self.spend_reserved,
            self.spend_refusals,
            self.relayed,
        )

    def row(self, row: UsageRow) -> None:
        """Count one finished request.

        The access log's report of an allowed request that did not finish is left out: the
        exchange reported the same request (a cut row, which the ledger merges it with) and that
        report carries the counts. Only a worker that died mid-request leaves the access log's row
        alone; that request is in the ledger but not the metrics.
        """
        if row.recorded_by == "access_log" and row.outcome != "denied":
            return
        user = ((row.user_email or row.user_sub or ""),) if self._per_user else ()
        model = row.requested_model or ""
        upstream = row.upstream or ""
        policy = row.policy or ""
        denied = row.outcome == "denied"
        self.requests.add(
            (
                row.outcome,
                denial_reason(row.reason) if denied else "",
                row.ingress_format,
                row.operation,
                upstream,
                model,
                policy,
                str(row.status),
                *user,
            )
        )
        if row.input_tokens_estimated or row.output_tokens_estimated:
            which = ",".join(
                name
                for name, flag in (
                    ("input", row.input_tokens_estimated),
                    ("output", row.output_tokens_estimated),
                )
                if flag
            )
            self.estimated.add((row.outcome, which))
        if row.cost_usd:
            self.cost.add((model, policy, upstream, *user), float(row.cost_usd))
        if denied or not upstream:
            return  # nothing was asked of a model
        operation = "chat" if row.operation in ("invoke", "stream") else row.operation
        genai = (operation, self._providers.get(upstream, ""), model, upstream, policy, *user)
        tokens = self.tokens
        for kind, count in (
            ("input", row.input_tokens),
            ("output", row.output_tokens),
            ("cache_creation", row.cache_write_tokens),
            ("cache_read", row.cache_read_tokens),
        ):
            if count:
                tokens.record((*genai, kind), count)
        if row.latency_ms is not None:
            error = "" if row.outcome == "complete" else row.outcome
            self.duration.record((*genai, error), row.latency_ms / 1000.0)
        if row.ttfb_ms is not None and row.operation in STREAMING_OPERATIONS:
            self.first_chunk.record(genai, row.ttfb_ms / 1000.0)

    def refusal(self, reason: str) -> None:
        """Count a request refused before anyone was identified (it writes no row)."""
        user = ("",) if self._per_user else ()
        status = _REFUSAL_STATUS.get(reason, "401" if reason.startswith("token_") else "")
        self.requests.add(("denied", denial_reason(reason), "", "", "", "", "", status, *user))


# The status ext_authz answers each anonymous refusal with (authz.gateway.authorize): token
# problems are 401, the rest as listed.
_REFUSAL_STATUS = {"malformed_header": "400", "unknown_route": "404"}
