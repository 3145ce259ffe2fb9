"""``authz run`` as an operator uses it: several gateways on one host, a dead child stops the whole
gateway loudly, Envoy stops sending requests to a worker that fails its health checks, and SIGHUP
rereads the configuration."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml

from authz.dev.devstack import Ports, Stack
from tests.e2e.conftest import rows_for_user, wait_for

pytestmark = pytest.mark.e2e

PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "x"}],
}


def call(url: str, token: str) -> httpx.Response:
    """One Bedrock-format call with the gateway token."""
    return httpx.post(f"{url}{PATH}", headers={"authorization": f"Bearer {token}"}, json=BODY, timeout=30)


class Run:
    """One ``authz run`` child, its config written by the development stack (emulator included)."""

    def __init__(self, stack: Stack, state: Path) -> None:
        self.stack = stack
        self.state = state
        self.lines: list[str] = []
        assert stack.config_path is not None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "authz.cli",
                "run",
                "--config",
                str(stack.config_path),
                "--state-dir",
                str(state),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.append(line)

    def output(self) -> str:
        """Everything ``authz run`` printed so far."""
        return "".join(self.lines)

    def wait_ready(self) -> None:
        """Wait for the "gateway ready" line (and fail with the output if the run exits first)."""
        wait_for(lambda: "gateway ready" in self.output() or self.proc.poll() is not None, timeout=120)
        assert "gateway ready" in self.output(), self.output()

    def close(self) -> None:
        """Close the output pipe once the run has exited."""
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def make_run(pg_dsn: str, tmp_path: Path) -> Iterator[Any]:
    """Start ``authz run`` stacks (each with its own ports and emulator); stop them all afterwards."""
    started: list[Run] = []

    def make(name: str, workers: int = 1, extra: dict[str, Any] | None = None) -> Run:
        stack = Stack(root=tmp_path / name, database_url=pg_dsn, workers=workers, extra_config=extra or {})
        stack.ports = Ports.pick(workers)
        stack.root.mkdir(parents=True)
        stack.start_emulator()
        stack.config_path = stack.write_config()
        from authz.config import load

        stack.config = load(stack.config_path, os.environ)
        run = Run(stack, tmp_path / name / "state")
        started.append(run)
        return run

    yield make
    for run in started:
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.wait(10)
        run.close()
        run.stack.stop()


def _child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_two_gateways_share_one_host(make_run: Any, unique_user: str) -> None:
    """Two `authz run` gateways on one host both serve (each Envoy has its own base id), and each
    keeps its state under its own --state-dir, none in the working directory."""
    first, second = make_run("one"), make_run("two")
    first.wait_ready()
    second.wait_ready()
    for run in (first, second):
        assert call(run.stack.envoy_url, run.stack.mint(unique_user)).status_code == 200
        assert (run.state / "envoy.yaml").is_file()
        assert (run.state / "logs" / "envoy.log").is_file()
    assert (first.state / "envoy.base-id").read_text() != (second.state / "envoy.base-id").read_text()
    assert wait_for(lambda: len(rows_for_user(first.stack.database_url, unique_user)) == 2)
    assert first.stop() == 0 and second.stop() == 0


def test_envoy_death_stops_the_gateway_naming_envoy(make_run: Any) -> None:
    """Killing Envoy under `authz run` makes it exit non-zero within 2 seconds, naming Envoy and
    quoting its log, and the services are stopped with it."""
    run = make_run("kill")
    run.wait_ready()
    children = {_cmdline(pid): pid for pid in _child_pids(run.proc.pid)}
    envoy_pid = next(pid for cmd, pid in children.items() if "envoy" in cmd.split()[0])
    services_pid = next(pid for cmd, pid in children.items() if " serve " in cmd)
    os.kill(envoy_pid, signal.SIGKILL)
    killed = time.monotonic()
    status = run.proc.wait(30)
    elapsed = time.monotonic() - killed
    assert status != 0
    assert elapsed < 2.0, f"authz run took {elapsed:.2f}s to exit after Envoy died"
    assert re.search(r"envoy \(pid \d+\) was killed by SIGKILL", run.output()), run.output()
    assert not Path(f"/proc/{services_pid}").exists() or _zombie(services_pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _worker_pids(log: Path) -> dict[int, int]:
    """``{grpc port: pid}`` from the services' start-up lines."""
    found = re.findall(r"worker \d+ \(pid (\d+)\) serving gRPC on [^:]+:(\d+)", log.read_text())
    return {int(port): int(pid) for pid, port in found}


def _host_stats(admin: str, port: int) -> dict[str, str]:
    """Envoy's per-host figures for the gateway_grpc endpoint on ``port`` (admin /clusters)."""
    with urllib.request.urlopen(f"{admin}/clusters?format=json", timeout=5) as resp:
        clusters = json.load(resp)["cluster_statuses"]
    grpc = next(c for c in clusters if c["name"] == "gateway_grpc")
    host = next(h for h in grpc["host_statuses"] if h["address"]["socket_address"]["port_value"] == port)
    stats = {s["name"]: str(s.get("value", "0")) for s in host.get("stats", [])}
    stats["health"] = json.dumps(host["health_status"], sort_keys=True)
    return stats


