"""Requests no usage row was written for, as Envoy's access-log service reports them.

Envoy logs a request to the service only when nothing marked it recorded by its end (the access
log's filter, authz/envoy/filters.py): Envoy answered it itself (a 404, 413 or 431, a fail-closed
503), ext_authz refused a caller it could not name, or the exchange never reached the request's end
(the client or the upstream cut the stream, the worker serving it died or stalled). Each becomes a
row when the caller is known, and is counted otherwise (a flood of anonymous requests must not
load the database).

An allowed request's report becomes a partial row (``recorded_by = access_log``) with what Envoy
knows: how the request ended (its status and response flags) and how many bytes went each way,
from which the tokens are estimated. If the exchange also wrote a partial row for it (its stream
closed early), the two merge in the ledger (authz.store.usagerow.merge_rows): the access log
names the cause, the exchange contributes what it counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from authz.billing.accounting import BYTES_PER_INPUT_TOKEN, usage_row
from authz.billing.pricing import PriceBook
from authz.identity import Caller, ClientFacts, RequestIdentity
from authz.store.usagerow import UsageRow
from backends.usage import MeterResult, Usage

log = logging.getLogger("authz.gateway.accesslog")

# Response flags naming the upstream as the side that failed or cut the response.
_UPSTREAM_FLAGS = frozenset(
    {
        "upstream_remote_reset",
        "upstream_connection_failure",
        "upstream_connection_termination",
        "upstream_protocol_error",
        "upstream_request_timeout",
        "upstream_overflow",
        "upstream_retry_limit_exceeded",
        "upstream_max_stream_duration_reached",
        "no_healthy_upstream",
    }
)
_CLIENT_FLAGS = frozenset({"downstream_connection_termination", "downstream_remote_reset"})
# A streamed answer's bytes carry framing (event-stream prelude and base64, SSE field names) around
# the text, so several bytes go to each output token; the figure is an estimate, marked as one.
BYTES_PER_OUTPUT_TOKEN = 4


# The paths Envoy routes to the portal (authz/envoy/routes.py): sign-in, discovery, the admin page,
# relayed client telemetry and Claude Code's managed settings. Envoy logs them like any request
# nothing recorded; they are neither usage nor refusals (a settings poll carries a valid token, and
# must not become a "denied" row).
_PORTAL_EXACT = frozenset(
    {"/healthz", "/device", "/admin", "/v1/metrics", "/v1/logs", "/v1/traces", "/managed/settings"}
)
_PORTAL_PREFIXES = ("/.well-known/", "/oauth/", "/device/", "/admin/")


def is_portal_path(path: str) -> bool:
    """Whether Envoy routes ``path`` (query string ignored) to the portal."""
    bare = path.split("?", 1)[0]
    return bare in _PORTAL_EXACT or bare.startswith(_PORTAL_PREFIXES)


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One access-log entry: what Envoy saw of a request, and the identity ext_authz gave it."""

    request_id: str
    started_at: float
    duration: float | None
    method: str
    path: str
    status: int
    details: str
    flags: frozenset[str]
    request_bytes: int
    response_bytes: int
    headers: Mapping[str, str]
    identity: RequestIdentity | None
    attempts: int | None = None
    """How many upstream requests Envoy made (AccessLogCommon.upstream_request_attempt_count)."""


class AccessLog:
    """Turns access-log records into usage rows or refusal counts."""

    def __init__(
        self,
        *,
        identify: Callable[[Mapping[str, str], float], Caller | None],
        record: Callable[[UsageRow], None],
        prices: PriceBook,
        count_refusal: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self._identify = identify
        self._record = record
        self._prices = prices
        self._count_refusal = count_refusal

    def handle(self, rec: AccessRecord) -> None:
        """Write the row a record stands for, or count it."""
        if rec.identity is None and is_portal_path(rec.path):
            return  # the portal's own pages and endpoints: no inference request to account for
        if rec.identity is not None:
            self._record(self._unfinished(rec, rec.identity))
            return
        # Refused before ext_authz allowed it: by Envoy itself, or by ext_authz without a caller.
        caller = self._identify(rec.headers, rec.started_at)
        reason = f"envoy: {rec.details or 'local reply'}"
        if caller is None:
            self._count_refusal(reason)
            return
        identity = RequestIdentity(
            request_id=rec.request_id,
            started_at=rec.started_at,
            client_format="unknown",
            operation="unknown",
            caller=caller,
            client=ClientFacts.from_headers(rec.headers),
            request_bytes=rec.request_bytes,
        )
        self._record(
            usage_row(
                identity,
                status=rec.status,
                outcome="denied",
                reason=reason,
                prices=self._prices,
                ended_at=rec.started_at + (rec.duration or 0.0),
                recorded_by="access_log",
            )
        )

    def _unfinished(self, rec: AccessRecord, identity: RequestIdentity) -> UsageRow:
        """An allowed request whose exchange did not reach its end."""
        if rec.flags & _UPSTREAM_FLAGS:
            outcome, why = "upstream_error", "the upstream failed or cut the response"
        elif rec.flags & _CLIENT_FLAGS:
            outcome, why = "client_aborted", "the client went away"
        else:
            outcome, why = "unmetered", "the gateway service handling it stopped before the end"
        flags = ", ".join(sorted(rec.flags)) or "none"
        reason = f"{why} (envoy: {rec.details or 'no details'}; flags: {flags})"
        if rec.request_bytes:
            identity = replace(identity, request_bytes=rec.request_bytes)
        estimate = MeterResult(
            usage=Usage(),
            complete=False,
            estimated_output_tokens=rec.response_bytes // BYTES_PER_OUTPUT_TOKEN,
        )
        return usage_row(
            identity,
            status=rec.status,
            outcome=outcome,
            reason=reason,
            prices=self._prices,
            ended_at=rec.started_at + (rec.duration or 0.0),
            meter=estimate,
            estimate_input=rec.request_bytes >= BYTES_PER_INPUT_TOKEN,
            recorded_by="access_log",
            attempts=rec.attempts,
        )
