"""The services' span exporter (authz/telemetry/tracing.py, authz/telemetry/otlp_send.py) against
real collectors: an OTLP/HTTP receiver that decodes what it gets, and a gRPC TraceService.

Spans leave in batches without a flush once a batch is full; a full queue drops (and counts) rather
than grows; a collector answering 503 is retried, one answering 400 is not, and the spans it refused
are counted as dropped while later ones go through."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from authz.configtypes import Otlp
from authz.telemetry.export import resource
from authz.telemetry.tracing import Tracing
from tests.otlp_receiver import OtlpReceiver, grpc_collector

PARENT = [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def _finish(tracing: Tracing, count: int) -> None:
    for i in range(count):
        span = tracing.span("ext_proc Process", PARENT)
        assert span is not None
        span.finish({"gateway.request_id": f"r{i}", "n": i})


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_full_batch_leaves_without_a_flush_in_order(receiver: OtlpReceiver) -> None:
    """Four spans with a batch of four wake the exporter at once (the delay is a minute)."""
    tracing = Tracing(resource("gw", 0), Otlp(endpoint=receiver.url), batch=4, delay=60.0)
    try:
        _finish(tracing, 4)
        _wait(lambda: len(receiver.spans()) == 4)
        spans = receiver.spans()
        assert [s.attributes["gateway.request_id"] for s in spans] == ["r0", "r1", "r2", "r3"]
        assert {(s.trace_id, s.parent_span_id) for s in spans} == {
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
        }
        assert len({s.span_id for s in spans}) == 4
        assert len(receiver.of("/v1/traces")) == 1
        assert tracing.exported == 4
    finally:
        tracing.close()


def test_a_full_queue_drops_and_counts_and_close_exports_the_rest(receiver: OtlpReceiver) -> None:
    """With room for three spans the fourth and fifth are dropped as queue_full; close sends three."""
    tracing = Tracing(resource("gw", 0), Otlp(endpoint=receiver.url), delay=60.0, max_queue=3)
    _finish(tracing, 5)
    assert tracing.dropped["queue_full"] == 2
    tracing.close()
    assert [s.attributes["n"] for s in receiver.spans()] == [0, 1, 2]
    assert tracing.exported == 3


def test_retryable_answers_are_retried_and_refusals_counted(receiver: OtlpReceiver) -> None:
    """503 then 200: the same batch goes through on the retry. 400: dropped at once, counted, and
    the next batch is exported again."""
    tracing = Tracing(resource("gw", 0), Otlp(endpoint=receiver.url), delay=60.0)
    try:
        receiver.refusals = [503]
        _finish(tracing, 2)
        tracing.flush()
        assert [s.attributes["n"] for s in receiver.spans()] == [0, 1]
        assert (tracing.exported, tracing.dropped["export_failed"]) == (2, 0)

        receiver.clear()
        receiver.refusals = [400]
        _finish(tracing, 3)
        tracing.flush()
        assert receiver.spans() == []
        assert tracing.dropped["export_failed"] == 3

        _finish(tracing, 1)
        tracing.flush()
        assert len(receiver.spans()) == 1
        assert tracing.exported == 3
    finally:
        tracing.close()


def test_grpc_collectors_get_the_spans_and_the_configured_headers() -> None:
    """protocol grpc: TraceService/Export with the encoded request, the headers as metadata."""
    received: list[tuple[Any, dict[str, str]]] = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = grpc_collector(server, "traces", received)
    server.start()
    try:
        otlp = Otlp(endpoint=f"http://127.0.0.1:{port}", protocol="grpc", headers=(("X-Tenant", "acme"),))
        tracing = Tracing(resource("gw", 0), otlp, delay=60.0)
        _finish(tracing, 2)
        tracing.close()
    finally:
        server.stop(None)
    ((request, metadata),) = received
    assert metadata["x-tenant"] == "acme"
    spans = request.resource_spans[0].scope_spans[0].spans
    assert [s.name for s in spans] == ["ext_proc Process"] * 2
    assert tracing.exported == 2


def test_a_collector_that_never_answers_does_not_hold_up_close() -> None:
    """A collector that accepts connections and never answers: close gives up after about
    ``otlp.timeout`` (one try, no backoff once stopping) and counts the spans as failed."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts; nobody reads or answers
    try:
        otlp = Otlp(endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        tracing = Tracing(resource("gw", 0), otlp, delay=60.0)
        _finish(tracing, 3)
        started = time.monotonic()
        tracing.close()
        assert time.monotonic() - started < 3.0
        assert (tracing.exported, tracing.dropped["export_failed"]) == (0, 3)
    finally:
        silent.close()
