"""Process wiring for ``authz serve``: the gRPC services, the portal and the usage ledger.

Each worker process serves ext_authz, ext_proc and the gRPC health protocol on
``listen.grpc.port + index`` (Envoy's gRPC cluster lists every worker port, health-checks each and
balances between the healthy ones); worker 0 also serves the portal (with ``/healthz`` and
``/readyz``) and runs the retention pruner. On SIGTERM a worker reports NOT_SERVING, waits until
Envoy has stopped sending it new requests, lets in-flight streams finish within the grace period,
and flushes the ledger so their usage is recorded (STYLE.md, habit 12). SIGINT stops without the
wait (still flushing). With several workers, the parent process restarts one that dies, and stops
them all and exits non-zero when one keeps dying.

Reloads (docs/architecture.md, "Live configuration"): the process that owns the replica's
configuration (the parent with several workers, else the one worker) polls the file every
``reload.watch_interval`` seconds and rereads it on SIGHUP (:class:`authz.reload.reloader.Reloader`);
the parent hands every outcome to each worker over a queue, and a worker applies a changed
configuration by building a new :class:`~authz.gateway.snapshot.Snapshot` and swapping it in
(:meth:`Worker.apply`). A restarted worker starts from the configuration its siblings run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_exit
from multiprocessing.queues import Queue
from pathlib import Path

import grpc
from aiohttp import web

from authz.configtypes import GatewayConfig
from authz.envoy.failover import chains
from authz.envoy.names import HEALTH_CHECK_DETECTION_SECONDS, connect_host
from authz.errors import StoreError
from authz.gateway.limits import LimitGate
from authz.gateway.servicer import (
    AccessLogServicer,
    AuthorizationServicer,
    ExternalProcessorServicer,
    add_servicers,
)
from authz.gateway.snapshot import Shared, Snapshot, build_snapshot
from authz.ops.health import Readiness, WorkerHealth
from authz.ops.retention import Pruner
from authz.reload.reloader import Outcome, Reloader, Status, log_outcome
from authz.signin.backchannel import BackchannelLogouts
from authz.signin.oidc import OidcClient
from authz.signin.portal import PORTAL, PortalContext, PortalDeps, build_portal
from authz.signin.revocation import RevocationSet, RevocationWatcher
from authz.signin.tokens import KeySet, TokenVerifier
from authz.statedir import state_dir
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

# How long a draining worker keeps serving after it reports NOT_SERVING: until Envoy's health
# check has certainly noticed (authz.envoy.clusters), so no new request arrives after it stops.
DRAIN_SECONDS = HEALTH_CHECK_DETECTION_SECONDS + 0.5
# How long in-flight streams may take to finish once the worker stops accepting new ones.
GRACE_SECONDS = 30.0
# After SIGINT: no drain, and streams get this long.
FAST_GRACE_SECONDS = 0.5


@dataclass
class Servicers:
    """The worker's gRPC servicers, which a reload hands a new snapshot's parts."""

    authorization: AuthorizationServicer
    processor: ExternalProcessorServicer
    access_log: AccessLogServicer


@dataclass
class Worker:
    """One running worker: its servers and the objects they share."""

    config: GatewayConfig
    index: int
    ledger: Ledger
    upstreams: dict[str, Upstream]
    grpc_server: grpc.aio.Server
    grpc_port: int
    shared: Shared
    snapshot: Snapshot
    servicers: Servicers
    status: Status
    health: WorkerHealth = field(default_factory=WorkerHealth)
    telemetry: Telemetry = field(default_factory=Telemetry)
    relay: Relay | None = None
    watcher: RevocationWatcher | None = None
    logouts: BackchannelLogouts | None = None
    portal: web.AppRunner | None = None
    portal_pool: Pool | None = None
    oidc: OidcClient | None = None
    pruner: Pruner | None = None
    gate: LimitGate | None = None
    gate_pool: Pool | None = None
    portal_context: PortalContext | None = None
    reloads: Counter[str] = field(default_factory=Counter)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def healthy(self) -> bool:
        """False once the worker started draining."""
        return not self.health.draining

    def apply(self, config: GatewayConfig) -> None:
        """Serve the requests that start from now on under ``config`` (a reload's, whose
        restart-only keys are this worker's own: authz.reload.scope).

        The new snapshot is built first, then handed out in one synchronous step on the event
        loop, so no request sees part of one configuration and part of another: each ``Check``,
        ``Process`` stream and access-log entry reads its part once when it starts and keeps it to
        its end (in-flight streams finish, and write their rows, under the old one). The spend gate
        and the portal take the configuration in the same step.
        """
        snapshot = build_snapshot(config, self.shared)
        self.config, self.snapshot = config, snapshot
        self.servicers.authorization.use(snapshot.authorizer)
        self.servicers.processor.use(snapshot.deps)
        self.servicers.access_log.use(snapshot.access_log)
        if self.gate is not None:
            self.gate.configure(config, snapshot.prices)
        if self.portal_context is not None:
            self.portal_context.reconfigure(config)

    def reloaded(self, outcome: Outcome) -> None:
        """Take a reload's outcome: apply its configuration when live keys changed; count it and
        keep its status for ``/readyz``."""
        self.reloads[outcome.result] += 1
        self.status = outcome.status
        if outcome.config is not None:
            self.apply(outcome.config)

    async def stop(self, drain: float = DRAIN_SECONDS, grace: float = GRACE_SECONDS) -> None:
        """Report NOT_SERVING, drain, stop the servers, then flush the ledger."""
        await self.health.drain()
        if drain:
            await asyncio.sleep(drain)
        await self.grpc_server.stop(grace)
        if self.gate is not None:
            await self.gate.aclose()
        if self.gate_pool is not None:
            await self.gate_pool.close()
        if self.pruner is not None:
            await self.pruner.aclose()
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


def _readiness(worker: Worker, keyset: KeySet, pool: Pool) -> Readiness:
    config = worker.config

    async def ping() -> None:
        try:
            async with pool.acquire(timeout=config.store.connect_timeout) as conn:
                await conn.fetchval("SELECT 1")
        except (OSError, TimeoutError) as exc:
            raise StoreError(f"PostgreSQL does not answer: {exc or type(exc).__name__}") from exc
        except Exception as exc:  # asyncpg's own errors: their text says what went wrong
            raise StoreError(f"PostgreSQL does not answer: {exc}") from exc

    watcher = worker.watcher
    grpc = config.listen.grpc
    return Readiness(
        ping_database=ping,
        revocations_connected=lambda: watcher is not None and watcher.connected,
        signing_kid=keyset.signing_kid,
        signing_required=config.oidc is not None,
        upstreams=list(worker.upstreams.values()),
        draining=lambda: not worker.healthy,
        worker_host=connect_host(grpc.address),
        worker_ports=[grpc.port + i for i in range(config.workers) if i != worker.index] if grpc.port else [],
    )


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
    readiness = _readiness(worker, keyset, pool)
    app = build_portal(
        PortalDeps(
            config=config,
            pool=pool,
            keyset=keyset,
            oidc=oidc,
            healthy=lambda: worker.healthy,
            logouts=worker.logouts,
            readiness=readiness.report,
            # The bearer-authenticated endpoints judge tokens exactly as ext_authz does.
            verifier=verifier,
            is_revoked=revocations.blocks,
            relay=relay,
            config_status=lambda: worker.status.report(),
        )
    )
    worker.portal_context = app[PORTAL]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.portal.address, config.listen.portal.port)
    await site.start()
    worker.portal = runner
    worker.portal_pool = pool
    worker.oidc = oidc
    # One pruner per replica (worker 0); replicas take turns through an advisory lock.
    worker.pruner = Pruner(pool, config.retention)
    worker.pruner.start()


async def start_worker(
    config: GatewayConfig,
    index: int = 0,
    status: Status | None = None,
    failover_clusters: frozenset[str] | None = None,
) -> Worker:
    """Start one worker's servers and return once they accept connections. ``status`` says which
    file version ``config`` came from (``/readyz``); ``failover_clusters`` are the ones Envoy was
    rendered with (default: ``config``'s own chains)."""
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
    telemetry = start_telemetry(config, index)
    _observe(telemetry, ledger, watcher, upstreams.values())
    record = telemetry.recorder(ledger.record)
    # The buffered request body arrives in one gRPC message: allow the configured body cap.
    max_message = config.limits.max_request_body_bytes + 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ]
    )
    # Spend caps and rate limits: leases and counters in PostgreSQL, synced in the background.
    # min_size=0: the worker starts (and fails closed or open per spend.on_store_error) while
    # PostgreSQL is down.
    gate_pool = await connect_pool(
        config.store.url, min_size=0, max_size=2, timeout=config.store.connect_timeout
    )
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

    # What a reload rebuilds (the snapshot) around what it keeps (the process's long-lived objects).
    if failover_clusters is None:
        failover_clusters = frozenset(chain.cluster for chain in chains(config))
    shared = Shared(verifier, revocations, upstreams, record, count_envoy_refusal, failover_clusters)
    snapshot = build_snapshot(config, shared)
    gate = LimitGate(
        config,
        snapshot.prices,
        gate_pool,
        on_reserved=telemetry.spend_reserved,
        on_refused=telemetry.spend_refused,
    )
    await gate.start()
    servicers = Servicers(
        AuthorizationServicer(
            snapshot.authorizer, record, count_refusal=count_refusal, telemetry=telemetry, gate=gate
        ),
        ExternalProcessorServicer(snapshot.deps, telemetry=telemetry),
        AccessLogServicer(snapshot.access_log),
    )
    add_servicers(server, servicers.authorization, servicers.processor, servicers.access_log)
    health = WorkerHealth()
    health.add_to(server)
    address = config.listen.grpc.address
    port = server.add_insecure_port(
        f"{address}:{config.listen.grpc.port + index if config.listen.grpc.port else 0}"
    )
    await server.start()
    worker = Worker(
        config,
        index,
        ledger,
        upstreams,
        server,
        port,
        shared,
        snapshot,
        servicers,
        status or Status("", time.time()),
        health=health,
        telemetry=telemetry,
        watcher=watcher,
        logouts=logouts,
        gate=gate,
        gate_pool=gate_pool,
    )
    if index == 0:
        await _start_portal(worker, keyset, verifier, revocations)
    telemetry.counter(
        "gateway.config.reloads",
        "{reload}",
        "Configuration reloads by result: applied, unchanged (nothing live changed), failed (the"
        " running configuration kept).",
        "gateway.config.reload.result",
        lambda: dict(worker.reloads),
    )
    await health.serving()
    log.info("worker %d (pid %d) serving gRPC on %s:%d", index, os.getpid(), address, port)
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


