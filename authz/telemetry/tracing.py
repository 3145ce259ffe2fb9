"""Spans for ext_authz ``Check`` and ext_proc ``Process``, children of Envoy's spans.

When Envoy traces a request (``tracing`` in its HTTP connection manager, rendered by
:mod:`authz.envoy.tracing`), its ext_authz and ext_proc gRPC calls carry the W3C ``traceparent``
of Envoy's egress span in their gRPC metadata. A servicer call that carries a sampled one gets a
child span here; one that does not (tracing off, or this request not sampled) costs a lookup.

Cheap by construction, since every traced request pays for it on the request path: the
``traceparent`` is sliced rather than parsed by the propagator, nothing is built until the outcome
is known, and then one :class:`~authz.telemetry.spans.SpanRecord` (a tuple) joins a queue. A thread
of the worker's own encodes the queue in batches (:func:`~authz.telemetry.spans.export_request`)
and sends them over OTLP (:class:`~authz.telemetry.otlp_send.OtlpSender`): every
:data:`EXPORT_DELAY` seconds, or as soon as :data:`BATCH` spans wait. Envoy's flag decides
sampling (a sampled parent's children are recorded, an unsampled one's are not);
``telemetry.traces.sample_ratio`` is applied by Envoy to the requests it starts traces for.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource

from authz.configtypes import Otlp
from authz.errors import ExportError
from authz.store.usagerow import UsageRow
from authz.telemetry.export import SCOPE
from authz.telemetry.otlp_send import OtlpSender
from authz.telemetry.spans import SpanRecord, export_request, resource_message

log = logging.getLogger("authz.telemetry")

BATCH = 512
"""Spans per export request; this many waiting wakes the exporter thread."""
EXPORT_DELAY = 5.0
"""Seconds between exports when fewer than :data:`BATCH` spans wait."""
MAX_QUEUE = 8192
"""Spans held for export at most; later ones are dropped (and counted) until the queue drains."""

_FAILED = frozenset({"upstream_error", "error"})
_SAMPLED = 0x01  # W3C trace-flags: sampled
_HEX = frozenset("0123456789abcdef")

Attributes = Mapping[str, str | int | float | bool]
Parent = tuple[int, int]
"""The trace id and span id of a sampled remote parent."""


def parent_context(metadata: Iterable[Any] | None) -> Parent | None:
    """The sampled parent a gRPC call's ``traceparent`` names, if any (W3C Trace Context level 1,
    section 3.2: ``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``; an unsampled, invalid or
    all-zero one is no parent)."""
    for key, value in metadata or ():
        if key != "traceparent":
            continue
        if (
            not isinstance(value, str)
            or len(value) < 55
            or value[2] != "-"
            or value[35] != "-"
            or value[52] != "-"
        ):
            return None
        version, trace_hex, span_hex, flags = value[:2], value[3:35], value[36:52], value[53:55]
        if version == "ff" or not _HEX.issuperset(trace_hex + span_hex + flags + version):
            return None
        if not int(flags, 16) & _SAMPLED:
            return None
        trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
        if not trace_id or not span_id:
            return None
        return trace_id, span_id
    return None


def row_attributes(row: UsageRow) -> dict[str, str | int | float | bool]:
    """What a span says about the request its usage row records: who, which model, the tokens, the
    outcome and cost. Deliberately few: each attribute costs about a microsecond to encode, on
    every traced request; the usage row (``gateway.request_id``) has the rest."""
    attributes: dict[str, str | int | float | bool] = {
        "gateway.request_id": row.request_id,
        "gateway.outcome": row.outcome,
        "http.response.status_code": row.status,
        "gen_ai.usage.input_tokens": row.input_tokens,
        "gen_ai.usage.output_tokens": row.output_tokens,
        "gen_ai.usage.cache_creation.input_tokens": row.cache_write_tokens,
        "gen_ai.usage.cache_read.input_tokens": row.cache_read_tokens,
        "gateway.cost_usd": float(row.cost_usd),
    }
    user = row.user_email or row.user_sub
    if user:
        attributes["enduser.id"] = user
    if row.requested_model:
        attributes["gen_ai.request.model"] = row.requested_model
    if row.reason:
        attributes["gateway.reason"] = row.reason
    return attributes


class RequestSpan:
    """One servicer call's span, queued for export when it finishes."""

    __slots__ = ("_ended", "_name", "_parent", "_started", "_tracing")

    def __init__(self, tracing: Tracing, name: str, parent: Parent, started_ns: int | None = None) -> None:
        self._tracing = tracing
        self._name = name
        self._parent = parent
        self._started = time.time_ns() if started_ns is None else started_ns
        self._ended = False

    def finish(self, attributes: Attributes, *, failed: bool = False) -> None:
        """End the span with ``attributes`` (the first call wins)."""
        if self._ended:
            return
        self._ended = True
        trace_id, parent = self._parent
        self._tracing.emit(
            SpanRecord(self._name, trace_id, parent, self._started, time.time_ns(), attributes, failed)
        )

    def finish_row(self, row: UsageRow) -> None:
        """End the span with what ``row`` records."""
        self.finish(row_attributes(row), failed=row.outcome in _FAILED)


