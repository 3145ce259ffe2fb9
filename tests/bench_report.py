"""The benchmark's figures: pooled statistics per arm, the targets met or missed, and the markdown report.

Pure functions over the results ``tests/bench.py`` gathers (plain dicts, also written as JSON), so
the report can be rebuilt from a saved run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.bench_arms import Scenario, Targets

RSS_TARGET_MB = 200.0
ENVOY = "envoy"  # the key of the Envoy-alone arm; gateway arms use their variant's key
# CPU components, as columns: (column, group key in a CPU reading, with "{v}" for the variant).
COMPONENTS_ALONE = (("envoy", "envoy_alone"), ("canned", "canned"), ("loadgen", "loadgen"))
COMPONENTS_GATEWAY = (
    ("envoy", "{v}/envoy"),
    ("services", "{v}/services"),
    ("postgres", "postgres"),
    ("canned", "canned"),
    ("loadgen", "loadgen"),
    ("emulator", "{v}/emulator"),
)
COLUMNS = ("envoy", "services", "postgres", "canned", "loadgen", "emulator")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (q in 0..100); NaN when empty."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


def components(arm: str) -> tuple[tuple[str, str], ...]:
    """The CPU components that serve one arm's requests, as (column, group key)."""
    if arm == ENVOY:
        return COMPONENTS_ALONE
    return tuple((column, key.format(v=arm)) for column, key in COMPONENTS_GATEWAY)


