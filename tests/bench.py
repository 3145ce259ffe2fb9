"""``make bench``: Envoy alone against the full gateway, side by side, in front of the same upstream.

Two arms share one upstream emulator started with ``--no-verify`` (canned responses, no signature
checks), so the difference between them is the gateway's own cost:

* ``envoy``: a minimal Envoy (one listener, the router as its only filter, every path to the
  emulator), rendered here;
* ``gateway``: the development stack (``authz.dev.devstack.Stack``): Envoy with ext_authz, ext_proc
  ``gateway.sign`` and ``gateway.meter``, the ``authz serve`` worker(s) and the usage ledger writing
  to an embedded PostgreSQL (or ``DATABASE_URL``).

The machines this runs on are noisy, so the arms alternate: every round runs each scenario on
both arms back to back (the order flips every round) and the figures pool all rounds. The load
generator (``tests/bench_load.py``) runs in its own process. Run ``python -m tests.bench --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from authz.dev.devstack import DEV_GROUPS, Stack, database
from authz.dev.ports import free_port
from authz.envoy.binary import envoy_binary
from authz.supervisor import Proc
from tests.bench_load import http_request

BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-haiku-4-5@20251001"
VERTEX_PREFIX = "/v1/projects/p/locations/us-east5/publishers/anthropic/models"
STREAM_EVENTS = 200
RSS_STREAMS = 200
RSS_DELAY = 0.01
RSS_TARGET_MB = 200.0
ARMS = ("envoy", "gateway")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    """One kind of request, sent identically to both arms."""

    key: str
    label: str
    path: str
    platform: str  # "bedrock" or "vertex"
    streaming: bool


SCENARIOS = (
    Scenario("bedrock_invoke", "Bedrock invoke", f"/model/{BEDROCK_MODEL}/invoke", "bedrock", False),
    Scenario(
        "vertex_raw", "Vertex rawPredict", f"{VERTEX_PREFIX}/{VERTEX_MODEL}:rawPredict", "vertex", False
    ),
    Scenario(
        "bedrock_stream",
        f"Bedrock stream ({STREAM_EVENTS} ev)",
        f"/model/{BEDROCK_MODEL}/invoke-with-response-stream",
        "bedrock",
        True,
    ),
    Scenario(
        "vertex_stream",
        f"Vertex stream ({STREAM_EVENTS} ev)",
        f"{VERTEX_PREFIX}/{VERTEX_MODEL}:streamRawPredict",
        "vertex",
        True,
    ),
)


@dataclass(frozen=True)
class Targets:
    """The acceptance targets for the gateway's overhead."""

    added_p50_ms: float
    added_p99_ms: float | None
    rps_ratio: float


NON_STREAMING_TARGETS = Targets(added_p50_ms=1.5, added_p99_ms=8.0, rps_ratio=0.25)
STREAMING_TARGETS = Targets(added_p50_ms=8.0, added_p99_ms=None, rps_ratio=0.10)


# --- request bodies ---------------------------------------------------------------------------------

_WORDS = (
    "the function returns a list of parsed events from the buffer while the caller keeps reading "
    "def class import async await yield self config request response stream header token upstream "
    "error retry timeout value index path module test fixture assert expected actual bytes string "
    "refactor this file so that the handler validates input before it writes the usage row and then "
    "explain why the previous version leaked the connection when the client disconnected mid-stream"
).split()


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        out.append(word)
        length += len(word) + 1
        if rng.random() < 0.08:
            out.append("\n")
    return " ".join(out)[:size]


