"""What ``make bench`` measures, as data: scenarios, gateway variants, targets and request bytes.

A *scenario* is one kind of client request (format, path, body size, streaming or not) and the
canned upstream answer it ends on (``tests/bench_upstream.py``). A *variant* is one way of running
the gateway (a config overlay and a worker count); each selected variant is a stack of its own.
Every scenario runs on Envoy alone and on every selected variant, side by side.

To add a scenario, append to ``SCENARIOS``. One whose client speaks another format than its
upstream (``POST /v1/messages`` translated to Bedrock, say) sets ``upstream_op`` to the canned
answer it reaches and ``baseline_path`` to that answer's path, which Envoy alone (no translation)
requests instead; its responses through the gateway are not byte-compared with the canned body.
To add a variant, add it to ``VARIANTS`` with the overlay merged into the development config
(``authz.dev.devstack.Stack.write_config``), e.g. spend caps or telemetry switched on.
"""

from __future__ import annotations

import fnmatch
import json
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.bench_load import http_request
from tests.bench_upstream import STREAM_DELTAS

BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
VERTEX_PREFIX = "/v1/projects/p/locations/us-east5/publishers/anthropic/models"
# The same model as Claude Code names it in its gateway mode (the gateway maps it to the two above).
MESSAGES_MODEL = "claude-sonnet-4-5"
MESSAGES_PATH = "/v1/messages?beta=true"
MESSAGES_VERTEX_GROUP = "bench-messages-vertex"  # a policy whose first upstream is Vertex
LARGE_BODY = 60_000  # bytes of conversation: Claude Code's usual request size
BETAS = ["claude-code-20250219", "interleaved-thinking-2025-05-14"]


@dataclass(frozen=True)
class Targets:
    """What one scenario must reach, as a fraction of Envoy alone in the same run."""

    min_rps_ratio: float
    max_added_p50_ms: float | None = None  # gateway p50 minus Envoy alone's p50
    max_p99_ms: float | None = None  # the gateway's own p99
    # (scenario key, fraction): this scenario's ratio to Envoy alone must be at least that
    # fraction of the other scenario's, in the same run (e.g. a translating pair against the
    # pass-through pair it reaches).
    min_share_of: tuple[str, float] | None = None


NON_STREAMING = Targets(min_rps_ratio=0.18, max_added_p50_ms=6.0)
STREAMING = Targets(min_rps_ratio=0.10, max_p99_ms=80.0)
# The Messages API translated for Bedrock, against Anthropic's own gateway translating the same
# stream (7.4% of Envoy alone; 7.6% with the 60 KB body) and this gateway's pass-through.
MESSAGES_STREAMING = Targets(min_rps_ratio=0.08, max_p99_ms=80.0)
MESSAGES_NON_STREAMING = Targets(min_rps_ratio=0.08, min_share_of=("bedrock_invoke", 0.90))
MESSAGES_NON_STREAMING_60K = Targets(min_rps_ratio=0.08, min_share_of=("bedrock_invoke_60k", 0.90))


@dataclass(frozen=True)
class Scenario:
    """One kind of request, sent identically to Envoy alone and to every gateway variant."""

    key: str
    label: str
    client_format: str  # what the client speaks: "bedrock", "vertex" or "messages"
    path: str
    streaming: bool
    body_bytes: int  # 0: a one-line prompt; else about this many bytes of conversation
    upstream_op: str  # the canned answer it ends on (tests/bench_upstream.upstream_operations)
    targets: Targets
    baseline_path: str | None = None  # what Envoy alone requests, when it differs from ``path``
    # The group of the caller's token (None: the developers, whose first upstream is Bedrock): a
    # Messages request goes to its policy's first upstream.
    group: str | None = None

    @property
    def passthrough(self) -> bool:
        """Whether the gateway relays the upstream's bytes unchanged (client format = upstream kind)."""
        return self.upstream_op.startswith(self.client_format + "_")

    def body(self) -> bytes:
        """The request body in the client's format."""
        return request_body(self.client_format, self.streaming, self.body_bytes)