@dataclass
class ArmRuns:
    """Every round of one scenario on one arm: load generator results and CPU readings."""

    arm: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Pooled p50, p99 and requests per second over all rounds, errors and CPU per 1000 requests."""
        lat = sorted(x for r in self.rounds for x in r["latencies_ms"])
        window = sum(r["window_s"] for r in self.rounds)
        # CPU is read over the whole job (warm-up and drain included): divide by every request done.
        done = sum(r["ok"] + r["errors"] for r in self.rounds)
        cpu: dict[str, float] = {}
        for reading in self.cpu:
            for name, value in reading.items():
                cpu[name] = cpu.get(name, 0.0) + value
        per_1000 = {
            column: 1000 * cpu.get(key, 0.0) / done if done else math.nan
            for column, key in components(self.arm)
        }
        ours = sum(v for k, v in cpu.items() if not k.startswith("_"))
        loadgen_wall = sum(r["cpu_wall_s"] for r in self.rounds)
        return {
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "rps": len(lat) / window if window else 0.0,
            "measured": len(lat),
            "sent": sum(r["sent"] for r in self.rounds),
            "errors": sum(r["errors"] for r in self.rounds),
            "error_samples": sorted({e for r in self.rounds for e in r["error_samples"]})[:5],
            "response_kb": sum(r["body_bytes"] for r in self.rounds) / max(1, len(lat)) / 1024,
            "round_rps": [r["measured"] / r["window_s"] for r in self.rounds],
            "round_p50_ms": [percentile(sorted(r["latencies_ms"]), 50) for r in self.rounds],
            "cpu_s_per_1000": per_1000,
            "cpu_s_per_1000_total": sum(per_1000.values()),
            "loadgen_pct_of_core": 100 * sum(r["cpu_s"] for r in self.rounds) / max(1e-9, loadgen_wall),
            "machine_busy_pct": 100 * cpu.get("_busy", 0.0) / max(1e-9, cpu.get("_total", 0.0)),
            # Busy time outside this run's processes: other users of the machine, unattributed kernel work.
            "not_ours_pct": max(
                0.0, 100 * (cpu.get("_busy", 0.0) - ours) / max(1e-9, cpu.get("_total", 0.0))
            ),
        }


@dataclass(frozen=True)
class Check:
    """One target, met or missed."""

    scenario: str
    arm: str
    what: str
    value: str
    limit: str
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("scenario", "arm", "what", "value", "limit", "met")}


def scenario_checks(
    scenario: Scenario,
    arm: str,
    gateway: Mapping[str, Any],
    alone: Mapping[str, Any],
    reference: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> list[Check]:
    """The speed and error targets of one scenario on one gateway arm, against Envoy alone (and,
    for a target relative to another scenario, that scenario's ``(gateway, alone)`` figures)."""
    t: Targets = scenario.targets
    key = scenario.key
    ratio = gateway["rps"] / alone["rps"] if alone["rps"] else math.nan
    checks = [
        Check(
            key,
            arm,
            "vs Envoy alone",
            f"{100 * ratio:.1f}%",
            f">= {100 * t.min_rps_ratio:.0f}%",
            ratio >= t.min_rps_ratio,
        )
    ]
    if t.min_share_of is not None and reference is not None:
        other, fraction = t.min_share_of
        ref_gateway, ref_alone = reference
        ref_ratio = ref_gateway["rps"] / ref_alone["rps"] if ref_alone["rps"] else math.nan
        share = ratio / ref_ratio if ref_ratio else math.nan
        checks.append(
            Check(
                key, arm, f"vs {other}", f"{100 * share:.0f}%", f">= {100 * fraction:.0f}%", share >= fraction
            )
        )
    if t.max_added_p50_ms is not None:
        added = gateway["p50_ms"] - alone["p50_ms"]
        limit = f"<= {t.max_added_p50_ms:g} ms"
        checks.append(Check(key, arm, "added p50", f"{added:+.2f} ms", limit, added <= t.max_added_p50_ms))
    if t.max_p99_ms is not None:
        p99 = gateway["p99_ms"]
        checks.append(Check(key, arm, "p99", f"{p99:.1f} ms", f"<= {t.max_p99_ms:g} ms", p99 <= t.max_p99_ms))
    errors = f"{gateway['errors']} / {alone['errors']}"
    checks.append(Check(key, arm, "errors", errors, "0", gateway["errors"] == alone["errors"] == 0))
    return checks


def versus_check(
    scenario: str, arm: str, versus: str, by_arm: Mapping[str, Mapping[str, Any]], max_added_ms: float
) -> Check:
    """One variant's p50 against another's in the same run (spend caps and rate limits against none)."""
    added = by_arm[arm]["p50_ms"] - by_arm[versus]["p50_ms"]
    return Check(
        scenario,
        arm,
        f"added p50 vs {versus}",
        f"{added:+.2f} ms",
        f"<= {max_added_ms:g} ms",
        added <= max_added_ms,
    )


def ledger_checks(ledger: Mapping[str, Any]) -> list[Check]:
    """Per arm and phase: one row per gateway request, every row with the canned counts."""
    checks = []
    for e in ledger["arms"]:
        rows, sent, exact = e["rows"], e["sent"], e["exact"]
        value = f"{exact} exact of {rows} rows, {sent} sent"
        limit = "one exact row per request"
        checks.append(Check(e["scenario"], e["arm"], "ledger", value, limit, rows == exact == sent))
    if ledger["stray_rows"]:
        checks.append(Check("-", "-", "ledger", f"{ledger['stray_rows']} rows of no request", "0", False))
    return checks


def memory_checks(arm: str, rss: Mapping[str, Any], limit_mb: float = RSS_TARGET_MB) -> list[Check]:
    """Peak RSS of the services and the gateway's Envoy under many open streams, and no errors."""
    peak = rss["peak_rss_mb"]
    return [
        Check("memory", arm, "peak RSS", f"{peak:.1f} MB", f"< {limit_mb:.0f} MB", peak < limit_mb),
        Check("memory", arm, "errors", str(rss["errors"]), "0", rss["errors"] == 0),
    ]


# --- markdown ---------------------------------------------------------------------------------------


def _f(value: float, digits: int = 2) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None
) -> list[str]:
    """A markdown table, its columns padded so it also reads as plain text."""
    right = right or [False] * len(header)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return [line(header), rule, *(line(r) for r in rows)]