def _conversation(total: int = 60_000) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A Claude Code-like system prompt and conversation with about ``total`` bytes of text."""
    rng = random.Random(20251001)
    system = [{"type": "text", "text": "You are Claude Code. " + _text(rng, 6_000)}]
    messages: list[dict[str, Any]] = []
    size = 6_000
    turn = 0
    while size < total:
        chunk = min(6_000, total - size)
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": [{"type": "text", "text": _text(rng, chunk)}]})
        size += chunk
        turn += 1
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": [{"type": "text", "text": "Go on."}]})
    return system, messages


def request_body(scenario: Scenario) -> bytes:
    """A realistic (~60 KB) body in the scenario's platform format."""
    system, messages = _conversation()
    body: dict[str, Any]
    if scenario.platform == "bedrock":
        # Bedrock: no model and no stream in the body; betas travel in the body.
        body = {
            "anthropic_version": "bedrock-2023-05-31",
            "anthropic_beta": ["claude-code-20250219", "interleaved-thinking-2025-05-14"],
            "max_tokens": 32_000,
            "system": system,
            "messages": messages,
            "temperature": 1,
        }
    else:
        body = {
            "anthropic_version": "vertex-2023-10-16",
            "max_tokens": 32_000,
            "system": system,
            "messages": messages,
            "temperature": 1,
        }
        if scenario.streaming:
            body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def request_bytes(scenario: Scenario, host: str, token: str) -> bytes:
    """The whole HTTP/1.1 request, as Claude Code would send it."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": f"Bearer {token}",
        "User-Agent": "claude-cli/2.0.0 (external, cli)",
        "x-app": "cli",
        "X-Claude-Code-Session-Id": str(uuid.UUID(int=7)),
    }
    if scenario.platform == "vertex":
        headers["anthropic-beta"] = "claude-code-20250219,interleaved-thinking-2025-05-14"
    return http_request("POST", scenario.path, host, headers, request_body(scenario))


# --- processes: Envoy alone, load generator, /proc readings ----------------------------------------


def plain_envoy_bootstrap(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """Envoy with one listener whose only HTTP filter is the router, every path to the emulator."""
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            # As in the gateway's rendering, so both arms send the same response headers.
            "suppress_envoy_headers": True,
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "plain",
        "route_config": {
            "name": "plain",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "emulator", "timeout": "0s"}}],
                }
            ],
        },
        "http_filters": [router],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "plain",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "emulator",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "emulator",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    # The gateway's clusters lift the same limits (envoy_clusters._MAX_CONCURRENT).
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "max_connections": 100_000,
                                "max_pending_requests": 100_000,
                                "max_requests": 100_000,
                            }
                        ]
                    },
                }
            ],
        },
    }


def start_plain_envoy(root: Path, upstream_port: int) -> tuple[Proc, int]:
    """Start Envoy alone (same binary and worker threads as the stack's) and wait until ready."""
    listen, admin = free_port(), free_port()
    path = root / "envoy-plain.yaml"
    path.write_text(yaml.safe_dump(plain_envoy_bootstrap(listen, admin, upstream_port)), encoding="utf-8")
    argv = [envoy_binary(), "-c", str(path), "--log-level", "warning", "--base-id", str(admin)]
    proc = Proc("envoy-plain", [*argv, "--concurrency", "2"], root / "logs" / "envoy-plain.log")
    deadline = time.monotonic() + 30
    while True:
        if not proc.alive():
            raise RuntimeError(f"Envoy alone exited:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as resp:
                if resp.status == 200:
                    return proc, listen
        if time.monotonic() > deadline:
            raise RuntimeError(f"Envoy alone not ready:\n{proc.tail()}")
        time.sleep(0.05)


class LoadGenerator:
    """``tests/bench_load.py`` in a process of its own, fed one job at a time."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.bench_load"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            start_new_session=True,  # Ctrl-C reaches only the driver, which stops this in order
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def run(
        self,
        port: int,
        requests: Sequence[bytes],
        *,
        concurrency: int,
        warmup: float,
        seconds: float,
        timeout: float = 120.0,
        per_worker: int = 0,
    ) -> dict[str, Any]:
        """Run one job and return its result."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        job = {
            "host": "127.0.0.1",
            "port": port,
            "requests": [base64.b64encode(r).decode() for r in requests],
            "concurrency": concurrency,
            "warmup": warmup,
            "seconds": seconds,
            "timeout": timeout,
            "per_worker": per_worker,
        }
        self.popen.stdin.write(json.dumps(job) + "\n")
        self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        result: dict[str, Any] = json.loads(line)
        if "fatal" in result:
            raise RuntimeError(f"load generator failed: {result['fatal']}")
        return result

    def close(self) -> None:
        """Close stdin (the generator exits) and make sure it is gone."""
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{current}/task/{task}/children") as fh:
                    todo.extend(int(p) for p in fh.read().split())
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time of ``pids`` (their threads included)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5), fields 14 and 15)
    return total / CLK_TCK