def _scenarios() -> tuple[Scenario, ...]:
    bedrock = f"/model/{BEDROCK_MODEL}"
    vertex = f"{VERTEX_PREFIX}/{VERTEX_MODEL}"
    ev = f"{STREAM_DELTAS + 5} ev"
    base = (
        ("bedrock_invoke", "Bedrock invoke", "bedrock", f"{bedrock}/invoke", False),
        (
            "bedrock_stream",
            f"Bedrock stream ({ev})",
            "bedrock",
            f"{bedrock}/invoke-with-response-stream",
            True,
        ),
        ("vertex_raw", "Vertex rawPredict", "vertex", f"{vertex}:rawPredict", False),
        ("vertex_stream", f"Vertex stream ({ev})", "vertex", f"{vertex}:streamRawPredict", True),
    )
    out: list[Scenario] = []
    for key, label, fmt, path, streaming in base:
        targets = STREAMING if streaming else NON_STREAMING
        out.append(Scenario(key, label, fmt, path, streaming, 0, key, targets))
        out.append(Scenario(f"{key}_60k", f"{label}, 60 KB", fmt, path, streaming, LARGE_BODY, key, targets))
    # The Messages API, translated by the gateway: Envoy alone asks the canned answer's own path.
    messages = (
        (
            "messages_bedrock_invoke",
            "Messages -> Bedrock invoke",
            False,
            "bedrock_invoke",
            f"{bedrock}/invoke",
            None,
        ),
        (
            "messages_bedrock_stream",
            f"Messages -> Bedrock stream ({ev})",
            True,
            "bedrock_stream",
            f"{bedrock}/invoke-with-response-stream",
            None,
        ),
        (
            "messages_vertex_stream",
            f"Messages -> Vertex stream ({ev})",
            True,
            "vertex_stream",
            f"{vertex}:streamRawPredict",
            MESSAGES_VERTEX_GROUP,
        ),
    )
    for key, label, streaming, op, baseline, group in messages:
        for suffix, size in (("", 0), ("_60k", LARGE_BODY)):
            if streaming:
                targets = MESSAGES_STREAMING
            else:
                targets = MESSAGES_NON_STREAMING_60K if size else MESSAGES_NON_STREAMING
            out.append(
                Scenario(
                    key + suffix,
                    label + (", 60 KB" if size else ""),
                    "messages",
                    MESSAGES_PATH,
                    streaming,
                    size,
                    op,
                    targets,
                    baseline_path=baseline,
                    group=group,
                )
            )
    return tuple(out)


SCENARIOS = _scenarios()
SMOKE_SCENARIOS = ("bedrock_invoke", "vertex_stream")


def select_scenarios(spec: str | None, default: Sequence[str] | None = None) -> tuple[Scenario, ...]:
    """The scenarios named in a comma-separated list of keys or globs (``bedrock_*``), in table order."""
    patterns = [p.strip() for p in spec.split(",") if p.strip()] if spec else list(default or ["*"])
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(s.key, p) for s in SCENARIOS)]
    if unknown:
        known = ", ".join(s.key for s in SCENARIOS)
        raise ValueError(f"no scenario matches {', '.join(unknown)} (known: {known})")
    return tuple(s for s in SCENARIOS if any(fnmatch.fnmatchcase(s.key, p) for p in patterns))


@dataclass(frozen=True)
class Variant:
    """One way of running the gateway: the development stack plus a config overlay.

    ``policy_overlay`` is merged into every policy of the stack's config (the policy list itself is
    the bench's). A variant with ``versus`` is measured against that variant in the same run (it is
    selected along with it): its p50 may exceed the other's by at most ``max_added_p50_ms``.
    """

    key: str
    label: str
    overlay: Mapping[str, Any] = field(default_factory=dict)
    workers: int | None = None  # None: the --workers option
    otlp_sink: bool = False  # telemetry.otlp.endpoint set to the bench's discarding collector
    policy_overlay: Mapping[str, Any] = field(default_factory=dict)
    versus: str | None = None
    max_added_p50_ms: float | None = None


# Spend caps and rate limits on every request, far from any limit (what admission costs in the
# common case: every bucket admitted from the worker's lease, no PostgreSQL round trip). The caller
# has five capped spends: their own day, week and month, the developers' shared budget and the
# organisation's; the rates count every request.
HUGE = 10**9
SPEND_CAPS = Variant(
    "gateway_caps",
    "gateway, spend caps and rate limits",
    overlay={
        "spend": {
            "group_budgets": [{"group": "developers", "period": "monthly", "usd": HUGE}],
            "org_caps": [{"period": "monthly", "usd": HUGE}],
        }
    },
    policy_overlay={
        "spend_caps": [{"period": p, "usd": HUGE} for p in ("daily", "weekly", "monthly")],
        "rate_limits": {"requests_per_minute": HUGE, "tokens_per_minute": HUGE},
    },
    versus="gateway",
    max_added_p50_ms=0.3,
)


def _telemetry(key: str, label: str, sample_ratio: float) -> Variant:
    """Metrics on both readers (the Prometheus endpoint, OTLP every 10 s to the bench's discarding
    collector) and ``telemetry.traces.sample_ratio`` as given (0: no traces)."""
    return Variant(
        key,
        label,
        overlay={
            "telemetry": {
                "prometheus": {"enabled": True, "port": 0},
                "otlp": {"interval": 10},
                "traces": {"sample_ratio": sample_ratio},
            }
        },
        otlp_sink=True,
    )


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("gateway", "gateway"),
        Variant("gateway_2w", "gateway, 2 workers", workers=2),
        SPEND_CAPS,
        # Metrics alone: the Prometheus endpoint and OTLP every 10 s, no traces.
        _telemetry("telemetry_metrics", "gateway, metrics on", 0.0),
        # Metrics on both readers and every request traced through Envoy, ext_authz and ext_proc,
        # exported to a local collector that discards.
        _telemetry("telemetry", "gateway, telemetry on", 1.0),
        # The same with one request in ten traced: what sampling saves against tracing every request.
        _telemetry("telemetry_sampled", "gateway, telemetry on, 10% traced", 0.1),
        # Translated streams without keep-alives run in STREAMED mode instead of FULL_DUPLEX_STREAMED:
        # against "gateway", what the duplex mode costs.
        Variant("gateway_nopings", "gateway, no keep-alives", overlay={"translate": {"ping_interval": 0}}),
        # Failover on (the bench's stacks run with it off, each request having one upstream): a
        # Messages request may go to either upstream of its policy, a Bedrock and a Vertex one, so
        # it takes the chain's cluster and route and one more ext_proc stream, the attempt's, on
        # which it is signed; Bedrock and Vertex requests still have one upstream each. Against
        # "gateway", what a two-upstream chain costs when its first upstream answers.
        Variant(
            "gateway_failover",
            "gateway, failover chains",
            overlay={"failover": {"max_attempts": None}},
            versus="gateway",
        ),
    )
}