async def run_worker(
    config: GatewayConfig,
    index: int,
    *,
    status: Status | None = None,
    failover_clusters: frozenset[str] | None = None,
    reloader: Reloader | None = None,
    updates: Queue[Outcome | None] | None = None,
) -> None:
    """Run one worker until SIGTERM (drain) or SIGINT (stop now).

    Alone in its replica it owns the ``reloader`` (polled here, SIGHUP rereads); one of several
    takes the parent's reload outcomes from ``updates``, and the failover clusters Envoy was
    rendered with from the parent (a worker restarted after a reload must not name newer ones).
    """
    if reloader is not None:
        status, failover_clusters = reloader.status, reloader.failover_clusters
    worker = await start_worker(config, index, status, failover_clusters)
    received: list[signal.Signals] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watching: asyncio.Task[None] | None = None
    if reloader is not None:
        hup = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        watching = asyncio.create_task(_watch_config(worker, reloader, hup, stop), name="config-watch")
    if updates is not None:
        _receive_updates(updates, loop, worker)
    await stop.wait()
    if watching is not None:
        await asyncio.gather(watching, return_exceptions=True)
    if received[0] == signal.SIGINT:
        log.info("worker %d stopping now (SIGINT)", index)
        await worker.stop(drain=0, grace=FAST_GRACE_SECONDS)
    else:
        log.info(
            "worker %d draining (SIGTERM): NOT_SERVING for %gs, then up to %gs for streams",
            index,
            DRAIN_SECONDS,
            GRACE_SECONDS,
        )
        await worker.stop()
    log.info("worker %d stopped; usage rows flushed", index)