def rss_kb(pid: int) -> int:
    """VmRSS of one process in KiB, 0 when it is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies from /proc/stat, for the machine's utilisation over a window."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def postgres_pid(data_dir: Path) -> int | None:
    """The postmaster of the embedded server (first line of postmaster.pid), if it is ours."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    return None


def thread_cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds of every thread of ``pids``, by thread id."""
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    fields = fh.read().rpartition(")")[2].split()
                    out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def thread_names(spy: str, pids: Sequence[int]) -> dict[int, str]:
    """Python thread names by thread id, from ``py-spy dump`` (threads it does not list stay unnamed)."""
    names: dict[int, str] = {}
    for pid in pids:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run(
                [spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=20, check=False
            ).stdout
            for line in text.splitlines():
                # Thread 0x7F... (active+gil): "MainThread"   or   Thread 28808 (idle): "Thread-1 ..."
                if line.startswith("Thread ") and '"' in line:
                    ident = line.split()[1]
                    with contextlib.suppress(ValueError):
                        names[int(ident, 16) if ident.startswith("0x") else int(ident)] = line.split('"')[1]
    return names


def thread_label(tid: int, names: dict[int, str]) -> str:
    """A thread's Python name, else its kernel name (gRPC core names its own threads)."""
    if tid in names:
        return names[tid]
    with contextlib.suppress(OSError):
        # /proc/<tid> resolves for any thread, though only processes are listed.
        return f"[{Path(f'/proc/{tid}/comm').read_text().strip()}] (native thread)"
    return "?"


class CpuMeter:
    """CPU seconds per component, read before and after each job."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def read(self) -> dict[str, float]:
        """Current CPU totals per component, plus the machine's busy and total jiffies."""
        out = {name: cpu_seconds(pids()) for name, pids in self.groups.items()}
        busy, total = machine_busy()
        out["_busy"], out["_total"] = busy / CLK_TCK, total / CLK_TCK
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Per-component CPU seconds spent between two readings."""
        return {name: after[name] - before[name] for name in before}


class RssSampler(threading.Thread):
    """Sums VmRSS over a process tree every ``interval`` seconds and keeps the peak."""

    def __init__(self, root_pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.peak_kb = 0
        self.peak_detail: dict[int, int] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> int:
        """One reading; returns the total in KiB."""
        detail = {pid: rss_kb(pid) for pid in descendants(self.root_pid)}
        total = sum(detail.values())
        self.samples += 1
        if total > self.peak_kb:
            self.peak_kb, self.peak_detail = total, detail
        return total

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join(2)


def process_name(pid: int) -> str:
    """A short description of a process from its command line."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
        argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        text = " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))
        return text if len(text) < 70 else text[:67] + "..."
    return "?"


# --- statistics -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (q in 0..100); NaN when empty."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


