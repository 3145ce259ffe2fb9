"""``make bench``: what the gateway costs, measured side by side with Envoy alone on one canned upstream.

How to run::

    make bench                                     # every scenario, defaults below (several minutes)
    .venv/bin/python -m tests.bench --smoke        # one short round of two scenarios (under a minute)
    .venv/bin/python -m tests.bench --only 'bedrock_*' --rounds 6 --json /tmp/bench.json
    .venv/bin/python -m tests.bench --variants gateway,gateway_2w --profile 10
    .venv/bin/python -m tests.bench --variants gateway_caps  # spend caps and rate limits vs none
    .venv/bin/python -m tests.bench --variants gateway_failover --only 'messages_*'  # failover chains
    .venv/bin/python -m tests.bench --help

What runs (all on loopback, all sharing the machine's cores):

* the canned upstream (``tests/bench_upstream.py``): one Envoy answering Bedrock ``/invoke``,
  ``invoke-with-response-stream``, Vertex ``:rawPredict`` and ``:streamRawPredict`` with fixed
  bodies (``direct_response``), so the upstream costs next to nothing and the same for every arm;
* Envoy alone: a listener and the router, every path to the canned upstream;
* one development stack (``authz.dev.devstack.Stack``) per gateway variant (``tests/bench_arms.py``):
  Envoy with ext_authz and the ext_proc filters, the services, the ledger writing to PostgreSQL
  (embedded, or ``DATABASE_URL``), its upstreams' ``base_url`` set to the canned upstream. The
  stack's Python emulator stays up to issue the Vertex service-account token (cached by the
  services) and to serve the memory phase's slow streams;
* the load generator (``tests/bench_load.py``) in one or more processes of its own.

Phases: a sanity pass (one request per scenario and arm, the body compared byte for byte with the
canned answer); the saturation rounds, where each scenario runs on Envoy alone and on every
variant back to back, the order flipping every round, the figures pooling all rounds; the memory
phase (``--rss-streams`` concurrent slow streams from the emulator through each variant while the
RSS of its services and Envoy is sampled); optionally a py-spy profile; then the ledger check (one
row per gateway request, each with the canned counts). The report (markdown) goes to stdout,
progress to stderr, and everything to ``--json PATH``. Exit status: 0 when the run completed,
whatever the targets; 1 when it could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from authz.dev.devstack import BEDROCK_REGION, DEV_GROUPS, VERTEX_REGION, Ports, Stack, database
from authz.envoy.binary import envoy_binary
from authz.supervisor import Proc
from backends.emulator.state import DEFAULT_PROJECT, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
from tests.bench_arms import (
    MESSAGES_VERTEX_GROUP,
    SMOKE_SCENARIOS,
    Scenario,
    Variant,
    merge,
    request_bytes,
    request_headers,
    request_path,
    select_scenarios,
    select_variants,
    session_id,
)
from tests.bench_ledger import Job, check_ledger
from tests.bench_procs import (
    CpuMeter,
    LoadGenerator,
    RssSampler,
    descendants,
    postgres_pid,
    process_name,
    summarise_profile,
    thread_cpu,
    thread_label,
    thread_names,
)
from tests.bench_report import (
    ENVOY,
    ArmRuns,
    Check,
    ledger_checks,
    memory_checks,
    percentile,
    render,
    scenario_checks,
    versus_check,
)
from tests.bench_sink import OtlpSink
from tests.bench_upstream import (
    CANNED_USAGE,
    STREAM_DELTAS,
    CannedAnswer,
    start_canned_upstream,
    start_envoy_alone,
    upstream_operations,
)

RSS_DELAY = 0.01  # seconds between events of the memory phase's streams
SLOW_GROUP = "bench-slow-streams"  # routed to the emulator's slow streams, for the memory phase


def progress(text: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def stack_overlay(canned_url: str, stack: Stack) -> dict[str, Any]:
    """The development config changed for the bench: the usual upstreams on the canned upstream,
    and for ``SLOW_GROUP`` a second pair on the stack's emulator (its slow streams, for RSS)."""
    assert stack.ports is not None
    sa_path = stack.root / "keys" / "vertex-service-account.json"
    return {
        "upstreams": {
            "bedrock-dev": {"base_url": canned_url},
            "vertex-dev": {"base_url": canned_url},
            "bedrock-emulator": {
                "kind": "bedrock",
                "region": BEDROCK_REGION,
                "base_url": stack.emulator_url,
                "credentials": {
                    "source": "static",
                    "access_key_id": TEST_ACCESS_KEY_ID,
                    "secret_access_key": TEST_SECRET_ACCESS_KEY,
                },
            },
            "vertex-emulator": {
                "kind": "vertex",
                "region": VERTEX_REGION,
                "project": DEFAULT_PROJECT,
                "base_url": stack.emulator_url,
                "credentials": {"source": "service_account_file", "path": str(sa_path)},
            },
        },
        # One upstream per request: the Messages policies list a Bedrock and a Vertex upstream, which
        # would make every Messages request a failover chain; the gateway_failover variant turns
        # chains on (tests/bench_arms.py).
        "failover": {"max_attempts": 1},
        # First match wins (authz.policy.decide): the slow group, then the Messages-to-Vertex one (its
        # tokens carry the developers' group too), before the developers.
        "policies": [
            {
                "name": "bench-slow-streams",
                "groups": [SLOW_GROUP],
                "models": ["claude-*"],
                "upstreams": ["bedrock-emulator", "vertex-emulator"],
            },
            {
                "name": MESSAGES_VERTEX_GROUP,
                "groups": [MESSAGES_VERTEX_GROUP],
                "models": ["claude-*"],
                "upstreams": ["vertex-dev", "bedrock-dev"],
            },
            {
                "name": "developers",
                "groups": list(DEV_GROUPS),
                "models": ["claude-*"],
                "upstreams": ["bedrock-dev", "vertex-dev"],
            },
        ],
    }