def render(results: Mapping[str, Any]) -> str:
    """The whole report, in markdown."""
    out: list[str] = []
    add = out.append
    machine = results["machine"]
    setup = results["setup"]
    add("# Claude gateway benchmark: Envoy alone vs the gateway, same canned upstream")
    add("")
    add(f"Command: `{results['command']}`")
    add("")
    load = machine["load_average_before"]
    add(
        f"Machine: {machine['cpus']} CPU(s), {machine['cpu_model']}; load average before start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min); Python {machine['python']}; "
        f"{machine['envoy']}; run started {results['started_at']}, took {results['duration_s']:.0f} s."
    )
    add("")
    for line in setup["lines"]:
        add(f"- {line}")
    add("")
    add("## Throughput, latency and CPU per arm")
    add("")
    add(
        "Figures pool every round. *vs alone*: the arm's req/s over Envoy alone's in the same run. "
        "CPU columns: CPU seconds per 1000 requests of each process group (whole job, warm-up included)."
    )
    add("")
    header = [
        "scenario",
        "arm",
        "p50 ms",
        "p99 ms",
        "req/s",
        "vs alone",
        "added p50",
        "errors",
        *COLUMNS,
        "total",
    ]
    rows: list[list[str]] = []
    summaries = results["summaries"]
    for scenario in results["scenarios"]:
        alone = summaries[scenario["key"]][ENVOY]
        for arm in results["arms"]:
            s = summaries[scenario["key"]][arm]
            is_alone = arm == ENVOY
            ratio = "" if is_alone else f"{100 * s['rps'] / alone['rps']:.1f}%" if alone["rps"] else "n/a"
            added = "" if is_alone else f"{s['p50_ms'] - alone['p50_ms']:+.2f}"
            cpu = s["cpu_s_per_1000"]
            rows.append(
                [
                    scenario["label"] if is_alone else "",
                    results["arm_labels"][arm],
                    _f(s["p50_ms"]),
                    _f(s["p99_ms"]),
                    _f(s["rps"], 0),
                    ratio,
                    added,
                    str(s["errors"]),
                    *(_f(cpu[c], 3) if c in cpu else "-" for c in COLUMNS),
                    _f(s["cpu_s_per_1000_total"], 3),
                ]
            )
    out.extend(table(header, rows, [False, False, *([True] * (len(header) - 2))]))
    add("")
    busiest = max(
        (
            (s["loadgen_pct_of_core"], key, arm)
            for key, by_arm in summaries.items()
            for arm, s in by_arm.items()
        ),
        default=(0.0, "", ""),
    )
    procs = setup["loadgen_procs"]
    per_process = busiest[0] / max(1, procs)
    add(
        f"Load generator: {procs} process(es), at most {busiest[0]:.0f}% of one core in all "
        f"({per_process:.0f}% per process) over a measured window ({busiest[1]}, "
        f"{results['arm_labels'].get(busiest[2], busiest[2])})"
        + (
            ": near saturation, it may be holding Envoy alone back (try --loadgen-procs)."
            if per_process > 85
            else ": below saturation."
        )
    )
    busy = [s["machine_busy_pct"] for by_arm in summaries.values() for s in by_arm.values()]
    others = [s["not_ours_pct"] for by_arm in summaries.values() for s in by_arm.values()]
    if busy:
        add(
            f"Machine busy during the jobs: {min(busy):.0f}-{max(busy):.0f}% of all cores; "
            f"of which outside this run's processes: {min(others):.0f}-{max(others):.0f}%."
        )
    add("")
    add("Per round (req/s), to show the noise:")
    add("")
    noise: list[list[str]] = []
    for scenario in results["scenarios"]:
        for arm in results["arms"]:
            s = summaries[scenario["key"]][arm]
            noise.append(
                [
                    scenario["key"] if arm == ENVOY else "",
                    results["arm_labels"][arm],
                    "  ".join(f"{r:.0f}" for r in s["round_rps"]),
                ]
            )
    out.extend(table(["scenario", "arm", "req/s per round"], noise))
    add("")
    _memory(results, add, out)
    _ledger(results, add, out)
    add("## Targets")
    add("")
    checks = results["checks"]
    columns = list(dict.fromkeys(c["what"] for c in checks))
    limits: dict[str, list[str]] = {}
    for c in checks:
        if c["limit"] not in limits.setdefault(c["what"], []):
            limits[c["what"]].append(c["limit"])
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for c in checks:
        # The limit goes in the cell only where a column has several (streams and not).
        limit = f" ({c['limit']})" if len(limits[c["what"]]) > 1 else ""
        verdict = "met" if c["met"] else "MISSED"
        cells.setdefault((c["scenario"], c["arm"]), {})[c["what"]] = f"{c['value']}{limit} {verdict}"
    labels = results["arm_labels"]
    out.extend(
        table(
            ["scenario", "arm", *columns],
            [
                [key, labels.get(arm, arm), *(row.get(w, "") for w in columns)]
                for (key, arm), row in cells.items()
            ],
        )
    )
    add("")
    single = [f"{what} {limits[what][0]}" for what in columns if len(limits[what]) == 1]
    add(
        "Limits: "
        + "; ".join(single)
        + ". Errors read gateway / Envoy alone; the ledger counts each arm's sanity request with it."
        + (
            f" The targets are set for 16 concurrent connections; this run used {concurrency}."
            if (concurrency := results["args"].get("concurrency", "16")) != "16"
            else ""
        )
    )
    met = sum(1 for c in checks if c["met"])
    add("")
    add(f"{met} of {len(checks)} targets met.")
    if "profile" in results:
        add("")
        _profile(results, add)
    add("")
    return "\n".join(out)