@dataclass
class ArmRuns:
    """Every round of one scenario on one arm."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    def latencies(self) -> list[float]:
        """All measured latencies of all rounds, sorted."""
        return sorted(x for r in self.rounds for x in r["latencies_ms"])

    def summary(self) -> dict[str, Any]:
        """Pooled p50, p99, requests per second and CPU use."""
        lat = self.latencies()
        window = sum(r["window_s"] for r in self.rounds)
        ok = sum(r["ok"] for r in self.rounds)
        cpu: dict[str, float] = {}
        for reading in self.cpu:
            for name, value in reading.items():
                cpu[name] = cpu.get(name, 0.0) + value
        per_request = {name: 1000 * v / ok for name, v in cpu.items() if not name.startswith("_") and ok}
        return {
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "rps": len(lat) / window if window else 0.0,
            "requests": len(lat),
            "response_bytes": sum(r["body_bytes"] for r in self.rounds) / max(1, len(lat)),
            "errors": sum(r["errors"] for r in self.rounds),
            "error_samples": sorted({e for r in self.rounds for e in r["error_samples"]})[:5],
            "round_p50_ms": [percentile(sorted(r["latencies_ms"]), 50) for r in self.rounds],
            "round_rps": [r["measured"] / r["window_s"] for r in self.rounds],
            "loadgen_cpu_pct": 100
            * sum(r["cpu_s"] for r in self.rounds)
            / max(1e-9, sum(r["cpu_wall_s"] for r in self.rounds)),
            "cpu_ms_per_request": per_request,
            "machine_busy_pct": 100 * cpu.get("_busy", 0.0) / max(1e-9, cpu.get("_total", 0.0)),
            # Busy time not spent in any process of this run: other users of the machine, and
            # kernel work not charged to a process.
            "others_pct": 100
            * (cpu.get("_busy", 0.0) - sum(v for n, v in cpu.items() if not n.startswith("_")))
            / max(1e-9, cpu.get("_total", 0.0)),
        }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything one benchmark run starts, measures and prints."""

    args: argparse.Namespace
    stack: Stack
    plain_port: int
    plain_pid: int
    loadgen: LoadGenerator
    pg_data: Path | None
    token: str
    email: str
    gateway_sent: int = 0
    runs: dict[tuple[str, str], ArmRuns] = field(default_factory=dict)
    requests: dict[tuple[str, str], bytes] = field(default_factory=dict)
    meter: CpuMeter | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def arm_port(self, arm: str) -> int:
        assert self.stack.ports is not None
        return self.plain_port if arm == "envoy" else self.stack.ports.envoy

    def prepare(self) -> None:
        """Precompute the request bytes and the CPU meter's process groups."""
        for scenario in SCENARIOS:
            for arm in ARMS:
                host = f"127.0.0.1:{self.arm_port(arm)}"
                self.requests[(scenario.key, arm)] = request_bytes(scenario, host, self.token)
        procs = self.stack.procs
        groups: dict[str, Callable[[], list[int]]] = {
            "loadgen": lambda: [self.loadgen.pid],
            "envoy_plain": lambda: [self.plain_pid],
            "envoy_gateway": lambda: [procs["envoy"].popen.pid],
            "gateway": lambda: descendants(procs["gateway"].popen.pid),
            "emulator": lambda: [procs["emulator"].popen.pid],
            "bench_driver": lambda: [os.getpid()],
        }
        pg = postgres_pid(self.pg_data) if self.pg_data else None
        if pg is not None:
            groups["postgres"] = lambda: descendants(pg)
        self.meter = CpuMeter(groups)

    def sanity(self) -> None:
        """One request per scenario and arm: each must answer 200 before anything is measured."""
        for scenario in SCENARIOS:
            for arm in ARMS:
                result = self.loadgen.run(
                    self.arm_port(arm),
                    [self.requests[(scenario.key, arm)]],
                    concurrency=1,
                    warmup=0,
                    seconds=30,
                    per_worker=1,
                )
                if arm == "gateway":
                    self.gateway_sent += result["sent"]
                if result["ok"] != result["sent"] or result["sent"] < 1:
                    raise RuntimeError(
                        f"{scenario.label} through {arm} failed: "
                        f"{result['statuses']} {result['error_samples']}\n"
                        + self.stack.procs["gateway"].tail(20)
                    )

    def job(self, scenario: Scenario, arm: str, rnd: int) -> None:
        """One measured run of ``scenario`` on ``arm``."""
        assert self.meter is not None
        before = self.meter.read()
        result = self.loadgen.run(
            self.arm_port(arm),
            [self.requests[(scenario.key, arm)]],
            concurrency=self.args.concurrency,
            warmup=self.args.warmup,
            seconds=self.args.seconds,
        )
        cpu = CpuMeter.delta(before, self.meter.read())
        if arm == "gateway":
            self.gateway_sent += result["sent"]
        runs = self.runs.setdefault((scenario.key, arm), ArmRuns())
        runs.rounds.append(result)
        runs.cpu.append(cpu)
        lat = sorted(result["latencies_ms"])
        progress(
            f"  round {rnd + 1}: {scenario.label:<24} {arm:<8} "
            f"{result['measured'] / result['window_s']:8.1f} req/s"
            f"  p50 {percentile(lat, 50):7.2f} ms  p99 {percentile(lat, 99):7.2f} ms"
            f"  errors {result['errors']}  loadgen CPU {100 * result['cpu_s'] / result['cpu_wall_s']:.0f}%"
        )

    def rounds(self) -> None:
        """Every scenario on both arms, alternating; the arm order flips each round."""
        self.stack.emulator("POST", "/_emulator/state", {"deltas": STREAM_EVENTS, "delay": 0})
        for rnd in range(self.args.rounds):
            order = ARMS if rnd % 2 == 0 else ARMS[::-1]
            progress(f"round {rnd + 1}/{self.args.rounds} (order: {' then '.join(order)})")
            for scenario in SCENARIOS:
                for arm in order:
                    self.job(scenario, arm, rnd)

    def rss_phase(self) -> None:
        """200 concurrent, slowly delivered streams through the gateway while RSS is sampled."""
        self.stack.emulator("POST", "/_emulator/state", {"deltas": STREAM_EVENTS, "delay": RSS_DELAY})
        gateway_pid = self.stack.procs["gateway"].popen.pid
        idle = RssSampler(gateway_pid)
        idle.sample()
        sampler = RssSampler(gateway_pid)
        streams = [self.requests[(s.key, "gateway")] for s in SCENARIOS if s.streaming]
        sampler.start()
        try:
            result = self.loadgen.run(
                self.stack.ports.envoy if self.stack.ports else 0,
                streams,
                concurrency=RSS_STREAMS,
                warmup=0,
                seconds=self.args.rss_seconds,
                timeout=180,
            )
        finally:
            sampler.stop()
        self.gateway_sent += result["sent"]
        lat = sorted(result["latencies_ms"])
        self.results["rss"] = {
            "streams_concurrent": RSS_STREAMS,
            "event_delay_s": RSS_DELAY,
            "events": STREAM_EVENTS,
            "streams_completed": result["ok"],
            "errors": result["errors"],
            "error_samples": result["error_samples"],
            "stream_p50_ms": percentile(lat, 50),
            "stream_p99_ms": percentile(lat, 99),
            "idle_rss_mb": idle.peak_kb / 1024,
            "peak_rss_mb": sampler.peak_kb / 1024,
            "samples": sampler.samples,
            "peak_processes": {
                f"{pid} {process_name(pid)}": kb / 1024 for pid, kb in sampler.peak_detail.items()
            },
        }
        self.stack.emulator("POST", "/_emulator/state", {"delay": 0})

    def profile(self) -> None:
        """py-spy on the gateway worker(s) while non-streaming Bedrock load runs through the gateway.

        Only samples holding the GIL are kept (``--gil``): they say where the Python CPU goes. The
        CPU of every gateway thread (GIL or not) is read from /proc over the same window.
        """
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.results["profile"] = {"error": "py-spy not installed (pip install py-spy)"}
            return
        out = self.stack.root / "profile.txt"
        gateway_pid = self.stack.procs["gateway"].popen.pid
        scenario = SCENARIOS[0]
        names = thread_names(spy, descendants(gateway_pid))
        argv = [spy, "record", "-p", str(gateway_pid), "-d", str(self.args.profile), "-r", "100"]
        argv += ["-f", "raw", "-o", str(out), "--nolineno", "--gil"]
        if self.args.workers > 1:
            argv.append("--subprocesses")
        box: dict[str, Any] = {}

        def load() -> None:
            try:
                box["result"] = self.loadgen.run(
                    self.arm_port("gateway"),
                    [self.requests[(scenario.key, "gateway")]],
                    concurrency=self.args.concurrency,
                    warmup=1.0,
                    seconds=self.args.profile + 1.5,
                )
            except Exception as exc:
                box["error"] = exc

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1.0)  # the load is running before sampling starts
        before, wall0 = thread_cpu(descendants(gateway_pid)), time.monotonic()
        with open(self.stack.root / "logs" / "py-spy.log", "wb") as log:
            spy_proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
            try:
                spy_proc.wait(self.args.profile + 30)
            finally:
                if spy_proc.poll() is None:
                    spy_proc.terminate()
                    spy_proc.wait(5)
        after, wall1 = thread_cpu(descendants(gateway_pid)), time.monotonic()
        loader.join()
        if "error" in box:
            raise box["error"]
        result = box["result"]
        self.gateway_sent += result["sent"]
        if spy_proc.returncode:
            log_text = (self.stack.root / "logs" / "py-spy.log").read_text(errors="replace")
            self.results["profile"] = {"error": f"py-spy failed: {log_text.strip()[-400:]}"}
            return
        threads = sorted(
            (
                (
                    100 * (after[tid] - before.get(tid, 0.0)) / (wall1 - wall0),
                    f"{tid} {thread_label(tid, names)}",
                )
                for tid in after
            ),
            reverse=True,
        )
        self.results["profile"] = summarise_profile(out) | {
            "scenario": scenario.label,
            "rps_while_profiled": result["measured"] / result["window_s"],
            "threads_pct_of_core": [(name, pct) for pct, name in threads if pct >= 0.5],
        }

    def count_rows(self) -> dict[str, Any]:
        """Usage rows written for the bench user, once the ledger has caught up (or stopped moving)."""

        async def count() -> int:
            conn = await asyncpg.connect(self.stack.database_url)
            try:
                value = await conn.fetchval(
                    "SELECT count(*) FROM usage_events WHERE user_email = $1", self.email
                )
                return int(value)
            finally:
                await conn.close()

        rows, last_change, last = 0, time.monotonic(), -1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = asyncio.run(count())
            if rows >= self.gateway_sent:
                break
            if rows != last:
                last, last_change = rows, time.monotonic()
            elif time.monotonic() - last_change > 5:
                break
            time.sleep(0.25)
        return {"requests_sent": self.gateway_sent, "usage_rows": rows}