def make_stack(
    root: Path, dsn: str, variant: Variant, workers: int, canned_url: str, otlp_sink: str | None = None
) -> Stack:
    """A development stack for ``variant``, its upstreams on the canned upstream (not started);
    ``otlp_sink`` is the collector for a variant that exports telemetry."""
    workers = variant.workers or workers
    stack = Stack(
        root=root / variant.key,
        database_url=dsn,
        workers=workers,
        ports=Ports.pick(workers),
        emulator_args=("--no-verify",),
    )
    config = merge(stack_overlay(canned_url, stack), variant.overlay)
    if variant.policy_overlay:
        config["policies"] = [merge(policy, variant.policy_overlay) for policy in config["policies"]]
    stack.extra_config = config
    if variant.otlp_sink:
        if otlp_sink is None:
            raise ValueError(f"variant {variant.key} needs the OTLP sink")
        stack.extra_config = merge(stack.extra_config, {"telemetry": {"otlp": {"endpoint": otlp_sink}}})
    return stack


@dataclass
class Bench:
    """Everything one benchmark run starts, measures and reports."""

    args: argparse.Namespace
    scenarios: tuple[Scenario, ...]
    variants: tuple[Variant, ...]
    root: Path
    dsn: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    canned: Proc | None = None
    canned_port: int = 0
    alone: Proc | None = None
    alone_port: int = 0
    sink: OtlpSink | None = None
    stacks: dict[str, Stack] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    loadgen: LoadGenerator | None = None
    meter: CpuMeter | None = None
    answers: dict[str, CannedAnswer] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    runs: dict[tuple[str, str], ArmRuns] = field(default_factory=dict)
    jobs: list[Job] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def email(self) -> str:
        return f"bench-{self.run_id}@example.com"

    @property
    def arms(self) -> list[str]:
        return [ENVOY, *(v.key for v in self.variants)]

    # --- start and stop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the canned upstream, Envoy alone, a stack per variant and the load generator."""
        self.answers = {a.key: a for a in upstream_operations()}
        self.bodies = {s.key: s.body() for s in self.scenarios}
        self.canned, self.canned_port = start_canned_upstream(self.root)
        self.alone, self.alone_port = start_envoy_alone(self.root, self.canned_port)
        if any(v.otlp_sink for v in self.variants):
            self.sink = OtlpSink()
        for variant in self.variants:
            stack = make_stack(
                self.root,
                self.dsn,
                variant,
                self.args.workers,
                f"http://127.0.0.1:{self.canned_port}",
                self.sink.url if self.sink is not None else None,
            )
            self.stacks[variant.key] = stack
            progress(f"starting the {variant.label} stack ({stack.workers} worker(s))")
            stack.start()
            self.tokens[variant.key] = stack.mint(email=self.email, groups=DEV_GROUPS)
            # The same caller, in the group whose Messages requests go to Vertex.
            groups = (*DEV_GROUPS, MESSAGES_VERTEX_GROUP)
            self.tokens[f"{variant.key}/{MESSAGES_VERTEX_GROUP}"] = stack.mint(
                email=self.email, groups=groups
            )
        self.loadgen = LoadGenerator(self.args.loadgen_procs)
        groups: dict[str, Callable[[], list[int]]] = {
            "loadgen": lambda: self.loadgen.pids if self.loadgen else [],
            "envoy_alone": lambda: [self.alone.popen.pid] if self.alone else [],
            "canned": lambda: [self.canned.popen.pid] if self.canned else [],
        }
        for key, stack in self.stacks.items():
            procs = stack.procs
            groups[f"{key}/envoy"] = lambda p=procs: [p["envoy"].popen.pid]
            groups[f"{key}/services"] = lambda p=procs: descendants(p["gateway"].popen.pid)
            groups[f"{key}/emulator"] = lambda p=procs: [p["emulator"].popen.pid]
        pg = None if os.environ.get("DATABASE_URL") else postgres_pid(self.root / "postgres")
        if pg is not None:
            groups["postgres"] = lambda: descendants(pg)
        self.meter = CpuMeter(groups)

    def stop(self) -> None:
        """Stop everything this run started, the load first."""
        if self.loadgen is not None:
            self.loadgen.close()
        if self.alone is not None:
            self.alone.stop()
        for stack in self.stacks.values():
            stack.stop()
        if self.canned is not None:
            self.canned.stop()
        if self.sink is not None:
            self.sink.close()

    # --- helpers ----------------------------------------------------------------------------------

    def port(self, arm: str) -> int:
        if arm == ENVOY:
            return self.alone_port
        ports = self.stacks[arm].ports
        assert ports is not None
        return ports.envoy

    def token(self, arm: str, scenario: Scenario) -> str:
        # Envoy alone gets a token too, so both arms carry requests of the same size.
        key = self.variants[0].key if arm == ENVOY else arm
        return self.tokens[f"{key}/{scenario.group}" if scenario.group else key]

    def expected_bytes(self, scenario: Scenario, arm: str) -> int | None:
        """The body length every answer must have, when the bytes pass through unchanged."""
        if arm == ENVOY or scenario.passthrough:
            return len(self.answers[scenario.upstream_op].body)
        return None

    def new_job(self, phase: str, scenario: str, arm: str, tag: str) -> Job:
        job = Job(phase, scenario, arm, session_id(f"{self.run_id}/{tag}"))
        if arm != ENVOY:
            self.jobs.append(job)
        return job

    def request(self, scenario: Scenario, arm: str, job: Job) -> bytes:
        return request_bytes(
            scenario,
            host=f"127.0.0.1:{self.port(arm)}",
            token=self.token(arm, scenario),
            session=job.session,
            body=self.bodies[scenario.key],
            baseline=arm == ENVOY,
        )

    # --- phases -----------------------------------------------------------------------------------

    def sanity(self) -> None:
        """One request per scenario and arm; each answer must be 200 with the canned body's bytes."""
        for scenario in self.scenarios:
            answer = self.answers[scenario.upstream_op]
            for arm in self.arms:
                job = self.new_job("sanity", scenario.key, arm, f"sanity/{scenario.key}/{arm}")
                headers = request_headers(scenario, token=self.token(arm, scenario), session=job.session)
                conn = http.client.HTTPConnection("127.0.0.1", self.port(arm), timeout=60)
                try:
                    path = request_path(scenario, baseline=arm == ENVOY)
                    conn.request("POST", path, body=self.bodies[scenario.key], headers=headers)
                    job.sent += 1
                    resp = conn.getresponse()
                    body = resp.read()
                finally:
                    conn.close()
                problems = []
                if resp.status != 200:
                    problems.append(f"status {resp.status}: {body[:300]!r}")
                elif self.expected_bytes(scenario, arm) is not None and body != answer.body:
                    problems.append(f"body of {len(body)} bytes differs from the canned {len(answer.body)}")
                expected_type = answer.content_type if arm == ENVOY or scenario.passthrough else None
                if expected_type and resp.getheader("content-type") != expected_type:
                    problems.append(f"content-type {resp.getheader('content-type')!r}, not {expected_type!r}")
                if problems:
                    tail = "" if arm == ENVOY else "\n" + self.stacks[arm].procs["gateway"].tail(20)
                    raise RuntimeError(f"{scenario.label} through {arm}: {'; '.join(problems)}{tail}")

    def job(self, scenario: Scenario, arm: str, rnd: int) -> None:
        """One measured run of ``scenario`` on ``arm``."""
        assert self.meter is not None and self.loadgen is not None
        job = self.new_job("rounds", scenario.key, arm, f"rounds/{scenario.key}/{arm}/{rnd}")
        before = self.meter.read()
        result = self.loadgen.run(
            self.port(arm),
            [self.request(scenario, arm, job)],
            expect_bytes=[self.expected_bytes(scenario, arm)],
            concurrency=self.args.concurrency,
            warmup=self.args.warmup,
            seconds=self.args.seconds,
        )
        cpu = CpuMeter.delta(before, self.meter.read())
        job.sent += result["sent"]
        runs = self.runs.setdefault((scenario.key, arm), ArmRuns(arm))
        runs.rounds.append(result)
        runs.cpu.append(cpu)
        lat = sorted(result["latencies_ms"])
        loadgen_pct = 100 * result["cpu_s"] / max(1e-9, result["cpu_wall_s"])
        progress(
            f"  {scenario.key:<20} {arm:<12} {result['measured'] / result['window_s']:8.1f} req/s"
            f"  p50 {percentile(lat, 50):7.2f} ms  p99 {percentile(lat, 99):7.2f} ms"
            f"  errors {result['errors']}  loadgen {loadgen_pct:.0f}% CPU"
        )

    def rounds(self) -> None:
        """Every scenario on every arm, back to back; the arm order flips each round."""
        for rnd in range(self.args.rounds):
            order = self.arms if rnd % 2 == 0 else self.arms[::-1]
            progress(f"round {rnd + 1}/{self.args.rounds} (order: {', '.join(order)})")
            for scenario in self.scenarios:
                for arm in order:
                    self.job(scenario, arm, rnd)

    def rss_phase(self, variant: Variant) -> None:
        """Many concurrent, slowly delivered streams through one variant while RSS is sampled."""
        assert self.loadgen is not None
        stack = self.stacks[variant.key]
        usage = {k: v for k, v in asdict(CANNED_USAGE).items()}
        stack.emulator(
            "POST", "/_emulator/state", {"deltas": STREAM_DELTAS, "delay": RSS_DELAY, "usage": usage}
        )
        roots = [stack.procs["gateway"].popen.pid, stack.procs["envoy"].popen.pid]
        idle = RssSampler(roots)
        idle.sample()
        token = stack.mint(email=self.email, groups=(SLOW_GROUP,))
        host = f"127.0.0.1:{self.port(variant.key)}"
        # Both kinds of stream under one session id: the ledger check counts them together.
        job = self.new_job("memory", "memory", variant.key, f"memory/{variant.key}")
        requests = [
            request_bytes(scenario, host=host, token=token, session=job.session, body=scenario.body())
            for scenario in select_scenarios("bedrock_stream,vertex_stream")
        ]
        sampler = RssSampler(roots)
        sampler.start()
        try:
            result = self.loadgen.run(
                self.port(variant.key),
                requests,
                concurrency=self.args.rss_streams,
                warmup=0,
                seconds=self.args.rss_seconds,
                timeout=180,
            )
        finally:
            sampler.stop()
        job.sent += result["sent"]
        lat = sorted(result["latencies_ms"])
        self.results.setdefault("rss", {})[variant.key] = {
            "streams_concurrent": self.args.rss_streams,
            "event_delay_s": RSS_DELAY,
            "events": STREAM_DELTAS + 5,
            "streams_completed": result["ok"],
            "errors": result["errors"],
            "error_samples": result["error_samples"],
            "stream_p50_ms": percentile(lat, 50),
            "stream_p99_ms": percentile(lat, 99),
            "idle_rss_mb": idle.peak_kb / 1024,
            "peak_rss_mb": sampler.peak_kb / 1024,
            "samples": sampler.samples,
            "idle_rss_anon_mb": idle.peak_anon_kb / 1024,
            "peak_rss_anon_mb": sampler.peak_anon_kb / 1024,
            "peak_processes": {
                f"{pid} {process_name(pid)}": [rss / 1024, anon / 1024]
                for pid, (rss, anon) in sampler.peak_detail.items()
            },
        }
        stack.emulator("POST", "/_emulator/state", {"delay": 0})

    def profile(self) -> None:
        """py-spy on the first variant's services while one scenario's load runs through it.

        Only samples holding the GIL are kept (``--gil``): they say where the Python CPU goes. The
        CPU of every services thread (GIL or not) is read from /proc over the same window.
        """
        assert self.loadgen is not None
        seconds = self.args.profile
        variant = self.variants[0]
        stack = self.stacks[variant.key]
        scenario = next((s for s in self.scenarios if not s.streaming), self.scenarios[0])
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.results["profile"] = {"error": "py-spy not installed (make install brings the dev extras)"}
            return
        out = stack.root / "profile.txt"
        services = stack.procs["gateway"].popen.pid
        names = thread_names(spy, descendants(services))
        argv = [spy, "record", "-p", str(services), "-d", str(seconds), "-r", "100"]
        argv += ["-f", "raw", "-o", str(out), "--nolineno", "--gil"]
        if stack.workers > 1:
            argv.append("--subprocesses")
        job = self.new_job("profile", scenario.key, variant.key, f"profile/{scenario.key}/{variant.key}")
        box: dict[str, Any] = {}

        def load() -> None:
            try:
                assert self.loadgen is not None
                box["result"] = self.loadgen.run(
                    self.port(variant.key),
                    [self.request(scenario, variant.key, job)],
                    expect_bytes=[self.expected_bytes(scenario, variant.key)],
                    concurrency=self.args.concurrency,
                    warmup=1.0,
                    seconds=seconds + 1.5,
                )
            except Exception as exc:
                box["error"] = exc

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1.0)  # the load is running before sampling starts
        before, wall0 = thread_cpu(descendants(services)), time.monotonic()
        with open(stack.root / "logs" / "py-spy.log", "wb") as log:
            spy_proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
            try:
                spy_proc.wait(seconds + 30)
            finally:
                if spy_proc.poll() is None:
                    spy_proc.terminate()
                    spy_proc.wait(5)
        after, wall1 = thread_cpu(descendants(services)), time.monotonic()
        loader.join()
        if "error" in box:
            raise box["error"]
        result = box["result"]
        job.sent += result["sent"]
        if spy_proc.returncode:
            log_text = (stack.root / "logs" / "py-spy.log").read_text(errors="replace")
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
            "seconds": seconds,
            "arm": variant.key,
            "scenario": scenario.label,
            "rps_while_profiled": result["measured"] / result["window_s"],
            "threads_pct_of_core": [(name, pct) for pct, name in threads if pct >= 0.5],
        }

    # --- results ----------------------------------------------------------------------------------

    def setup_lines(self) -> list[str]:
        """What ran, in words, for the report's head."""
        args = self.args
        answers = ", ".join(
            f"{a.key} {len(a.body) / 1024:.1f} KB {a.content_type}" for a in self.answers.values()
        )
        database_kind = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded"
        variants = "; ".join(
            f"{v.key} = the development stack: Envoy (2 worker threads) with ext_authz and the ext_proc, "
            f"{self.stacks[v.key].workers} services worker(s), ledger to PostgreSQL ({database_kind})"
            + (f", overlay {json.dumps(v.overlay)}" if v.overlay else "")
            + (f", every policy with {json.dumps(v.policy_overlay)}" if v.policy_overlay else "")
            for v in self.variants
        )
        return [
            "Upstream: the canned upstream, one Envoy (2 worker threads) answering with "
            f"direct_response: {answers}; streams hold {STREAM_DELTAS + 5} events "
            f"({STREAM_DELTAS} content_block_delta); every answer reports the same usage, which the "
            "ledger must then hold.",
            "Envoy alone: a listener and the router only (2 worker threads), every path to the canned "
            "upstream.",
            f"Gateway arms: {variants}; upstreams' base_url = the canned upstream. The stack's Python "
            "emulator only issues the (cached) Vertex token and serves the memory phase.",
            f"Load: {args.concurrency} concurrent keep-alive HTTP/1.1 connections, closed loop, from "
            f"{args.loadgen_procs} load generator process(es); {args.rounds} round(s) x {args.seconds:g} s "
            f"per scenario per arm (+{args.warmup:g} s warm-up); the arm order flips each round.",
            "Caveats, both flattering the gateway: the canned streams arrive as one Content-Length body at "
            "full speed (a cloud sends one chunk per event, over seconds), so the gateway's meter sees "
            "fewer, larger chunks; nothing upstream checks signatures or tokens. All processes share the "
            "machine's cores, so absolute figures are CPU-bound and noisy: compare arms within one run.",
        ]

    def collect(
        self, argv: Sequence[str], machine: dict[str, Any], started: float, started_at: str
    ) -> dict[str, Any]:
        """Every figure of the run, as plain data for the report and the JSON file."""
        summaries: dict[str, dict[str, Any]] = {}
        checks: list[Check] = []
        for scenario in self.scenarios:
            summaries[scenario.key] = {arm: self.runs[(scenario.key, arm)].summary() for arm in self.arms}
        for scenario in self.scenarios:
            by_arm = summaries[scenario.key]
            share = scenario.targets.min_share_of
            for variant in self.variants:
                reference = summaries.get(share[0]) if share else None
                found = scenario_checks(
                    scenario,
                    variant.key,
                    by_arm[variant.key],
                    by_arm[ENVOY],
                    reference=(reference[variant.key], reference[ENVOY]) if reference else None,
                )
                # Envoy alone's errors once per scenario, however many variants.
                checks += [c for c in found if c.arm != ENVOY or variant is self.variants[0]]
                if variant.versus in by_arm and variant.max_added_p50_ms is not None:
                    checks.append(
                        versus_check(
                            scenario.key, variant.key, variant.versus, by_arm, variant.max_added_p50_ms
                        )
                    )
        for key, rss in self.results.get("rss", {}).items():
            checks += memory_checks(key, rss)
        if "ledger" in self.results:
            checks += ledger_checks(self.results["ledger"])
        return {
            "command": "python -m tests.bench" + ("" if not argv else " " + shlex.join(argv)),
            "started_at": started_at,
            "duration_s": time.monotonic() - started,
            "machine": machine,
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "setup": {
                "loadgen_procs": self.args.loadgen_procs,
                "lines": self.setup_lines(),
            },
            "scenarios": [
                {
                    "key": s.key,
                    "label": s.label,
                    "client_format": s.client_format,
                    "path": s.path,
                    "streaming": s.streaming,
                    "body_bytes": len(self.bodies[s.key]),
                    "upstream_op": s.upstream_op,
                    "targets": asdict(s.targets),
                }
                for s in self.scenarios
            ],
            "arms": self.arms,
            "arm_labels": {ENVOY: "Envoy alone", **{v.key: v.label for v in self.variants}},
            "summaries": summaries,
            "rounds": {
                f"{key}/{arm}": [
                    {k: v for k, v in r.items() if k != "latencies_ms"} | {"cpu_s": cpu}
                    for r, cpu in zip(runs.rounds, runs.cpu, strict=True)
                ]
                for (key, arm), runs in self.runs.items()
            },
            "checks": [c.as_dict() for c in checks],
            **{k: v for k, v in self.results.items()},
        }