async def _watch_config(worker: Worker, reloader: Reloader, hup: asyncio.Event, stop: asyncio.Event) -> None:
    """Poll the configuration file every ``reload.watch_interval`` seconds (never when it is 0) and
    reread it at once on SIGHUP; apply what changed. Runs until ``stop``."""
    while not stop.is_set():
        interval = reloader.interval or None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await _first(hup, stop)
        if stop.is_set():
            return
        forced = hup.is_set()
        hup.clear()
        try:
            # A stat per tick; reading and parsing (rarely) happen off the event loop.
            outcome = await asyncio.to_thread(reloader.poll, force=forced)
            if outcome is not None:
                log_outcome(outcome, reloader.path)
                worker.reloaded(outcome)
        except Exception:
            # The watch must outlive any bug in one reload, or the next file change would go unseen.
            log.exception("configuration reload failed unexpectedly; the running configuration stays")


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


def _receive_updates(updates: Queue[Outcome | None], loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
    """Hand the parent's reload outcomes to the worker's event loop, from a thread that waits on
    the queue (a blocking read, kept off the loop)."""

    def receive() -> None:
        while True:
            try:
                outcome = updates.get()
            except (EOFError, OSError):
                return  # the parent is gone
            if outcome is None:
                return
            try:
                loop.call_soon_threadsafe(worker.reloaded, outcome)
            except RuntimeError:
                return  # the loop closed: the worker is stopping

    threading.Thread(target=receive, name="config-updates", daemon=True).start()


def _worker_main(
    config: GatewayConfig,
    status: Status,
    failover_clusters: frozenset[str],
    index: int,
    updates: Queue[Outcome | None],
) -> None:
    configure_logging()
    # SIGHUP goes to the parent, which rereads the file once for all its workers; a worker ignores
    # its own (a signal to the whole process group reaches the parent too).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.run(
        run_worker(config, index, status=status, failover_clusters=failover_clusters, updates=updates)
    )