class Tracing:
    """One worker's spans: queued on the request path, encoded and exported by a thread of their own.

    ``send`` takes one encoded ``ExportTraceServiceRequest`` and raises :class:`ExportError` when
    the collector does not take it (by default an :class:`OtlpSender` to ``otlp``). Spans that could
    not be queued or exported are dropped and counted in :attr:`dropped` by reason.
    """

    def __init__(
        self,
        resource: Resource,
        otlp: Otlp,
        *,
        send: Callable[[bytes], None] | None = None,
        batch: int = BATCH,
        delay: float = EXPORT_DELAY,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self._resource = resource_message(resource.attributes)
        self._stop = threading.Event()
        self._sender: OtlpSender | None = None
        if send is None:
            sender = self._sender = OtlpSender(otlp, stop=self._stop)

            def send(payload: bytes) -> None:
                sender.send("traces", payload)

        self._send = send
        self._close_timeout = otlp.timeout
        self._batch = batch
        self._delay = delay
        self._max_queue = max_queue
        # Appended on the event loop, taken by the exporter thread: deque's append and popleft are
        # atomic, so the request path takes no lock.
        self._queue: deque[SpanRecord] = deque()
        self._wake = threading.Event()
        self._exporting = threading.Lock()
        self._failing = False
        self.exported = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0}
        self._thread = threading.Thread(target=self._run, name="gateway-spans", daemon=True)
        self._thread.start()

    def span(
        self, name: str, metadata: Iterable[Any] | None, started_ns: int | None = None
    ) -> RequestSpan | None:
        """A child of the sampled span the call's metadata names, started at ``started_ns`` (by
        default now); None when the call is not traced."""
        parent = parent_context(metadata)
        return RequestSpan(self, name, parent, started_ns) if parent is not None else None

    def emit(self, record: SpanRecord) -> None:
        """Queue one finished span for export."""
        queue = self._queue
        if len(queue) >= self._max_queue:
            self.dropped["queue_full"] += 1
            return
        queue.append(record)
        if len(queue) == self._batch:
            self._wake.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Export the spans ended so far (blocking, for at most about ``timeout`` seconds; what
        is left then is dropped and counted)."""
        self._export(time.monotonic() + timeout)

    def close(self) -> None:
        """Export what is left and stop (blocking, for at most about twice ``otlp.timeout``: a
        collector that does not answer must not hold up a worker's shutdown)."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._export(time.monotonic() + self._close_timeout)
        if self._sender is not None:
            self._sender.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._export(None)

    def _export(self, deadline: float | None) -> None:
        """Send the queue in batches; with a ``deadline`` (``time.monotonic()``), drop what is
        left once it passes. The thread's own passes (no deadline) give way to a close."""
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._exporting.acquire(timeout=wait):
            return
        try:
            queue = self._queue
            while queue:
                if deadline is None and self._stop.is_set():
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    left = len(queue)
                    for _ in range(left):
                        queue.popleft()
                    self._failed(left, "no time left to send them")
                    return
                records = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
                try:
                    self._send(export_request(self._resource, SCOPE, records, _span_id))
                except ExportError as exc:
                    self._failed(len(records), str(exc))
                    continue
                except Exception as exc:
                    # The thread must outlive any surprise, or tracing would stop for good.
                    log.exception("telemetry: encoding or exporting %d spans failed", len(records))
                    self._failed(len(records), repr(exc))
                    continue
                self.exported += len(records)
                if self._failing:
                    log.warning("telemetry: spans are exported again")
                    self._failing = False
        finally:
            self._exporting.release()

    def _failed(self, count: int, why: str) -> None:
        self.dropped["export_failed"] += count
        if not self._failing:
            log.warning("telemetry: %d spans not exported (%s); dropping spans until it works", count, why)
            self._failing = True


def _span_id() -> int:
    return random.getrandbits(64) or 1