def test_worker_failing_health_checks_gets_no_requests(pg_dsn: str, tmp_path: Path, unique_user: str) -> None:
    """With two workers, one stopped (SIGSTOP: it answers nothing, health checks included) is
    marked unhealthy by Envoy and gets no new request while the other serves them all; once it
    answers again it gets requests again."""
    stack = Stack(root=tmp_path / "stack", database_url=pg_dsn, workers=2)
    stack.start()
    try:
        assert stack.ports is not None
        admin = f"http://127.0.0.1:{stack.ports.admin}"
        pids = wait_for(lambda: len(p := _worker_pids(stack.root / "logs" / "gateway.log")) == 2 and p)
        stuck_port = stack.ports.grpc + 1
        token = stack.mint(unique_user)
        assert all(call(stack.envoy_url, token).status_code == 200 for _ in range(4))
        os.kill(pids[stuck_port], signal.SIGSTOP)
        try:
            wait_for(
                lambda: "failed_active_health_check" in _host_stats(admin, stuck_port)["health"], timeout=20
            )
            before = _host_stats(admin, stuck_port)["rq_total"]
            statuses = [call(stack.envoy_url, token).status_code for _ in range(10)]
            assert statuses == [200] * 10
            assert _host_stats(admin, stuck_port)["rq_total"] == before
        finally:
            os.kill(pids[stuck_port], signal.SIGCONT)
        healthy = json.dumps({"eds_health_status": "HEALTHY"})
        wait_for(lambda: _host_stats(admin, stuck_port)["health"] == healthy, timeout=20)
        before = int(_host_stats(admin, stuck_port)["rq_total"])

        def served_by_it_again() -> bool:
            # Envoy's worker threads pick up the host's new health a moment after the admin shows it.
            assert call(stack.envoy_url, token).status_code == 200
            return int(_host_stats(admin, stuck_port)["rq_total"]) > before

        wait_for(served_by_it_again, timeout=20)
    finally:
        stack.stop()


def test_a_dead_worker_is_named_and_restarted_while_the_other_serves(make_run: Any, unique_user: str) -> None:
    """With two workers, killing one makes `authz serve` name it and how it died and start it
    again on its port, while `authz run` keeps running and the gateway keeps answering."""
    run = make_run("worker", workers=2)
    run.wait_ready()
    log = run.state / "logs" / "gateway.log"
    pids = _worker_pids(log)
    assert len(pids) == 2
    port = max(pids)
    os.kill(pids[port], signal.SIGKILL)
    pattern = r"authz serve: worker 1 \(pid \d+\) was killed by SIGKILL; restarting it"
    wait_for(lambda: re.search(pattern, log.read_text()), timeout=30)
    wait_for(lambda: _worker_pids(log).get(port) not in (None, pids[port]), timeout=30)
    assert run.proc.poll() is None
    token = run.stack.mint(unique_user)
    assert all(call(run.stack.envoy_url, token).status_code == 200 for _ in range(4))


def test_a_killed_supervisor_takes_its_children_with_it(make_run: Any) -> None:
    """SIGKILL to `authz run` (kill -9, the OOM killer) leaves no half of the gateway running: Envoy,
    `authz serve` and its workers stop on their own instead of holding the ports."""
    run = make_run("orphans", workers=2)
    run.wait_ready()
    children = _child_pids(run.proc.pid)
    workers = list(_worker_pids(run.state / "logs" / "gateway.log").values())
    assert len(children) == 2 and len(workers) == 2
    run.proc.kill()
    run.proc.wait(10)

    def alive() -> list[int]:
        return [pid for pid in (*children, *workers) if not _zombie(pid)]

    wait_for(lambda: not alive(), timeout=45)


HAIKU_PATH = "/model/us.anthropic.claude-haiku-4-5-20251001-v1:0/invoke"


def test_sighup_rereads_the_configuration_and_a_restarted_worker_keeps_it(
    make_run: Any, unique_user: str
) -> None:
    """SIGHUP to `authz run` reaches `authz serve`, whose two workers take the file's new models
    (file watching is off); a file broken after that is refused, and a worker killed then starts
    again with the configuration its sibling runs rather than the broken file, so the gateway
    keeps running and answering under the reloaded policy."""
    run = make_run("hup", workers=2, extra={"reload": {"watch_interval": 0}})
    run.wait_ready()
    stack = run.stack
    assert stack.config_path is not None
    log = run.state / "logs" / "gateway.log"
    token = stack.mint(unique_user)

    def haiku_only() -> bool:
        return all(
            call(stack.envoy_url, token).status_code == 400
            and httpx.post(
                f"{stack.envoy_url}{HAIKU_PATH}",
                headers={"authorization": f"Bearer {token}"},
                json=BODY,
                timeout=30,
            ).status_code
            == 200
            for _ in range(4)
        )

    assert call(stack.envoy_url, token).status_code == 200
    raw = yaml.safe_load(stack.config_path.read_text())
    raw["policies"][0]["models"] = ["claude-haiku-*"]
    stack.config_path.write_text(yaml.safe_dump(raw))
    run.proc.send_signal(signal.SIGHUP)
    wait_for(haiku_only, timeout=10)
    assert "configuration reloaded on SIGHUP" in log.read_text()

    raw["policies"][0]["model"] = "claude-*"
    stack.config_path.write_text(yaml.safe_dump(raw))
    run.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "policies[0].model: unknown key" in log.read_text(), timeout=10)

    pids = _worker_pids(log)
    port = max(pids)
    os.kill(pids[port], signal.SIGKILL)
    wait_for(lambda: _worker_pids(log).get(port) not in (None, pids[port]), timeout=30)
    assert stack.ports is not None
    admin = f"http://127.0.0.1:{stack.ports.admin}"
    healthy = json.dumps({"eds_health_status": "HEALTHY"})
    wait_for(lambda: _host_stats(admin, port)["health"] == healthy, timeout=20)
    before = int(_host_stats(admin, port)["rq_total"])
    # The restarted worker answers its share of these, under the reloaded policy.
    wait_for(lambda: haiku_only() and int(_host_stats(admin, port)["rq_total"]) > before, timeout=20)
    assert run.proc.poll() is None
    assert run.stop() == 0
