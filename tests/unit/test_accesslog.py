"""Envoy's access-log reports: the rows and counts they become, and how two partial reports of
one request merge into the one row the ledger keeps."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from authz.billing.pricing import PriceBook
from authz.gateway.accesslog import AccessLog, AccessRecord
from authz.identity import Caller, RequestIdentity
from authz.store.usagerow import UsageRow, merge_rows

T0 = 1_900_000_000.0
ALICE = Caller(sub="00u-alice", email="alice@example.com", groups=("eng",), session_id="s1")
IDENTITY = RequestIdentity(
    request_id="req-1",
    started_at=T0,
    client_format="bedrock",
    operation="stream",
    streaming=True,
    caller=ALICE,
    policy="eng",
    upstream="bedrock-us",
    upstream_kind="bedrock",
    requested_model="us.anthropic.claude-opus-5-5",
    model="claude-opus-5-5",
    upstream_model="us.anthropic.claude-opus-5-5",
    regional=True,
    request_bytes=4000,
)


def record(**changes: object) -> AccessRecord:
    base = AccessRecord(
        request_id="req-1",
        started_at=T0,
        duration=2.5,
        method="POST",
        path="/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream",
        status=200,
        details="via_upstream",
        flags=frozenset(),
        request_bytes=4000,
        response_bytes=8000,
        headers={},
        identity=IDENTITY,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class Sink:
    def __init__(self) -> None:
        self.rows: list[UsageRow] = []
        self.refusals: list[str] = []


def handler(sink: Sink, caller: Caller | None = None) -> AccessLog:
    return AccessLog(
        identify=lambda _headers, _now: caller,
        record=sink.rows.append,
        prices=PriceBook(),
        count_refusal=sink.refusals.append,
    )


def test_an_upstream_cut_is_an_upstream_error_with_estimates() -> None:
    """An allowed request Envoy saw the upstream reset becomes an upstream_error row whose tokens
    are estimated from the bytes each way, never zero."""
    sink = Sink()
    handler(sink).handle(record(flags=frozenset({"upstream_remote_reset"})))
    [row] = sink.rows
    assert (row.outcome, row.recorded_by, row.status) == ("upstream_error", "access_log", 200)
    assert (row.input_tokens, row.input_tokens_estimated) == (1000, True)
    assert (row.output_tokens, row.output_tokens_estimated) == (2000, True)
    assert row.cost_usd > 0
    assert row.latency_ms == 2500.0
    assert (row.user_email, row.policy) == ("alice@example.com", "eng")


def test_a_dead_service_is_unmetered_and_a_client_abort_is_the_clients() -> None:
    """No response flag naming a side: the service handling it stopped (unmetered); a downstream
    reset: the client went away."""
    sink = Sink()
    handler(sink).handle(record(details="ext_proc_error_gRPC_error_13"))
    handler(sink).handle(record(flags=frozenset({"downstream_remote_reset"})))
    assert [r.outcome for r in sink.rows] == ["unmetered", "client_aborted"]
    assert "ext_proc_error_gRPC_error_13" in (sink.rows[0].reason or "")


def test_envoy_refusals_are_rows_for_known_callers_and_counts_otherwise() -> None:
    """A request Envoy answered itself names its caller when the token verifies; otherwise it is
    only counted."""
    anonymous, known = Sink(), Sink()
    rec = record(
        identity=None, status=413, details="request_payload_too_large", headers={"authorization": "x"}
    )
    handler(anonymous).handle(rec)
    handler(known, ALICE).handle(rec)
    assert anonymous.rows == [] and anonymous.refusals == ["envoy: request_payload_too_large"]
    [row] = known.rows
    assert (row.status, row.outcome, row.user_email) == (413, "denied", "alice@example.com")
    assert row.reason == "envoy: request_payload_too_large"
    assert row.cost_usd == Decimal(0)


def _row(sink: Sink, rec: AccessRecord) -> UsageRow:
    handler(sink).handle(rec)
    return sink.rows[-1]


def test_final_rows_are_never_replaced() -> None:
    """A row written when the request's end was seen wins against any partial report, in either order."""
    sink = Sink()
    log = _row(sink, record(flags=frozenset({"upstream_remote_reset"})))
    final = dataclasses.replace(log, outcome="complete", recorded_by="ext_proc", reason=None)
    assert merge_rows(final, log) == final
    assert merge_rows(log, final) == final
    assert merge_rows(final, final) == final


def test_a_cut_row_and_the_access_log_merge() -> None:
    """The access log names how the request ended; the exchange's counts stand (every relayed
    byte passed its meter), in either order of arrival."""
    sink = Sink()
    log = _row(sink, record(flags=frozenset({"upstream_connection_termination"}), status=200))
    cut = dataclasses.replace(
        log,
        outcome="client_aborted",
        reason="stream cut before the end",
        recorded_by="ext_proc_cut",
        input_tokens=25,
        input_tokens_estimated=False,
        output_tokens=12,
        output_tokens_estimated=True,
        cost_usd=Decimal("0.00037400"),
    )
    for merged in (merge_rows(log, cut), merge_rows(cut, log)):
        assert (merged.outcome, merged.reason) == (log.outcome, log.reason)
        assert (merged.input_tokens, merged.output_tokens, merged.cost_usd) == (25, 12, Decimal("0.00037400"))
        assert merged.recorded_by == "access_log"
    # A replay of the merged row changes nothing.
    merged = merge_rows(log, cut)
    assert merge_rows(merged, merged) == merged


def test_envoys_attempt_count_fills_what_a_cut_failover_exchange_did_not_know() -> None:
    """The access log's row carries Envoy's count of upstream attempts; merged with the cut row of
    a failover request that never saw an answer (its count unknown), the count is Envoy's."""
    sink = Sink()
    log = _row(sink, record(flags=frozenset({"upstream_remote_reset"}), attempts=2))
    assert log.attempts == 2
    cut = dataclasses.replace(log, recorded_by="ext_proc_cut", outcome="client_aborted", attempts=None)
    assert merge_rows(cut, log).attempts == 2
    assert merge_rows(log, dataclasses.replace(cut, attempts=1)).attempts == 2


def test_portal_requests_are_neither_rows_nor_refusals() -> None:
    """A managed-settings poll (a valid token, served by the portal) and the sign-in endpoints
    write no usage row and count no refusal; an unknown path with that token still does."""
    sink = Sink()
    log = handler(sink, caller=ALICE)
    for method, path in [
        ("GET", "/managed/settings"),
        ("GET", "/managed/settings?x=1"),
        ("POST", "/oauth/token"),
        ("GET", "/.well-known/oauth-authorization-server"),
        ("GET", "/device"),
        ("GET", "/healthz"),
    ]:
        log.handle(record(method=method, path=path, identity=None, details="via_upstream"))
    assert (sink.rows, sink.refusals) == ([], [])
    log.handle(record(method="GET", path="/managed/settingsX", identity=None, details="route_not_found"))
    [row] = sink.rows
    assert row.outcome == "denied"
