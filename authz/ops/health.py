"""Health and readiness of a worker.

Three signals, for three different askers:

* **gRPC health** (``grpc.health.v1.Health``, served by every worker on its gRPC port): Envoy's
  active health check on the ``gateway_grpc`` cluster asks it every second. SERVING while the
  worker takes requests, NOT_SERVING from the moment it starts draining; a worker too stuck to
  answer fails the check by timing out. Either way Envoy stops sending it new requests.
* **/healthz** (the portal): liveness only. 200 while the process answers HTTP at all, draining or
  not, so an orchestrator restarts a wedged process and never a draining one.
* **/readyz** (the portal): whether this replica can do its job: PostgreSQL answers, the
  revocation feed is connected, a signing key is loaded, every upstream's credential can be
  obtained, and every worker reports SERVING. 503 with the failing checks otherwise, and while
  draining.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio  # `health.aio` at run time; mypy sees no attribute
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.errors import GatewayError, StoreError
from backends.base import Caller, Upstream
from backends.errors import BackendError

# The service names Envoy may ask about: "" (the whole server, what the gateway_grpc cluster's
# health check asks for) and the two services each worker serves.
SERVICES = ("", "envoy.service.auth.v3.Authorization", "envoy.service.ext_proc.v3.ExternalProcessor")

# A successful upstream credential check is reused this long, whatever the probe rate.
CREDENTIAL_CHECK_TTL = 30.0
# Who a credential check is made for: Bedrock's AssumeRole records it as the SourceIdentity, so
# CloudTrail shows these calls for what they are.
PROBE_CALLER = Caller(sub="claude-gateway-readiness", email="readiness@claude-gateway.invalid")


class WorkerHealth:
    """The gRPC health service of one worker (grpcio-health-checking's asyncio servicer)."""

    def __init__(self) -> None:
        self._servicer = health_aio.HealthServicer()
        self.draining = False

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the health service on ``server``."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def serving(self) -> None:
        """Report SERVING for every service."""
        for name in SERVICES:
            await self._servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """Report NOT_SERVING from now on (grpc_health's graceful shutdown is permanent)."""
        self.draining = True
        await self._servicer.enter_graceful_shutdown()


def grpc_serving(host: str, port: int, *, timeout: float) -> bool:
    """Whether the worker on ``host:port`` answers the gRPC health check with SERVING (blocking)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def grpc_serving_async(host: str, port: int, *, timeout: float) -> bool:  # noqa: ASYNC109 - the RPC deadline
    """:func:`grpc_serving` on the event loop."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the readiness report."""

    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"ok": self.ok, "detail": self.detail}


async def check_upstream(upstream: Upstream, *, timeout: float) -> CheckResult:  # noqa: ASYNC109 - bounds a cloud call
    """Obtain ``upstream``'s credential the way a request would (through its credential cache)."""
    try:
        async with asyncio.timeout(timeout):
            await upstream.sign(
                method="POST",
                path="/model/readiness-probe/invoke",
                headers={"content-type": "application/json"},
                body=b"{}",
                caller=PROBE_CALLER,
            )
    except TimeoutError:
        return CheckResult(False, f"no credential within {timeout:g}s")
    except BackendError as exc:
        return CheckResult(False, str(exc))
    return CheckResult(True, "credential obtained")


class Readiness:
    """Builds the ``/readyz`` report of one replica.

    ``ping_database`` raises :class:`StoreError` when PostgreSQL does not answer;
    ``revocations_connected`` says whether the revocation feed is live; ``worker_ports`` are the
    gRPC ports of the replica's other workers (asked over the health protocol).
    """

    def __init__(
        self,
        *,
        ping_database: Callable[[], Awaitable[None]],
        revocations_connected: Callable[[], bool],
        signing_kid: str | None,
        signing_required: bool,
        upstreams: Sequence[Upstream],
        draining: Callable[[], bool],
        worker_host: str = "127.0.0.1",
        worker_ports: Sequence[int] = (),
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ping = ping_database
        self._revocations = revocations_connected
        self._signing_kid = signing_kid
        self._signing_required = signing_required
        self._upstreams = list(upstreams)
        self._draining = draining
        self._worker_host = worker_host
        self._worker_ports = list(worker_ports)
        self._timeout = timeout
        self._clock = clock
        self._credentials: dict[str, tuple[float, CheckResult]] = {}

    async def report(self) -> tuple[bool, dict[str, CheckResult]]:
        """``(ready, checks)``; ready only when every check passes and the worker is not draining."""
        checks: dict[str, CheckResult] = {}
        checks["postgresql"], *upstream_results = await asyncio.gather(
            self._database(), *(self._upstream(u) for u in self._upstreams)
        )
        for upstream, result in zip(self._upstreams, upstream_results, strict=True):
            checks[f"upstream:{upstream.name}"] = result
        checks["revocation_feed"] = (
            CheckResult(True, "listening for revocations")
            if self._revocations()
            else CheckResult(False, "not connected to PostgreSQL: revocations are not arriving")
        )
        checks["signing_key"] = self._signing()
        for port in self._worker_ports:
            serving = await grpc_serving_async(self._worker_host, port, timeout=self._timeout)
            checks[f"worker:{port}"] = CheckResult(serving, "SERVING" if serving else "not SERVING")
        if self._draining():
            checks["draining"] = CheckResult(False, "this replica is shutting down")
        return all(c.ok for c in checks.values()), checks

    async def _database(self) -> CheckResult:
        try:
            async with asyncio.timeout(self._timeout):
                await self._ping()
        except TimeoutError:
            return CheckResult(False, f"no answer within {self._timeout:g}s (store.url)")
        except (StoreError, GatewayError) as exc:
            return CheckResult(False, str(exc))
        return CheckResult(True, "answers")

    def _signing(self) -> CheckResult:
        if self._signing_kid is not None:
            return CheckResult(True, f"kid {self._signing_kid}")
        if self._signing_required:
            return CheckResult(False, "sessions.signing_key is not configured: sign-in cannot issue tokens")
        return CheckResult(True, "verify keys only (no sign-in configured)")

    async def _upstream(self, upstream: Upstream) -> CheckResult:
        now = self._clock()
        cached = self._credentials.get(upstream.name)
        if cached is not None and now - cached[0] < CREDENTIAL_CHECK_TTL:
            return cached[1]
        result = await check_upstream(upstream, timeout=self._timeout)
        if result.ok:
            # Failures are not cached: the next probe tries again, so recovery shows at once.
            self._credentials[upstream.name] = (now, result)
        return result