def summarise_profile(path: Path, top: int = 18) -> dict[str, Any]:
    """Top functions by own and by inclusive samples from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return {"error": f"no samples in {path}"}

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        return [(name, 100 * n / total) for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]]

    # Frames every sample passes through (entry point, event loop, thread start) say nothing.
    plumbing: tuple[str, ...] = ("(<frozen runpy>)", "(asyncio/base_events.py)", "(asyncio/runners.py)")
    plumbing += ("(asyncio/events.py)", "(authz/cli.py)", "(authz/service.py)", "(threading.py)")
    useful = {name: n for name, n in inclusive.items() if not name.endswith(plumbing)}
    return {"samples": total, "own": ranked(own), "inclusive": ranked(useful)}


def progress(text: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


# --- report -----------------------------------------------------------------------------------------


def report(bench: Bench, started: float) -> str:
    """The printed results."""
    args = bench.args
    lines: list[str] = []
    add = lines.append
    cpus = os.cpu_count() or 1
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    add("Claude gateway benchmark: Envoy alone vs the full gateway, same upstream")
    add("=" * 100)
    add(f"machine     {cpus} CPU(s) ({model}), Python {platform.python_version()}")
    add(
        f"upstream    one emulator process, --no-verify, {STREAM_EVENTS}-event streams at full speed "
        "(delay 0)"
    )
    add("envoy       Envoy alone: 1 listener, router only, --concurrency 2")
    add(
        "gateway     Envoy (--concurrency 2) + ext_authz + ext_proc sign + ext_proc meter + ledger "
        f"-> Postgres; {args.workers} gateway worker process(es)"
    )
    add(
        f"load        {args.concurrency} concurrent keep-alive connections, closed loop; "
        f"{args.rounds} rounds x {args.seconds:g} s per scenario per arm (+{args.warmup:g} s warm-up); "
        "arm order flips each round"
    )
    add(
        "NOTE        all processes (load generator, both Envoys, gateway worker(s), emulator, "
        f"Postgres) share these {cpus} cores;"
    )
    add("            absolute figures are CPU-bound and noisy; the side-by-side differences are what count.")
    add("")
    header = f"{'scenario':<26}{'arm':<9}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}"
    header += f"{'resp KB':>9}{'loadgen CPU':>13}"
    add(header)
    add("-" * len(header))
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    for scenario in SCENARIOS:
        for arm in ARMS:
            s = bench.runs[(scenario.key, arm)].summary()
            summaries[(scenario.key, arm)] = s
            add(
                f"{scenario.label if arm == 'envoy' else '':<26}{arm:<9}{s['p50_ms']:9.2f}{s['p99_ms']:9.2f}"
                f"{s['rps']:9.1f}{s['errors']:8d}"
                f"{s['response_bytes'] / 1024:9.1f}{s['loadgen_cpu_pct']:12.0f}%"
            )
    add("")
    add("Per round (p50 ms / req/s), to show the noise:")
    for scenario in SCENARIOS:
        for arm in ARMS:
            s = summaries[(scenario.key, arm)]
            rounds = "  ".join(
                f"{p:6.2f}/{r:6.1f}" for p, r in zip(s["round_p50_ms"], s["round_rps"], strict=True)
            )
            add(f"  {scenario.label if arm == 'envoy' else '':<26}{arm:<9}{rounds}")
    add("")
    add("Gateway overhead (gateway minus Envoy alone; rps ratio = gateway / Envoy alone)")
    header = f"{'scenario':<26}{'added p50':>16}{'added p99':>17}{'rps ratio':>18}"
    add(header)
    add("-" * len(header))
    checks: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        targets = STREAMING_TARGETS if scenario.streaming else NON_STREAMING_TARGETS
        env, gw = summaries[(scenario.key, "envoy")], summaries[(scenario.key, "gateway")]
        d50, d99 = gw["p50_ms"] - env["p50_ms"], gw["p99_ms"] - env["p99_ms"]
        ratio = gw["rps"] / env["rps"] if env["rps"] else math.nan
        ok50 = d50 <= targets.added_p50_ms
        ok99 = targets.added_p99_ms is None or d99 <= targets.added_p99_ms
        okr = ratio >= targets.rps_ratio
        p99_text = f"{d99:+7.2f} ms" + (f" {verdict(ok99)}" if targets.added_p99_ms is not None else "     ")
        add(
            f"{scenario.label:<26}{d50:+8.2f} ms {verdict(ok50)}{p99_text:>17}"
            f"{100 * ratio:11.1f}% {verdict(okr)}"
        )
        checks[scenario.key] = {
            "added_p50_ms": d50,
            "added_p99_ms": d99,
            "rps_ratio": ratio,
            "targets": targets.__dict__,
            "pass": ok50 and ok99 and okr,
        }
    add(
        f"targets: non-streaming added p50 <= {NON_STREAMING_TARGETS.added_p50_ms} ms, added p99 <= "
        f"{NON_STREAMING_TARGETS.added_p99_ms} ms, rps >= {100 * NON_STREAMING_TARGETS.rps_ratio:.0f}%; "
        f"streaming added p50 <= {STREAMING_TARGETS.added_p50_ms} ms, streams/s >= "
        f"{100 * STREAMING_TARGETS.rps_ratio:.0f}%"
    )
    add("")
    add("Where the CPU goes: CPU ms per completed request, per process (whole job incl. warm-up)")
    names = ["loadgen", "envoy_plain", "envoy_gateway", "gateway", "emulator", "postgres", "bench_driver"]
    short = {"envoy_plain": "envoy-alone", "envoy_gateway": "envoy(gw)", "bench_driver": "driver"}
    present = [n for n in names if any(n in s["cpu_ms_per_request"] for s in summaries.values())]
    header = (
        f"{'scenario':<26}{'arm':<9}"
        + "".join(f"{short.get(n, n):>12}" for n in present)
        + f"{'machine busy':>14}{'not ours':>10}"
    )
    add(header)
    add("-" * len(header))
    for scenario in SCENARIOS:
        for arm in ARMS:
            s = summaries[(scenario.key, arm)]
            cells = "".join(f"{s['cpu_ms_per_request'].get(n, 0.0):12.3f}" for n in present)
            add(
                f"{scenario.label if arm == 'envoy' else '':<26}{arm:<9}{cells}{s['machine_busy_pct']:13.0f}%"
                f"{max(0.0, s['others_pct']):9.0f}%"
            )
    add(
        "  (machine busy: all cores over the whole job; not ours: busy time outside this run's processes,"
        " e.g. other users, unattributed kernel work)"
    )
    rss = bench.results["rss"]
    add("")
    add(
        f"Memory: {rss['streams_concurrent']} concurrent streams through the gateway "
        f"({rss['events']} events, {rss['event_delay_s']:g} s apart), gateway RSS sampled every 50 ms "
        f"({rss['samples']} samples)"
    )
    rss_ok = rss["peak_rss_mb"] < RSS_TARGET_MB
    add(
        f"  idle {rss['idle_rss_mb']:.1f} MB -> peak {rss['peak_rss_mb']:.1f} MB "
        f"(target < {RSS_TARGET_MB:.0f} MB) {verdict(rss_ok)}; streams completed "
        f"{rss['streams_completed']}, errors {rss['errors']}, "
        f"stream duration p50 {rss['stream_p50_ms']:.0f} ms p99 {rss['stream_p99_ms']:.0f} ms"
    )
    for name, mb in rss["peak_processes"].items():
        add(f"    {mb:7.1f} MB  {name}")
    ledger = bench.results["ledger"]
    add("")
    add(
        f"Ledger: {ledger['usage_rows']} usage rows for {ledger['requests_sent']} requests sent "
        "through the gateway "
        f"{'(keeps up)' if ledger['usage_rows'] == ledger['requests_sent'] else '(MISMATCH)'}"
    )
    if "profile" in bench.results:
        prof = bench.results["profile"]
        add("")
        if "error" in prof:
            add(f"Profile: {prof['error']}")
        else:
            add(
                f"Profile: py-spy, {args.profile:g} s on the gateway worker(s) during {prof['scenario']} "
                f"({prof['rps_while_profiled']:.0f} req/s), {prof['samples']} samples holding the GIL"
            )
            add("  CPU per gateway thread over the window (% of one core; py-spy's pauses included):")
            for name, pct in prof["threads_pct_of_core"]:
                add(f"    {pct:5.1f}%  {name}")
            add("  Python samples holding the GIL, top by own time:")
            for name, pct in prof["own"]:
                note = (
                    "   <- C/Cython run by the event loop (grpc.aio cygrpc, protobuf)"
                    if (name.startswith("Handle._run "))
                    else ""
                )
                add(f"    {pct:5.1f}%  {name}{note}")
            add("  ... and by inclusive time:")
            for name, pct in prof["inclusive"]:
                add(f"    {pct:5.1f}%  {name}")
    add("")
    add(f"total run time {time.monotonic() - started:.0f} s")
    bench.results["summaries"] = {f"{k[0]}/{k[1]}": v for k, v in summaries.items()}
    bench.results["checks"] = checks
    bench.results["rss_pass"] = rss_ok
    return "\n".join(lines)


# --- entry point ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="measured seconds per scenario, per arm, per round (default 3)",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="unmeasured seconds before each run (default 0.5)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    parser.add_argument(
        "--rss-seconds",
        type=float,
        default=4.0,
        help="seconds of new streams in the memory phase (default 4)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="also profile the gateway with py-spy for this long under non-streaming load (default off)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (logs, configs)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ignore_interrupts() -> None:
    # Cleanup must finish: a second Ctrl-C would otherwise leave processes behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets missed or not), 1 when it could not run."""
    args = parse_args(argv)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    progress(f"state directory {root}")
    output = ""
    try:
        with _sigterm_as_interrupt(), database(root, os.environ) as dsn:
            stack = Stack(
                root=root / "stack", database_url=dsn, workers=args.workers, emulator_args=("--no-verify",)
            )
            plain: Proc | None = None
            loadgen: LoadGenerator | None = None
            try:
                progress("starting the stack (emulator --no-verify, gateway, Envoy) and Envoy alone")
                stack.start()
                assert stack.ports is not None
                plain, plain_port = start_plain_envoy(root, stack.ports.emulator)
                loadgen = LoadGenerator()
                email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
                bench = Bench(
                    args=args,
                    stack=stack,
                    plain_port=plain_port,
                    plain_pid=plain.popen.pid,
                    loadgen=loadgen,
                    pg_data=None if os.environ.get("DATABASE_URL") else root / "postgres",
                    token=stack.mint(email=email, groups=DEV_GROUPS),
                    email=email,
                )
                bench.prepare()
                bench.sanity()
                progress(f"ready after {time.monotonic() - started:.1f} s")
                bench.rounds()
                progress(f"memory: {RSS_STREAMS} concurrent streams through the gateway")
                bench.rss_phase()
                if args.profile > 0:
                    progress(f"profiling the gateway for {args.profile:g} s")
                    bench.profile()
                bench.results["ledger"] = bench.count_rows()
                output = report(bench, started)
                print(output, flush=True)
                if args.json:
                    document = {"args": {k: str(v) for k, v in vars(args).items()}, **bench.results}
                    args.json.write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
            finally:
                _ignore_interrupts()
                progress("stopping every process this run started")
                if loadgen is not None:
                    loadgen.close()
                if plain is not None:
                    plain.stop()
                stack.stop()
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        _ignore_interrupts()
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if output else 1


if __name__ == "__main__":
    sys.exit(main())
