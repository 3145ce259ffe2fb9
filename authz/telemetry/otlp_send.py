"""Sending an encoded OTLP export request to ``telemetry.otlp.endpoint``, blocking (for an exporter
thread): OTLP/HTTP ``POST <endpoint>/v1/<signal>`` with ``application/x-protobuf``, or OTLP/gRPC's
``<Signal>Service/Export`` with the bytes as they are. Configured headers go with every request (as
gRPC metadata for gRPC).

Retryable failures (OTLP/HTTP 429, 502, 503, 504; gRPC UNAVAILABLE, RESOURCE_EXHAUSTED and the other
codes the OTLP specification lists) are retried with exponential backoff within
:data:`ATTEMPTS`; anything else fails at once with :class:`ExportError`.
"""

from __future__ import annotations

import threading

import grpc
import httpx

from authz.configtypes import Otlp
from authz.errors import ExportError
from authz.telemetry.export import grpc_metadata, grpc_target, signal_url
from authz.telemetry.otlp_payload import SIGNALS

ATTEMPTS = 3
"""Tries per export request; between them :data:`BACKOFF` seconds, doubled each time."""
BACKOFF = 0.5

_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _Retry(ExportError):
    """A failure the OTLP specification calls retryable."""


class OtlpSender:
    """One connection (an HTTP client or a gRPC channel) to the OTLP endpoint, used from one thread."""

    def __init__(self, otlp: Otlp, *, stop: threading.Event | None = None) -> None:
        self._otlp = otlp
        self._stop = stop or threading.Event()
        self._client: httpx.Client | None = None
        self._channel: grpc.Channel | None = None
        if otlp.protocol == "grpc":
            target = grpc_target(otlp.endpoint)
            self._channel = (
                grpc.insecure_channel(target)
                if otlp.endpoint.startswith("http://")
                else grpc.secure_channel(target, grpc.ssl_channel_credentials())
            )
        else:
            self._client = httpx.Client(headers=dict(otlp.headers), timeout=otlp.timeout)

    def send(self, signal: str, payload: bytes) -> None:
        """Export ``payload`` (an encoded ``Export<Signal>ServiceRequest``) or raise ExportError."""
        delay = BACKOFF
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self._once(signal, payload)
                return
            except _Retry as exc:
                # Once the exporter is stopping there is no backoff: the batch fails at once, so
                # a collector that is down does not hold up a worker's shutdown.
                if attempt == ATTEMPTS or self._stop.wait(delay):
                    raise ExportError(str(exc)) from None
                delay *= 2

    def close(self) -> None:
        """Close the connection."""
        if self._client is not None:
            self._client.close()
        if self._channel is not None:
            self._channel.close()

    def _once(self, signal: str, payload: bytes) -> None:
        otlp = self._otlp
        if self._channel is not None:
            # No serializers: the request is already protobuf bytes and the (empty) answer is ignored.
            method = self._channel.unary_unary(
                SIGNALS[signal][2], request_serializer=None, response_deserializer=None
            )
            try:
                method(payload, timeout=otlp.timeout, metadata=grpc_metadata(otlp))
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                if code in _RETRYABLE_GRPC:
                    raise _Retry(f"the collector answered {code.name}") from None
                raise ExportError(f"the collector answered {code.name}") from None
            return
        assert self._client is not None
        try:
            response = self._client.post(
                signal_url(otlp.endpoint, signal),
                content=payload,
                headers={"content-type": "application/x-protobuf"},
            )
        except httpx.HTTPError as exc:
            raise _Retry(f"the collector is unreachable: {exc}") from None
        if response.status_code in _RETRYABLE_HTTP:
            raise _Retry(f"the collector answered {response.status_code}")
        if response.status_code >= 300:
            raise ExportError(f"the collector answered {response.status_code}")