def machine_description() -> dict[str, Any]:
    """Cores, CPU model, load average now, Python and Envoy versions."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    envoy = "Envoy (version unknown)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        version = text.split("version:")[-1].strip().split("/")
        envoy = f"Envoy {version[1]}" if len(version) > 1 else envoy
    return {
        "cpus": os.cpu_count() or 1,
        "cpu_model": model,
        "load_average_before": list(os.getloadavg()),
        "python": platform.python_version(),
        "envoy": envoy,
    }


# --- entry point ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--only",
        metavar="KEYS",
        help="comma-separated scenario keys or globs, e.g. bedrock_invoke,vertex_stream or 'bedrock_*' "
        "(default: all; with --smoke: " + ",".join(SMOKE_SCENARIOS) + ")",
    )
    parser.add_argument(
        "--variants", default="gateway", help="comma-separated gateway variants (tests/bench_arms.py)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections per arm")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measured seconds per scenario, arm and round"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="unmeasured seconds before each measured run"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="services worker processes (variants may fix their own)"
    )
    parser.add_argument(
        "--loadgen-procs", type=int, default=1, help="load generator processes sharing the connections"
    )
    parser.add_argument("--rss-streams", type=int, default=200, help="concurrent streams in the memory phase")
    parser.add_argument(
        "--rss-seconds", type=float, default=4.0, help="seconds of new streams in the memory phase"
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the memory phase")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile the services with py-spy for N seconds under load",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (logs, configs)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check that everything runs: one round of 1.5 s per arm, the smoke scenarios, "
        "2 s of memory phase",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.seconds, args.warmup = 1, 1.5, 0.3
        args.rss_seconds = min(args.rss_seconds, 2.0)
    try:
        args.scenario_list = select_scenarios(args.only, SMOKE_SCENARIOS if args.smoke else None)
        args.variant_list = select_variants(args.variants)
    except ValueError as exc:
        parser.error(str(exc))
    return args


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
    """Run the benchmark; 0 when it ran (targets met or not), 1 when it could not run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    machine = machine_description()  # the load average before anything starts
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    root = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    progress(f"state directory {root}")
    output = ""
    try:
        with _sigterm_as_interrupt(), database(root, os.environ) as dsn:
            bench = Bench(args, args.scenario_list, args.variant_list, root, dsn)
            try:
                progress("starting the canned upstream, Envoy alone and the gateway stack(s)")
                bench.start()
                bench.sanity()
                progress(
                    f"ready after {time.monotonic() - started:.1f} s; every arm answered the canned bytes"
                )
                bench.rounds()
                if not args.no_rss:
                    for variant in bench.variants:
                        progress(
                            f"memory: {args.rss_streams} concurrent slow streams through {variant.label}"
                        )
                        bench.rss_phase(variant)
                if args.profile > 0:
                    progress(f"profiling the services for {args.profile} s")
                    bench.profile()
                progress("reading the ledger")
                bench.results["ledger"] = check_ledger(dsn, bench.email, bench.jobs)
                results = bench.collect(argv, machine, started, started_at)
                output = render(results)
                print(output, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
                    progress(f"wrote {args.json}")
            finally:
                _ignore_interrupts()
                progress("stopping every process this run started")
                bench.stop()
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
