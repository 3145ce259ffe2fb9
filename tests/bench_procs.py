"""The benchmark's process plumbing: the load generator processes, and /proc readings of CPU and memory.

CPU is read from ``/proc/<pid>/stat`` (utime + stime of every process of a tree, threads
included, plus the children each has reaped) before and after each job, so each component's cost
per request can be read apart.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
_REPO = Path(__file__).resolve().parents[1]


class LoadGenerator:
    """``tests/bench_load.py`` in ``procs`` processes of their own, fed one job at a time.

    A job's connections are split among the processes, which run it at the same time; their
    results are merged into one.
    """

    def __init__(self, procs: int = 1) -> None:
        self.popens = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.bench_load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=_REPO,
                start_new_session=True,  # Ctrl-C reaches only the driver, which stops these in order
            )
            for _ in range(max(1, procs))
        ]

    @property
    def pids(self) -> list[int]:
        """The generator processes."""
        return [p.pid for p in self.popens]

    def run(
        self,
        port: int,
        requests: Sequence[bytes],
        *,
        concurrency: int,
        warmup: float,
        seconds: float,
        expect_bytes: Sequence[int | None] = (),
        timeout: float = 120.0,
        per_worker: int = 0,
    ) -> dict[str, Any]:
        """Run one job on every process (connections split among them) and merge the results."""
        encoded = [base64.b64encode(r).decode() for r in requests]
        active = self.popens[: max(1, min(len(self.popens), concurrency))]
        offset = 0
        for index, popen in enumerate(active):
            share = concurrency // len(active) + (1 if index < concurrency % len(active) else 0)
            # This process's worker i is the job's worker (offset + i), so the job as a whole still
            # cycles through ``requests`` in order.
            order = [(offset + i) % len(requests) for i in range(len(requests))]
            offset += share
            job = {
                "host": "127.0.0.1",
                "port": port,
                "requests": [encoded[i] for i in order],
                "expect_bytes": [expect_bytes[i] for i in order] if expect_bytes else None,
                "concurrency": share,
                "warmup": warmup,
                "seconds": seconds,
                "timeout": timeout,
                "per_worker": per_worker,
            }
            assert popen.stdin is not None
            popen.stdin.write(json.dumps(job) + "\n")
            popen.stdin.flush()
        results = []
        for popen in active:
            assert popen.stdout is not None
            line = popen.stdout.readline()
            if not line:
                raise RuntimeError("a load generator process exited")
            result: dict[str, Any] = json.loads(line)
            if "fatal" in result:
                raise RuntimeError(f"load generator failed: {result['fatal']}")
            results.append(result)
        return merge_results(results)

    def close(self) -> None:
        """Close stdin (the generators exit) and make sure they are gone."""
        for popen in self.popens:
            with contextlib.suppress(OSError):
                if popen.stdin is not None:
                    popen.stdin.close()
        for popen in self.popens:
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from the results of processes that ran the same job side by side."""
    if len(results) == 1:
        return dict(results[0])
    statuses: dict[str, int] = {}
    for r in results:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    summed = ("measured", "sent", "ok", "errors", "body_bytes", "reconnects", "cpu_s")
    return {
        "latencies_ms": [x for r in results for x in r["latencies_ms"]],
        **{name: sum(r[name] for r in results) for name in summed},
        "window_s": results[0]["window_s"],
        "drain_s": max(r["drain_s"] for r in results),
        "statuses": statuses,
        "error_samples": [e for r in results for e in r["error_samples"]][:5],
        "cpu_wall_s": max(r["cpu_wall_s"] for r in results),
    }


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
    """User plus system CPU time of ``pids`` (their threads included) and of their children that
    exited: a PostgreSQL backend that ends mid-job moves its time to the postmaster's, rather than
    taking it out of the group's total."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
            # utime, stime, cutime, cstime (proc(5), fields 14 to 17)
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def rss_kb(pid: int) -> tuple[int, int]:
    """VmRSS and its private part RssAnon of one process in KiB, (0, 0) when it is gone.

    The rest of VmRSS is mostly file pages shared with other processes (Envoy's 50-odd MB binary,
    Python's shared libraries): counted in VmRSS, not in RssAnon.
    """
    rss = anon = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
    return rss, anon


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
    """Sums VmRSS over process trees every ``interval`` seconds and keeps the peak."""

    def __init__(self, roots: Sequence[int], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.roots = tuple(roots)
        self.interval = interval
        self.peak_kb = 0
        self.peak_anon_kb = 0
        self.peak_detail: dict[int, tuple[int, int]] = {}  # pid -> (VmRSS, RssAnon) at the peak
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> int:
        """One reading; returns the VmRSS total in KiB."""
        detail = {pid: rss_kb(pid) for root in self.roots for pid in descendants(root)}
        total = sum(rss for rss, _ in detail.values())
        self.samples += 1
        self.peak_anon_kb = max(self.peak_anon_kb, sum(anon for _, anon in detail.values()))
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
