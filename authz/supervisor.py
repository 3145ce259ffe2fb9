"""``authz run --config F``: the gateway services and Envoy as child processes of one command.

The supervisor starts ``authz serve`` and waits until every worker answers the gRPC health
protocol with SERVING and the portal answers ``/healthz``; then it starts Envoy and waits for
Envoy's admin ``/ready``. Only then does it say the gateway is up (with the ``/readyz`` report, so
an unreachable PostgreSQL or upstream credential shows at once). While running it watches both
children: when one exits it prints which, with its exit status and the last lines of its log,
stops the other and exits non-zero, so systemd, Docker or Kubernetes restarts the whole gateway
instead of leaving half of it running. Should the supervisor itself be killed (SIGKILL, the OOM
killer), the kernel sends both children SIGTERM (Linux), so neither outlives it holding the ports.

Envoy runs with ``--use-dynamic-base-id``: its shared-memory base id is chosen at start, so several
gateways (each with its own ports) share one host. Everything the run writes (the rendered Envoy
config, the logs, the usage spool) lives under the state directory (:mod:`authz.statedir`).

Signals: SIGTERM drains (the services fail their health checks, let in-flight streams finish through
Envoy, flush usage rows, then Envoy stops); SIGINT (Ctrl-C) stops at once, still flushing usage rows;
SIGHUP is passed to ``authz serve``, which rereads the configuration (Envoy's bootstrap is rendered
only from keys a reload does not change, so Envoy keeps running as it is).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TextIO

from authz.config import load
from authz.configtypes import GatewayConfig
from authz.envoy.binary import envoy_binary
from authz.envoy.names import connect_host
from authz.envoy.render import write_bootstrap
from authz.errors import ConfigError, GatewayError

# How often the supervisor looks at its children: a dead child is reported within this.
POLL_SECONDS = 0.1
# How long a child may take to stop after SIGINT once its partner died (usage rows are flushed in
# well under a second; a child still running after this is killed with its whole process group).
FAST_STOP_SECONDS = 1.0
# After SIGTERM: the services' drain and stream grace (authz.service), plus a margin.
DRAIN_STOP_SECONDS = 40.0


# prctl(2): the signal the kernel sends a process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _dies_with(parent: int) -> Callable[[], None]:
    """What a child runs before exec to be sent SIGTERM when ``parent`` dies, however it dies
    (SIGKILL, the OOM killer), so no half of the gateway outlives the supervisor (Linux only)."""

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died before the signal was armed.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class Proc:
    """A child process in a process group of its own, with its output in a log file.

    ``dies_with_parent``: the child is sent SIGTERM if this process dies (Linux; set only by
    processes that start their children from the main thread, as the kernel ties the signal to
    the thread that started the child).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        dies_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(  # noqa: S603 - argv is built by this module
            argv,
            stdout=self._log,
            stderr=self._log,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_dies_with(os.getpid()) if dies_with_parent and sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (``authz serve`` has worker children)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal the process group and wait; kill the group if it does not stop in time."""
        if self.alive():
            self.send(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.popen.wait(5)
        # Workers of a stopped `authz serve` must not outlive it.
        self.send(signal.SIGKILL)
        self._log.close()

    def exit_description(self) -> str:
        """``exited with status N`` or ``was killed by SIGNAME``."""
        code = self.popen.returncode
        if code is None:
            return "is still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name}"
        return f"exited with status {code}"

    def tail(self, lines: int = 20) -> str:
        """The end of the log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _died(proc: Proc) -> GatewayError:
    return GatewayError(
        f"{proc.name} {proc.exit_description()} while starting; its last log lines:\n{proc.tail()}"
    )


def wait_port(host: str, port: int, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until ``proc`` accepts TCP connections on ``host:port``; raise if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise _died(proc)
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise GatewayError(f"{proc.name} did not listen on {host}:{port} within {timeout}s:\n{proc.tail()}")


def wait_http_ok(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers 200; raise if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise _died(proc)
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise GatewayError(f"{proc.name} not ready at {url} within {timeout}s:\n{proc.tail()}")


def wait_grpc_serving(host: str, port: int, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until the gRPC health service on ``host:port`` answers SERVING; raise if ``proc`` dies."""
    from authz.ops.health import grpc_serving

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise _died(proc)
        if grpc_serving(host, port, timeout=1.0):
            return
        time.sleep(0.05)
    raise GatewayError(
        f"{proc.name}: the worker on {host}:{port} did not report SERVING within {timeout}s:\n{proc.tail()}"
    )


def readiness_report(url: str) -> tuple[bool, dict[str, dict[str, object]]]:
    """``GET /readyz``: whether the gateway is ready and each check's result (empty on no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except OSError:
        return False, {}
    try:
        report = json.loads(body)
        return report.get("status") == "ready", dict(report.get("checks", {}))
    except (ValueError, AttributeError):
        return False, {}


def _check_ports(config: GatewayConfig) -> None:
    for name in ("envoy", "envoy_admin", "grpc", "portal"):
        if getattr(config.listen, name).port == 0:
            raise ConfigError(f"listen.{name}.port", "authz run needs a fixed port (0 is not supported here)")


class Supervisor:
    """The two children of ``authz run`` and the loop that watches them."""

    def __init__(self, config_path: Path, root: Path, environ: Mapping[str, str], out: TextIO) -> None:
        self.config_path = config_path.resolve()
        self.root = root
        self.environ = dict(environ)
        self.out = out
        self.config = load(self.config_path, environ)
        _check_ports(self.config)
        self.gateway: Proc | None = None
        self.envoy: Proc | None = None

    def children(self) -> list[Proc]:
        """The running children, Envoy last (it stops last, after the services drained)."""
        return [p for p in (self.gateway, self.envoy) if p is not None]

    def start(self) -> None:
        """Start the services, wait until they serve, then Envoy, and wait until it is ready."""
        self.root.mkdir(parents=True, exist_ok=True)
        logs = self.root / "logs"
        listen = self.config.listen
        argv = [sys.executable, "-m", "authz.cli", "serve", "--config", str(self.config_path)]
        self.gateway = Proc(
            "gateway services",
            [*argv, "--state-dir", str(self.root)],
            logs / "gateway.log",
            self.environ,
            dies_with_parent=True,
        )
        grpc_host = connect_host(listen.grpc.address)
        for i in range(self.config.workers):
            wait_grpc_serving(grpc_host, listen.grpc.port + i, self.gateway, timeout=60)
        wait_http_ok(f"http://{_http_host(listen.portal.address)}:{listen.portal.port}/healthz", self.gateway)

        envoy_path = write_bootstrap(self.config, self.root / "envoy.yaml")
        self.envoy = Proc(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(envoy_path),
                "--log-level",
                "warning",
                # A base id of its own, so another Envoy on the host (another gateway) does not
                # collide on the shared-memory region ("unable to bind domain socket with base_id=0").
                "--use-dynamic-base-id",
                "--base-id-path",
                str(self.root / "envoy.base-id"),
            ],
            logs / "envoy.log",
            self.environ,
            dies_with_parent=True,
        )
        admin = f"http://{_http_host(listen.envoy_admin.address)}:{listen.envoy_admin.port}"
        wait_http_ok(f"{admin}/ready", self.envoy, timeout=60)

    def announce(self) -> None:
        """Say the gateway is up, with what /readyz reports."""
        listen = self.config.listen
        portal = f"http://{_http_host(listen.portal.address)}:{listen.portal.port}"
        ready, checks = readiness_report(f"{portal}/readyz")
        print(
            f"gateway ready: Envoy listens on {listen.envoy.address}:{listen.envoy.port}; "
            f"{self.config.workers} worker(s) serving; state and logs in {self.root}",
            file=self.out,
            flush=True,
        )
        for name, check in sorted(checks.items()):
            mark = "ok  " if check.get("ok") else "FAIL"
            print(f"  {mark} {name}: {check.get('detail', '')}", file=self.out, flush=True)
        if not ready:
            print("warning: /readyz reports not ready (see the failing checks above)", file=self.out)

    def watch(self, stopping: Callable[[], bool]) -> Proc | None:
        """Wait until ``stopping()`` or a child exits; return the child that exited, if any."""
        while not stopping():
            for proc in self.children():
                if not proc.alive():
                    return proc
            time.sleep(POLL_SECONDS)
        return None

    def reload(self) -> None:
        """Have the services reread the configuration: SIGHUP to ``authz serve`` alone (it rereads
        the file once for all its workers)."""
        gateway = self.gateway
        if gateway is not None and gateway.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(gateway.pid, signal.SIGHUP)

    def stop(self, *, fast: bool) -> None:
        """Stop the services first (they drain through Envoy), then Envoy."""
        sig, timeout = (signal.SIGINT, FAST_STOP_SECONDS) if fast else (signal.SIGTERM, DRAIN_STOP_SECONDS)
        for proc in self.children():
            proc.stop(sig, timeout)


def _http_host(address: str) -> str:
    host = connect_host(address)
    return f"[{host}]" if ":" in host else host


def run(*, config_path: Path, root: Path, environ: Mapping[str, str], out: TextIO | None = None) -> int:
    """Run the services and Envoy for ``config_path`` until a signal (0) or a child's death (1)."""
    out = out or sys.stdout
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Not the default (ending the process) while starting; passed on once the services run.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    supervisor = Supervisor(config_path, root, environ, out)
    try:
        supervisor.start()
    except BaseException:
        supervisor.stop(fast=True)
        raise
    signal.signal(signal.SIGHUP, lambda _signum, _frame: supervisor.reload())
    supervisor.announce()
    died = supervisor.watch(lambda: bool(received))
    if died is None:
        supervisor.stop(fast=received[0] == signal.SIGINT)
        return 0
    print(
        f"authz run: {died.name} (pid {died.pid}) {died.exit_description()}; stopping the rest. "
        f"Its last log lines ({died.log_path}):\n{died.tail()}",
        file=sys.stderr,
        flush=True,
    )
    supervisor.stop(fast=True)
    return 1
