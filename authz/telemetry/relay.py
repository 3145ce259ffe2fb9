"""The relay of Claude Code's own telemetry: ``POST /v1/metrics``, ``/v1/logs``, ``/v1/traces``
accepted by the portal with the caller's gateway token, stamped with the verified user, groups and
session (:func:`authz.telemetry.otlp_payload.stamp`) and forwarded to ``telemetry.otlp.endpoint``.

Forwarding happens on a task of its own behind a bounded queue: the client's request is answered
as soon as the body is queued (or dropped), never after a round trip to the collector. Every
request is counted in ``gateway.telemetry.relayed`` as ``forwarded`` or with the reason it was
dropped (no endpoint, queue full, malformed, the collector refused or was unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
import httpx

from authz.configtypes import Telemetry as TelemetrySettings
from authz.telemetry.export import grpc_metadata, grpc_target, signal_url
from authz.telemetry.otlp_payload import SIGNALS, PayloadError, Sender, decode, stamp
from authz.telemetry.runtime import Telemetry

log = logging.getLogger("authz.telemetry.relay")


@dataclass(frozen=True, slots=True)
class _Item:
    signal: str
    body: bytes
    json_body: bool
    sender: Sender


class Relay:
    """Queues client telemetry and forwards it, off the request path, to the OTLP endpoint."""

    def __init__(
        self,
        settings: TelemetrySettings,
        telemetry: Telemetry,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._otlp = settings.otlp
        self._gateway = settings.service_name
        self._telemetry = telemetry
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=settings.relay.max_queue)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self.max_body_bytes = settings.relay.max_body_bytes

    @property
    def forwarding(self) -> bool:
        """Whether an endpoint is configured (without one every request is dropped, and counted)."""
        return bool(self._otlp.endpoint)

    def count(self, signal: str, result: str) -> None:
        """Count one client request the relay did not queue (``unauthenticated``, ``too_large``, ...)."""
        self._telemetry.relayed(signal, result)

    def submit(self, signal: str, body: bytes, *, json_body: bool, sender: Sender) -> bool:
        """Queue one export request for forwarding; False (and counted) when it is dropped."""
        if not self.forwarding:
            self.count(signal, "no_endpoint")
            return False
        try:
            self._queue.put_nowait(_Item(signal, body, json_body, sender))
        except asyncio.QueueFull:
            self.count(signal, "queue_full")
            return False
        return True

    async def start(self) -> None:
        """Start the forwarding task (nothing to do without an endpoint)."""
        if not self.forwarding or self._task is not None:
            return
        otlp = self._otlp
        if otlp.protocol == "grpc":
            target = grpc_target(otlp.endpoint)
            self._channel = (
                grpc.aio.insecure_channel(target)
                if otlp.endpoint.startswith("http://")
                else grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
            )
        else:
            self._client = httpx.AsyncClient(
                headers=dict(otlp.headers), timeout=otlp.timeout, transport=self._transport
            )
        self._task = asyncio.create_task(self._run(), name="telemetry-relay")

    async def drain(self) -> None:
        """Wait until everything queued so far was forwarded or dropped (tests, shutdown)."""
        await self._queue.join()

    async def aclose(self, grace: float = 5.0) -> None:
        """Forward what is queued (for at most ``grace`` seconds), then stop."""
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._queue.join()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
        if self._channel is not None:
            await self._channel.close(None)

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                result = await self._forward(item)
            except Exception:
                log.exception("telemetry relay: forwarding %s failed", item.signal)
                result = "export_failed"
            finally:
                self._queue.task_done()
            self._telemetry.relayed(item.signal, result)

    async def _forward(self, item: _Item) -> str:
        try:
            # Parsing and re-encoding a large batch takes milliseconds: keep it off the event loop.
            payload = await asyncio.to_thread(self._prepare, item)
        except PayloadError as exc:
            log.info("telemetry relay: dropped a malformed %s request: %s", item.signal, exc)
            return "malformed"
        if self._channel is not None:
            # No serializers: the request is already protobuf bytes, the (empty) answer is ignored.
            method = self._channel.unary_unary(
                SIGNALS[item.signal][2], request_serializer=None, response_deserializer=None
            )
            try:
                await method(payload, timeout=self._otlp.timeout, metadata=grpc_metadata(self._otlp))
            except grpc.aio.AioRpcError as exc:
                log.warning("telemetry relay: the collector refused %s: %s", item.signal, exc.code())
                return "export_failed"
            return "forwarded"
        assert self._client is not None
        try:
            response = await self._client.post(
                signal_url(self._otlp.endpoint, item.signal),
                content=payload,
                headers={"content-type": "application/x-protobuf"},
            )
        except httpx.HTTPError as exc:
            log.warning("telemetry relay: the collector is unreachable: %s", exc)
            return "export_failed"
        if response.status_code >= 300:
            log.warning(
                "telemetry relay: the collector answered %s for %s", response.status_code, item.signal
            )
            return "export_failed"
        return "forwarded"

    def _prepare(self, item: _Item) -> bytes:
        message = decode(item.signal, item.body, json_body=item.json_body)
        stamp(item.signal, message, item.sender, self._gateway)
        return bytes(message.SerializeToString())
