"""The benchmark's ledger check: one usage row per gateway request, each with the canned counts.

Every job sends its requests under an ``X-Claude-Code-Session-Id`` of its own (``bench_arms.
session_id``), so the rows of each arm, round and phase are told apart by ``cc_session_id``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from tests.bench_upstream import CANNED_USAGE


@dataclass
class Job:
    """Requests sent through one gateway arm under one session id: the ledger must match them."""

    phase: str  # "sanity", "rounds", "memory", "profile"
    scenario: str
    arm: str
    session: str
    sent: int = 0


# A row is exact when it says the request succeeded and holds every count the canned upstream sent.
_EXACT = (
    "status = 200 AND outcome = 'complete' AND NOT output_tokens_estimated"
    f" AND input_tokens = {CANNED_USAGE.input_tokens} AND output_tokens = {CANNED_USAGE.output_tokens}"
    f" AND cache_write_tokens = {CANNED_USAGE.cache_creation_input_tokens}"
    f" AND cache_write_5m_tokens = {CANNED_USAGE.cache_creation_5m_input_tokens}"
    f" AND cache_write_1h_tokens = {CANNED_USAGE.cache_creation_1h_input_tokens}"
    f" AND cache_read_tokens = {CANNED_USAGE.cache_read_input_tokens}"
)
_COUNT_ROWS = (
    f"SELECT cc_session_id, count(*) AS rows, count(*) FILTER (WHERE {_EXACT}) AS exact"
    " FROM usage_events WHERE user_email = $1 GROUP BY cc_session_id"
)
_FIRST_INEXACT = (
    "SELECT status, outcome, reason, input_tokens, output_tokens, output_tokens_estimated,"
    " cache_write_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens"
    f" FROM usage_events WHERE user_email = $1 AND cc_session_id = $2 AND NOT ({_EXACT}) LIMIT 1"
)


async def _read(dsn: str, email: str) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """(rows, exact rows) per session id, and the first inexact row of each session that has one."""
    conn = await asyncpg.connect(dsn)
    try:
        counts = {r["cc_session_id"]: (r["rows"], r["exact"]) for r in await conn.fetch(_COUNT_ROWS, email)}
        samples = {}
        for session, (rows, exact) in counts.items():
            if rows != exact:
                row = await conn.fetchrow(_FIRST_INEXACT, email, session)
                samples[session] = ", ".join(f"{k}={v}" for k, v in dict(row or {}).items())
        return counts, samples
    finally:
        await conn.close()


def check_ledger(dsn: str, email: str, jobs: Sequence[Job], *, patience: float = 5.0) -> dict[str, Any]:
    """Rows per arm and phase once the ledger has caught up, or stopped moving for ``patience`` s.

    The sanity request of an arm counts with its rounds; the profile phase stands apart.
    """
    if len({j.session for j in jobs}) != len(jobs):
        raise ValueError("every job needs a session id of its own: rows are told apart by it")
    sent = sum(j.sent for j in jobs)
    started = time.monotonic()
    last_total, last_change = -1, started
    while True:
        counts, samples = asyncio.run(_read(dsn, email))
        total = sum(rows for rows, _ in counts.values())
        if total >= sent or time.monotonic() - started > 60:
            break
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > patience:
            break
        time.sleep(0.25)
    waited = time.monotonic() - started
    known = {j.session for j in jobs}
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for job in jobs:
        name = f"{job.phase}: {job.scenario}" if job.phase == "profile" else job.scenario
        entry = entries.setdefault(
            (name, job.arm), {"scenario": name, "arm": job.arm, "sent": 0, "rows": 0, "exact": 0}
        )
        rows, exact = counts.get(job.session, (0, 0))
        entry["sent"] += job.sent
        entry["rows"] += rows
        entry["exact"] += exact
        if job.session in samples and "sample_mismatch" not in entry:
            entry["sample_mismatch"] = samples[job.session]
    return {
        "expected": ", ".join(f"{k}={v}" for k, v in asdict(CANNED_USAGE).items()),
        "arms": list(entries.values()),
        "sent": sent,
        "rows": sum(rows for session, (rows, _) in counts.items() if session in known),
        "stray_rows": sum(rows for session, (rows, _) in counts.items() if session not in known),
        "waited_s": waited,
    }
