"""Process wiring for ``authz serve``: the gRPC services, the portal and the usage ledger.

Each worker process serves ext_authz and ext_proc on ``listen.grpc.port + index`` (Envoy's gRPC
cluster lists every worker port and balances between them); worker 0 also serves the portal. On
SIGTERM a worker fails its health check, waits for Envoy to stop sending new requests, lets
in-flight streams finish within the grace period, and flushes the ledger so their usage is
recorded (STYLE.md, habit 12).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

from authz.billing.pricing import PriceBook
from authz.config import load
from authz.configtypes import GatewayConfig
from authz.errors import StoreError
from authz.gateway.accesslog import AccessLog
from authz.gateway.authorize import Authorizer
from authz.gateway.exchange import Deps
from authz.gateway.servicer import (
    AccessLogServicer,
    AuthorizationServicer,
    ExternalProcessorServicer,
    add_servicers,
)
from authz.signin.backchannel import BackchannelLogouts
from authz.signin.oidc import OidcClient
from authz.signin.portal import PortalDeps, build_portal
from authz.signin.revocation import RevocationSet, RevocationWatcher
from authz.signin.tokens import KeySet, TokenVerifier
from authz.store.db import Pool, connect, connect_pool
from authz.store.ledger import Ledger
from authz.store.logout_spool import LogoutSpool, logout_spool_dir
from authz.store.migrate import migrate
from authz.telemetry.relay import Relay
from authz.telemetry.runtime import Telemetry, start_telemetry
from backends.base import Upstream
from backends.credentials import ReportsRefreshFailures
from backends.kinds import KINDS

log = logging.getLogger("authz.service")

# The access log's reason for a request ext_authz refused (Envoy's response code details).
_EXT_AUTHZ_REFUSAL = "envoy: ext_authz_denied"

DRAIN_SECONDS = 2.0
GRACE_SECONDS = 30.0


@dataclass
class Worker:
    """One running worker: its servers and the objects they share."""

    config: GatewayConfig
    index: int
    ledger: Ledger
    upstreams: dict[str, Upstream]
    grpc_server: grpc.aio.Server
    grpc_port: int
    telemetry: Telemetry = field(default_factory=Telemetry)
    relay: Relay | None = None
    watcher: RevocationWatcher | None = None
    logouts: BackchannelLogouts | None = None
    portal: web.AppRunner | None = None
    portal_pool: Pool | None = None
    oidc: OidcClient | None = None
    healthy: bool = True
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, drain: float = DRAIN_SECONDS, grace: float = GRACE_SECONDS) -> None:
        """Fail health checks, drain, stop the servers, then flush the ledger."""
        self.healthy = False
        if drain:
            await asyncio.sleep(drain)
        await self.grpc_server.stop(grace)
        if self.portal is not None:
            await self.portal.cleanup()
        if self.relay is not None:
            await self.relay.aclose()
        if self.portal_pool is not None:
            await self.portal_pool.close()
        if self.oidc is not None:
            await self.oidc.aclose()
        await self.ledger.aclose()
        if self.logouts is not None:
            await self.logouts.aclose()
        if self.watcher is not None:
            await self.watcher.aclose()
        for upstream in self.upstreams.values():
            await upstream.aclose()
        # The last export is a blocking network call.
        await asyncio.to_thread(self.telemetry.close)
        self.stopped.set()


async def _migrate_if_reachable(url: str, connect_timeout: float) -> None:
    """Bring the schema up to date at start-up; if PostgreSQL is down, the ledger retries later."""
    try:
        conn = await connect(url, timeout=connect_timeout)
    except StoreError as exc:
        log.warning("PostgreSQL unreachable at start-up (%s); continuing, usage rows will spool", exc)
        return
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _start_portal(
    worker: Worker, keyset: KeySet, verifier: TokenVerifier, revocations: RevocationSet
) -> None:
    config = worker.config
    # Claude Code's own telemetry, forwarded with the verified user added (POST /v1/metrics|logs|traces).
    relay = Relay(config.telemetry, worker.telemetry)
    await relay.start()
    worker.relay = relay
    # min_size=0: the portal must start (and serve /healthz) even while PostgreSQL is down.
    pool = await connect_pool(config.store.url, min_size=0, max_size=4, timeout=config.store.connect_timeout)
    oidc = OidcClient(config.oidc) if config.oidc is not None else None
    app = build_portal(
        PortalDeps(
            config=config,
            pool=pool,
            keyset=keyset,
            oidc=oidc,
            healthy=lambda: worker.healthy,
            logouts=worker.logouts,
            verifier=verifier,
            is_revoked=revocations.blocks,
            relay=relay,
        )
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.portal.address, config.listen.portal.port)
    await site.start()
    worker.portal = runner
    worker.portal_pool = pool
    worker.oidc = oidc


async def start_worker(config: GatewayConfig, index: int = 0) -> Worker:
    """Start one worker's servers and return once they accept connections."""
    await _migrate_if_reachable(config.store.url, config.store.connect_timeout)
    ledger = Ledger(config.store)
    await ledger.start()
    keyset = KeySet.from_config(config.sessions)
    verifier = TokenVerifier(
        keyset,
        issuer=config.sessions.issuer,
        audience=config.sessions.audience,
        clock_skew=config.sessions.clock_skew,
    )
    revocations = RevocationSet()
    watcher = RevocationWatcher(revocations)
    # Revoked sessions reach this set within seconds (LISTEN/NOTIFY plus periodic resync); the
    # first sync is awaited briefly so a restarted worker does not forget recent revocations.
    await watcher.start(config.store.url, config.sessions.revocation_resync_interval)
    # Back-channel logouts accepted while PostgreSQL was down wait in a journal that every worker
    # sharing it enforces from memory (loaded before serving) and writes through when it answers.
    logouts = BackchannelLogouts(
        LogoutSpool(logout_spool_dir(config.store)),
        revocations,
        dsn=config.store.url,
        hold=config.sessions.access_token_ttl + config.sessions.clock_skew,
        replay_interval=config.store.replay_interval,
        connect_timeout=config.store.connect_timeout,
    )
    await logouts.start()
    upstreams = {name: KINDS[up.kind].build(name, up.settings) for name, up in config.upstreams}
    prices = PriceBook(config.pricing)
    telemetry = start_telemetry(config, index)
    _observe(telemetry, ledger, watcher, upstreams.values())
    record = telemetry.recorder(ledger.record)
    deps = Deps(
        upstreams=upstreams,
        prices=prices,
        record=record,
    )
    # The buffered request body arrives in one gRPC message: allow the configured body cap.
    max_message = config.limits.max_request_body_bytes + 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ]
    )
    authorizer = Authorizer(config, verifier, is_revoked=revocations.blocks, prices=prices)
    refusals: Counter[str] = Counter()

    def count_refusal(reason: str) -> None:
        refusals[reason] += 1
        telemetry.refusal(reason)

    def count_envoy_refusal(reason: str) -> None:
        refusals[reason] += 1
        # The access log also reports the anonymous refusals ext_authz made, which ext_authz has
        # counted already, with their precise reason (token_expired, ...).
        if reason != _EXT_AUTHZ_REFUSAL:
            telemetry.refusal(reason)

    add_servicers(
        server,
        AuthorizationServicer(authorizer, record, count_refusal=count_refusal, telemetry=telemetry),
        ExternalProcessorServicer(deps, telemetry=telemetry),
        AccessLogServicer(
            AccessLog(
                identify=authorizer.identify,
                record=record,
                prices=prices,
                count_refusal=count_envoy_refusal,
            )
        ),
    )
    address = config.listen.grpc.address
    port = server.add_insecure_port(
        f"{address}:{config.listen.grpc.port + index if config.listen.grpc.port else 0}"
    )
    await server.start()
    worker = Worker(
        config, index, ledger, upstreams, server, port, telemetry=telemetry, watcher=watcher, logouts=logouts
    )
    if index == 0:
        await _start_portal(worker, keyset, verifier, revocations)
    log.info("worker %d serving gRPC on %s:%d", index, address, port)
    return worker