def select_variants(spec: str) -> tuple[Variant, ...]:
    """The variants named in a comma-separated list, in the order given; a variant measured
    ``versus`` another brings that one along (before it), so the two are reported side by side."""
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys:
        raise ValueError(f"unknown gateway variant {', '.join(unknown)!r} (known: {', '.join(VARIANTS)})")
    ordered: list[str] = []
    for key in keys:
        versus = VARIANTS[key].versus
        if versus is not None and versus not in ordered:
            ordered.append(versus)
        if key not in ordered:
            ordered.append(key)
    return tuple(VARIANTS[k] for k in ordered)


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --- request bodies and bytes -----------------------------------------------------------------------

_WORDS = (
    "the function returns a list of parsed events from the buffer while the caller keeps reading "
    "def class import async await yield self config request response stream header token upstream "
    "error retry timeout value index path module test fixture assert expected actual bytes string "
    "refactor this file so that the handler validates input before it writes the usage row and then "
    "explain why the previous version leaked the connection when the client disconnected mid-stream"
).split()


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        out.append(word)
        length += len(word) + 1
        if rng.random() < 0.08:
            out.append("\n")
    return " ".join(out)[:size]


def _conversation(total: int = LARGE_BODY) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A Claude Code-like system prompt and conversation with about ``total`` bytes of text."""
    rng = random.Random(20251001)
    system = [{"type": "text", "text": "You are Claude Code. " + _text(rng, 6_000)}]
    messages: list[dict[str, Any]] = []
    size = 6_000
    turn = 0
    while size < total:
        chunk = min(6_000, total - size)
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": [{"type": "text", "text": _text(rng, chunk)}]})
        size += chunk
        turn += 1
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": [{"type": "text", "text": "Go on."}]})
    return system, messages


def request_body(client_format: str, streaming: bool, size: int) -> bytes:
    """A request body in ``client_format``: a one-line prompt (``size`` 0) or a ~``size``-byte one."""
    if size:
        system, messages = _conversation(size)
    else:
        system, messages = [], [{"role": "user", "content": "Say hello."}]
    body: dict[str, Any] = {"max_tokens": 32_000, "messages": messages, "temperature": 1}
    if system:
        body["system"] = system
    if client_format == "bedrock":
        # Bedrock: no model and no stream in the body; betas travel in the body.
        body["anthropic_version"] = "bedrock-2023-05-31"
        body["anthropic_beta"] = BETAS
    elif client_format == "vertex":
        body["anthropic_version"] = "vertex-2023-10-16"
        if streaming:
            body["stream"] = True
    elif client_format == "messages":
        # The Messages API: the model in the body, betas in a header (Claude Code puts model first).
        body = {"model": MESSAGES_MODEL, **body}
        if streaming:
            body["stream"] = True
    else:
        raise ValueError(f"no request body for client format {client_format!r}")
    return json.dumps(body, separators=(",", ":")).encode()


def session_id(tag: str) -> str:
    """The ``X-Claude-Code-Session-Id`` of one job: its ledger rows are found by it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"claude-gateway-bench/{tag}"))


def request_headers(scenario: Scenario, *, token: str | None, session: str) -> dict[str, str]:
    """The headers Claude Code sends (``token`` None: no credential); Host and length excluded."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "claude-cli/2.0.0 (external, cli)",
        "x-app": "cli",
        "X-Claude-Code-Session-Id": session,
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if scenario.client_format in ("vertex", "messages"):
        headers["anthropic-beta"] = ",".join(BETAS)
    if scenario.client_format == "messages":
        headers["anthropic-version"] = "2023-06-01"
    return headers


def request_path(scenario: Scenario, *, baseline: bool) -> str:
    """The path requested: Envoy alone (``baseline``) asks for the upstream's when they differ."""
    return (scenario.baseline_path or scenario.path) if baseline else scenario.path


def request_bytes(
    scenario: Scenario, *, host: str, token: str | None, session: str, body: bytes, baseline: bool = False
) -> bytes:
    """The whole HTTP/1.1 request, as Claude Code sends it."""
    headers = request_headers(scenario, token=token, session=session)
    return http_request("POST", request_path(scenario, baseline=baseline), host, headers, body)