def _memory(results: Mapping[str, Any], add: Any, out: list[str]) -> None:
    rss = results.get("rss")
    if not rss:
        return
    add("## Memory")
    add("")
    for arm, r in rss.items():
        add(
            f"{results['arm_labels'].get(arm, arm)}: {r['streams_concurrent']} concurrent streams from "
            f"the Python emulator ({r['events']} events, {r['event_delay_s']:g} s apart); VmRSS of the "
            f"services and the gateway's Envoy summed every 50 ms ({r['samples']} samples): idle "
            f"{r['idle_rss_mb']:.1f} MB, peak {r['peak_rss_mb']:.1f} MB (target < {RSS_TARGET_MB:.0f} MB); "
            f"private (RssAnon) idle {r['idle_rss_anon_mb']:.1f} MB, peak {r['peak_rss_anon_mb']:.1f} MB. "
            f"{r['streams_completed']} streams completed, {r['errors']} errors, stream duration p50 "
            f"{_f(r['stream_p50_ms'], 0)} ms, p99 {_f(r['stream_p99_ms'], 0)} ms."
        )
        add("")
        out.extend(
            table(
                ["process at the peak", "VmRSS MB", "RssAnon MB"],
                [[name, f"{mb[0]:.1f}", f"{mb[1]:.1f}"] for name, mb in r["peak_processes"].items()],
                [False, True, True],
            )
        )
        add("")


def _ledger(results: Mapping[str, Any], add: Any, out: list[str]) -> None:
    ledger = results.get("ledger")
    if not ledger:
        return
    add("## Ledger")
    add("")
    add(
        f"Rows of this run's user, counted per arm by their X-Claude-Code-Session-Id; *exact*: status 200, "
        f"outcome complete, and every count equal to the canned upstream's ({ledger['expected']})."
    )
    add("")
    rows = [
        [
            e["scenario"],
            results["arm_labels"].get(e["arm"], e["arm"]),
            str(e["sent"]),
            str(e["rows"]),
            str(e["exact"]),
            e.get("sample_mismatch") or "",
        ]
        for e in ledger["arms"]
    ]
    out.extend(
        table(
            ["phase / scenario", "arm", "requests", "rows", "exact", "first row that is not exact"],
            rows,
            [False, False, True, True, True, False],
        )
    )
    add("")
    add(
        f"Total: {ledger['rows']} rows for {ledger['sent']} requests; {ledger['stray_rows']} rows of no "
        f"known request; waited {ledger['waited_s']:.1f} s for the ledger to catch up."
    )
    add("")


def _profile(results: Mapping[str, Any], add: Any) -> None:
    prof = results["profile"]
    add("## Profile")
    add("")
    if "error" in prof:
        add(f"Profile: {prof['error']}")
        return
    add(
        f"py-spy, {prof['seconds']:g} s on the services of {prof['arm']} during {prof['scenario']} "
        f"({prof['rps_while_profiled']:.0f} req/s), {prof['samples']} samples holding the GIL."
    )
    add("")
    add("CPU per services thread over the window (% of one core; py-spy's pauses included):")
    add("")
    for name, pct in prof["threads_pct_of_core"]:
        add(f"    {pct:5.1f}%  {name}")
    add("")
    add("Python samples holding the GIL, top by own time:")
    add("")
    for name, pct in prof["own"]:
        note = (
            "   <- C/Cython run by the event loop (grpc.aio cygrpc, protobuf)"
            if name.startswith("Handle._run ")
            else ""
        )
        add(f"    {pct:5.1f}%  {name}{note}")
    add("")
    add("... and by inclusive time:")
    add("")
    for name, pct in prof["inclusive"]:
        add(f"    {pct:5.1f}%  {name}")