def _observe(
    telemetry: Telemetry, ledger: Ledger, watcher: RevocationWatcher, upstreams: Iterable[Upstream]
) -> None:
    """Gauges and counters read at collection time (off the event loop), and the credential
    refresh failures the upstreams report."""
    telemetry.gauge(
        "gateway.ledger.queue",
        "{row}",
        "Usage rows queued in memory, not yet written.",
        lambda: ledger.pending,
    )
    telemetry.gauge(
        "gateway.ledger.spool",
        "By",
        "Bytes of usage rows in the local spool, waiting for PostgreSQL.",
        lambda: float(ledger.spooled_bytes()),
    )
    telemetry.counter(
        "gateway.ledger.rows",
        "{row}",
        "Usage rows by where they went: written, spooled, replayed from the spool, rejected.",
        "gateway.ledger.disposition",
        lambda: {
            "written": ledger.rows_written,
            "spooled": ledger.rows_spooled,
            "replayed": ledger.rows_replayed,
            "rejected": ledger.rows_rejected,
        },
    )
    telemetry.gauge(
        "gateway.revocation.lag",
        "s",
        "Seconds the revocation set may trail PostgreSQL (0 while its LISTEN connection is up).",
        lambda: watcher.lag,
    )
    for upstream in upstreams:
        if isinstance(upstream, ReportsRefreshFailures):
            upstream.on_credential_refresh_failure(telemetry.credential_refresh_failed)


async def run_worker(config: GatewayConfig, index: int) -> None:
    """Run one worker until SIGTERM or SIGINT."""
    worker = await start_worker(config, index)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker %d stopping", index)
    await worker.stop()


def _worker_main(config_path: str, environ: Mapping[str, str], index: int) -> None:
    configure_logging()
    config = load(config_path, environ)
    asyncio.run(run_worker(config, index))


def configure_logging() -> None:
    """Plain, one-line log records on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def serve(config_path: Path, environ: Mapping[str, str]) -> None:
    """Run ``workers`` worker processes (or one in this process) until SIGTERM."""
    configure_logging()
    config = load(config_path, environ)
    if config.workers == 1:
        asyncio.run(run_worker(config, 0))
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(str(config_path), dict(environ), i), daemon=False)
        for i in range(config.workers)
    ]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                try:
                    import os

                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
