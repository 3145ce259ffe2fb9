"""The benchmark's load generator (``tests/bench.py``), run in a process of its own.

A closed loop: ``concurrency`` workers, each with one keep-alive HTTP/1.1 connection opened with
``asyncio.open_connection``, send precomputed request bytes back to back and read every response
to its last byte (Content-Length or chunked bodies) before sending the next. Nothing but the
status line and the framing headers is parsed, so the generator costs little next to what it
measures; it also reports its own CPU use so a saturated generator shows up in the results.

Protocol (``python -m tests.bench_load``): one JSON job per line on stdin, one JSON result per line
on stdout; the process exits when stdin closes. A job::

    {"host": "127.0.0.1", "port": 8080, "requests": ["<base64 request bytes>", ...],
     "expect_bytes": [67731, ...], "concurrency": 16, "warmup": 0.5, "seconds": 3.0,
     "timeout": 60.0, "per_worker": 0}

Worker *i* sends ``requests[i % len(requests)]``; a 200 answer whose body length differs from
``expect_bytes[i % len(requests)]`` (when given and not null) counts as an error. Requests
started during the warm-up are sent and read but not measured; requests started in the
``seconds`` after it are measured; workers start nothing new after that and finish what they have
in flight. ``per_worker`` (0: no limit) caps how many requests each worker sends.

The driver may run several of these processes and split the connections among them
(``tests/bench.py --loadgen-procs``), when one process cannot keep Envoy alone busy.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def http_request(method: str, path: str, host: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ProtocolError(Exception):
    """The server's response could not be framed."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
    """Read one whole response: (status, body bytes, whether the server will close the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x response: {head[:60]!r}")
    status = int(head[9:12])
    lower = head.lower()
    close = b"\r\nconnection: close" in lower
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        length = int(lower[at + 17 : end])
        if length:
            await reader.readexactly(length)
        return status, length, close
    at = lower.find(b"\r\ntransfer-encoding:")
    if at >= 0 and b"chunked" in lower[at : lower.index(b"\r\n", at + 2)]:
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                # Trailers, if any, end with an empty line (RFC 9112, section 7.1).
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return status, total, close
            await reader.readexactly(size + 2)
            total += size
    if status in (204, 304) or 100 <= status < 200:
        return status, 0, close
    # No framing: the body runs to the end of the connection.
    body = await reader.read()
    return status, len(body), True


@dataclass
class _Tally:
    t0: float
    t1: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    body_bytes: int = 0
    reconnects: int = 0
    per_worker: int = 0  # 0: no limit


async def _worker(host: str, port: int, request: bytes, expect: int | None, tally: _Tally) -> None:
    perf = time.perf_counter
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    count = 0
    try:
        while True:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            start = perf()
            if start >= tally.t1 or (tally.per_worker and count >= tally.per_worker):
                return
            count += 1
            tally.sent += 1
            try:
                writer.write(request)
                status, length, close = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError) as exc:
                tally.error_count += 1
                if len(tally.errors) < 5:
                    tally.errors.append(f"{type(exc).__name__}: {exc}")
                writer.close()
                writer = None
                tally.reconnects += 1
                continue
            end = perf()
            if start >= tally.t0:
                tally.statuses[status] += 1
                if status == 200:
                    tally.latencies.append(end - start)
                    tally.body_bytes += length
            if status == 200 and (expect is None or length == expect):
                tally.ok += 1
            else:
                tally.error_count += 1
                if len(tally.errors) < 5:
                    tally.errors.append(
                        f"HTTP {status}" if status != 200 else f"body of {length} bytes, expected {expect}"
                    )
            if close:
                writer.close()
                writer = None
                tally.reconnects += 1
    finally:
        if writer is not None:
            writer.close()


async def run_job(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    warmup: float,
    seconds: float,
    grace: float = 60.0,
    per_worker: int = 0,
    expect_bytes: Sequence[int | None] = (),
) -> dict[str, Any]:
    """Run one closed-loop load and return its measurements (latencies in milliseconds).

    ``per_worker`` caps the requests each worker sends (0: as many as fit in the time); workers
    still busy ``grace`` seconds after the measured window are cancelled and counted as errors.
    """
    begin = time.perf_counter()
    tally = _Tally(t0=begin + warmup, t1=begin + warmup + seconds, per_worker=per_worker)
    tasks = [
        asyncio.create_task(
            _worker(
                host,
                port,
                requests[i % len(requests)],
                expect_bytes[i % len(requests)] if expect_bytes else None,
                tally,
            )
        )
        for i in range(concurrency)
    ]
    await asyncio.sleep(max(0.0, tally.t0 - time.perf_counter()))
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    done, pending = await asyncio.wait(tasks, timeout=tally.t1 - wall0 + grace)
    wall1 = time.perf_counter()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    failures = [repr(t.exception()) for t in done if not t.cancelled() and t.exception() is not None]
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {
        "latencies_ms": [round(x * 1000, 4) for x in tally.latencies],
        "measured": len(tally.latencies),
        "window_s": seconds,
        "drain_s": max(0.0, wall1 - tally.t1),
        "statuses": {str(k): v for k, v in tally.statuses.items()},
        "sent": tally.sent,
        "ok": tally.ok,
        "errors": tally.error_count + len(failures) + len(pending),
        "error_samples": (tally.errors + failures)[:5] + (["timed out"] if pending else []),
        "body_bytes": tally.body_bytes,
        "reconnects": tally.reconnects,
        "cpu_s": cpu,
        "cpu_wall_s": wall1 - wall0,
    }


def _job(line: str) -> dict[str, Any]:
    spec = json.loads(line)
    requests = [base64.b64decode(r) for r in spec["requests"]]
    return asyncio.run(
        run_job(
            spec["host"],
            int(spec["port"]),
            requests,
            concurrency=int(spec["concurrency"]),
            warmup=float(spec["warmup"]),
            seconds=float(spec["seconds"]),
            grace=float(spec.get("timeout", 60.0)),
            per_worker=int(spec.get("per_worker", 0)),
            expect_bytes=spec.get("expect_bytes") or (),
        )
    )


def main() -> int:
    """Serve jobs from stdin until it closes."""
    # A collection pause would show up as latency of whatever was in flight; results are small.
    gc.disable()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = _job(line)
        except Exception as exc:  # reported to the parent, which decides
            result = {"fatal": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
