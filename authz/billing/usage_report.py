"""``authz usage``: recent usage rows, or their sums by user, group, model, day or agent session,
for a human (table) or a script (CSV, JSON)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from authz.configtypes import GatewayConfig
from authz.errors import GatewayError
from authz.store.migrate import open_migrated_pool
from authz.store.queries import recent_usage
from authz.store.reports import UsageSummary, usage_summary

FORMATS = ("table", "csv", "json")
SUMMARY_COLUMNS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost_usd",
    "denials",
)
_RELATIVE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime) -> datetime:
    """A report boundary: ``2026-11-01`` (UTC midnight), an ISO 8601 time (UTC unless it says
    otherwise), or a span back from ``now`` (``30m``, ``24h``, ``7d``, ``2w``)."""
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise GatewayError(
            f"cannot read the time {text!r}: use 2026-11-01, 2026-11-01T09:30, or 24h / 7d back from now"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def render_summary(by: str, rows: Sequence[UsageSummary], fmt: str) -> str:
    """The report as text in ``fmt`` (``table``, ``csv`` or ``json``)."""
    key = by.replace("-", "_")
    if fmt == "json":
        return (
            json.dumps(
                [
                    {key: r.key, **{c: (str(v) if c == "cost_usd" else v) for c, v in _values(r).items()}}
                    for r in rows
                ],
                indent=2,
            )
            + "\n"
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([key, *SUMMARY_COLUMNS])
        for r in rows:
            writer.writerow([r.key, *(_values(r).values())])
        return out.getvalue()
    width = max([len(key), *(len(r.key) for r in rows)])
    lines = [
        f"{key:<{width}}  {'requests':>9} {'input':>12} {'output':>12} {'cache w':>12} {'cache r':>12}"
        f" {'cost USD':>14} {'denied':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r.key or '-':<{width}}  {r.requests:>9} {r.input_tokens:>12} {r.output_tokens:>12}"
            f" {r.cache_write_tokens:>12} {r.cache_read_tokens:>12} {r.cost_usd:>14.6f} {r.denials:>7}"
        )
    return "\n".join(lines) + "\n"


def _values(r: UsageSummary) -> dict[str, object]:
    return {c: getattr(r, c) for c in SUMMARY_COLUMNS}


async def print_summary(
    config: GatewayConfig, *, by: str, since: datetime | None, until: datetime | None, fmt: str
) -> int:
    """Print the sums of the usage rows in ``[since, until)`` grouped ``by``."""
    pool = await open_migrated_pool(config.store, "usage rows")
    try:
        rows = await usage_summary(pool, by, since=since, until=until)
    finally:
        await pool.close()
    print(render_summary(by, rows, fmt), end="")
    return 0


async def print_recent(config: GatewayConfig, *, limit: int, as_json: bool) -> int:
    """Print the ``limit`` most recent rows, newest first."""
    pool = await open_migrated_pool(config.store, "usage rows")
    try:
        rows = await recent_usage(pool, limit=limit)
    finally:
        await pool.close()
    if as_json:
        for row in rows:
            print(row.to_json())
        return 0
    header = (
        f"{'started (UTC)':19}  {'user':24} {'model':34} {'status':>6} {'outcome':15} "
        f"{'in':>7} {'out':>7} {'cache w':>7} {'cache r':>7} {'cost USD':>11}"
    )
    print(header)
    for r in rows:
        print(
            f"{r.started_at:%Y-%m-%d %H:%M:%S}  {(r.user_email or '-')[:24]:24} "
            f"{(r.requested_model or '-')[:34]:34} "
            f"{r.status:>6} {r.outcome[:15]:15} {r.input_tokens:>7} {r.output_tokens:>7} "
            f"{r.cache_write_tokens:>7} {r.cache_read_tokens:>7} {r.cost_usd:>11.6f}"
        )
    return 0
