"""``authz run --config F``: the gateway services and Envoy as child processes of one command."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from authz.config import load
from authz.envoy.binary import envoy_binary
from authz.envoy.render import render_yaml
from authz.errors import GatewayError


class Proc:
    """A child process with its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None
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
        )

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal the process and wait; kill it if it does not stop in time."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        """The end of the log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_port(host: str, port: int, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until ``proc`` accepts TCP connections on ``host:port``; raise if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise GatewayError(f"{proc.name} exited early:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise GatewayError(f"{proc.name} did not listen on {host}:{port} within {timeout}s:\n{proc.tail()}")


def wait_http_ok(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers 200; raise if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise GatewayError(f"{proc.name} exited early:\n{proc.tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise GatewayError(f"{proc.name} not ready at {url} within {timeout}s:\n{proc.tail()}")


def run(*, config_path: Path, root: Path, environ: Mapping[str, str]) -> int:
    """Start the services and Envoy for ``config_path`` and wait for Ctrl-C or SIGTERM."""
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    root = root.resolve()
    config = load(config_path, environ)
    gateway = Proc(
        "gateway",
        [sys.executable, "-m", "authz.cli", "serve", "--config", str(config_path)],
        root / "logs" / "gateway.log",
    )
    envoy_path = root / "envoy.yaml"
    envoy_path.write_text(render_yaml(config), encoding="utf-8")
    envoy = Proc(
        "envoy",
        [envoy_binary(), "-c", str(envoy_path), "--log-level", "warning"],
        root / "logs" / "envoy.log",
    )
    print(
        "gateway services and Envoy started; Envoy listens on "
        f"{config.listen.envoy.address}:{config.listen.envoy.port}"
    )
    try:
        while not stopping and gateway.alive() and envoy.alive():
            time.sleep(0.5)
    finally:
        envoy.stop()
        gateway.stop()
    return 0