def configure_logging() -> None:
    """Plain, one-line log records on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


# A worker that dies on its own is restarted (its sibling workers keep serving, and receive the
# access-log reports of the requests it held); one that dies this often in this window is a crash
# loop, and the whole process stops so the supervisor (authz run, Kubernetes) sees it.
RESTARTS_ALLOWED = 3
RESTART_WINDOW = 60.0


@dataclass
class RestartBudget:
    """How many restarts a worker may still have: at most ``allowed`` within ``window`` seconds."""

    allowed: int = RESTARTS_ALLOWED
    window: float = RESTART_WINDOW
    clock: Callable[[], float] = time.monotonic
    _deaths: dict[int, list[float]] = field(default_factory=dict)

    def may_restart(self, index: int) -> bool:
        """Record worker ``index``'s death; True while it has not died too often lately."""
        now = self.clock()
        recent = [t for t in self._deaths.get(index, []) if now - t < self.window]
        recent.append(now)
        self._deaths[index] = recent
        return len(recent) <= self.allowed


def serve(config_path: Path, environ: Mapping[str, str], explicit_state_dir: str | None = None) -> int:
    """Run ``workers`` worker processes (or one in this process) until a signal; return the exit
    status: 0 after a signal, 1 when a worker kept dying on its own."""
    configure_logging()
    # SIGHUP means "reread the configuration"; until the process can do that, it must not end it
    # (its default action). Workers inherit the disposition: the parent rereads for them.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    root = state_dir(config_path, explicit_state_dir, environ)
    reloader = Reloader(config_path, environ, root)
    config = reloader.config
    log.info(
        "state directory %s (usage spool %s); configuration %s (sha256 %s)",
        root,
        config.store.spool_dir,
        config_path,
        reloader.status.sha256[:12],
    )
    if config.workers == 1:
        asyncio.run(run_worker(config, 0, reloader=reloader))
        return 0
    ctx = multiprocessing.get_context("spawn")
    queues: dict[int, Queue[Outcome | None]] = {}

    def spawn(i: int) -> multiprocessing.process.BaseProcess:
        # A restarted worker starts from the configuration its siblings run, not the file's.
        queue: Queue[Outcome | None] = ctx.Queue()
        # The parent never waits for a dead worker's queue to drain (at a restart or at exit).
        queue.cancel_join_thread()
        old = queues.pop(i, None)
        if old is not None:
            old.close()
        queues[i] = queue
        proc = ctx.Process(
            target=_worker_main,
            args=(reloader.config, reloader.status, reloader.failover_clusters, i, queue),
            name=f"worker {i}",
            daemon=False,
        )
        proc.start()
        return proc

    running = {i: spawn(i) for i in range(config.workers)}
    stopping: list[int] = []
    # SIGHUP wakes the loop below through this pipe (a handler cannot call into multiprocessing).
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    hup: list[bool] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        _signal_all(list(running.values()), signum)

    def on_hup(_signum: int, _frame: object) -> None:
        hup.append(True)
        with contextlib.suppress(BlockingIOError):
            os.write(wake_write, b"h")

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, on_hup)
    status = 0
    budget = RestartBudget()
    while running:
        interval = None if stopping else (reloader.interval or None)
        finished = wait_for_exit([wake_read, *(p.sentinel for p in running.values())], interval)
        if wake_read in finished:
            os.read(wake_read, 512)
        if not stopping:
            forced = bool(hup)
            hup.clear()
            _reload(reloader, forced, [queues[i] for i in running])
        for index, proc in [(i, p) for i, p in running.items() if p.sentinel in finished]:
            proc.join()
            del running[index]
            if stopping:
                continue
            died = f"authz serve: {proc.name} (pid {proc.pid}) {_exit_description(proc.exitcode)}"
            if budget.may_restart(index):
                print(f"{died}; restarting it", file=sys.stderr, flush=True)
                running[index] = spawn(index)
                continue
            loop = f"more than {RESTARTS_ALLOWED} times in {RESTART_WINDOW:.0f} s"
            print(f"{died}, {loop}; stopping the other workers", file=sys.stderr, flush=True)
            status = 1
            stopping.append(signal.SIGINT)
            _signal_all(list(running.values()), signal.SIGINT)
    os.close(wake_read)
    os.close(wake_write)
    return status


def _reload(reloader: Reloader, forced: bool, queues: Iterable[Queue[Outcome | None]]) -> None:
    """One look at the configuration file; its outcome, if any, logged once and sent to every worker."""
    try:
        outcome = reloader.poll(force=forced)
    except Exception:
        log.exception("configuration reload failed unexpectedly; the running configuration stays")
        return
    if outcome is None:
        return
    log_outcome(outcome, reloader.path)
    for queue in queues:
        queue.put(outcome)


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _signal_all(procs: Sequence[multiprocessing.process.BaseProcess], signum: int) -> None:
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)
