"""``authz usage --by`` and ``authz audit`` against real PostgreSQL: each CSV report equals an
aggregate computed here with SQL of its own, over rows chosen to cover the awkward cases (several
groups, no groups, a missing user, refusals, rows outside the period)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from authz.cli import main
from authz.store import sessions as store
from authz.store.migrate import migrate
from authz.store.queries import insert_rows
from tests.telemetry_rows import denied, row

pytestmark = pytest.mark.integration

DAY = datetime(2026, 11, 2, tzinfo=UTC)
ROWS = [
    row(request_id="r1", started_at=DAY + timedelta(hours=1)),
    row(
        request_id="r2",
        started_at=DAY + timedelta(hours=5),
        user_email="bob@example.com",
        user_sub="sub-bob",
        groups=("developers", "platform"),
        cc_session_id="cc-2",
        requested_model="claude-haiku-4-5@20251001",
        cost_usd=Decimal("1.25000001"),
    ),
    row(request_id="r3", started_at=DAY + timedelta(days=1, hours=2), groups=(), cc_session_id=None),
    row(request_id="r4", started_at=DAY + timedelta(days=1, hours=3), user_email=None, user_sub="svc-build"),
    denied(request_id="r5", started_at=DAY + timedelta(days=1, hours=4), user_email="bob@example.com"),
    denied(request_id="r6", started_at=DAY + timedelta(days=1, hours=5), reason="bad_model_id"),
    row(request_id="outside", started_at=DAY + timedelta(days=9), cost_usd=Decimal("1000")),
]
SINCE, UNTIL = "2026-11-02", "2026-11-04"

# The same sums written independently: the key expression per report, and the row source.
KEYS = {
    "user": "coalesce(user_email, user_sub, '')",
    "model": "coalesce(requested_model, '')",
    "day": "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "agent-session": "coalesce(cc_session_id, '')",
}
SUMS = (
    "count(*), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens),"
    " sum(cost_usd), sum(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END)"
)
PERIOD = "started_at >= '2026-11-02T00:00:00Z' AND started_at < '2026-11-04T00:00:00Z'"


def _sql(by: str) -> str:
    if by == "group":
        # Each group of a row, plus '' for rows without groups.
        return (
            f"SELECT grp, {SUMS} FROM (SELECT unnest(groups) AS grp, * FROM usage_events WHERE {PERIOD}"
            f" UNION ALL SELECT '' AS grp, * FROM usage_events WHERE {PERIOD} AND groups = '{{}}') x"
            " GROUP BY grp"
        )
    return f"SELECT {KEYS[by]}, {SUMS} FROM usage_events WHERE {PERIOD} GROUP BY 1"


async def _setup(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute("TRUNCATE usage_events")
        await conn.execute("DELETE FROM audit_events")
        await insert_rows(conn, ROWS)
        expected = {}
        for by in ("user", "group", "model", "day", "agent-session"):
            expected[by] = {r[0]: [str(v) for v in list(r)[1:]] for r in await conn.fetch(_sql(by))}
        for at, kind in ((DAY - timedelta(days=1), "callback"), (DAY + timedelta(hours=1), "admin_revoke")):
            await store.audit(conn, kind=kind, outcome="ok", email="ops@example.com", now=at, detail={"n": 1})
        return [expected]
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def expected(pg_dsn: str) -> dict[str, dict[str, list[str]]]:
    (result,) = asyncio.run(_setup(pg_dsn))
    return result  # type: ignore[no-any-return]


@pytest.fixture
def config(pg_dsn: str, tmp_path: Path) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({"store": {"url": pg_dsn, "spool_dir": str(tmp_path / "spool")}}))
    return str(path)


@pytest.mark.parametrize("by", ["user", "group", "model", "day", "agent-session"])
def test_usage_csv_equals_an_independent_sql_aggregate(
    by: str, expected: dict[str, dict[str, list[str]]], config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`authz usage --by X --format csv` has one line per key with the same sums SQL computes, and
    leaves out rows outside the period."""
    assert (
        main(["usage", "--config", config, "--by", by, "--since", SINCE, "--until", UNTIL, "--format", "csv"])
        == 0
    )
    reader = csv.reader(io.StringIO(capsys.readouterr().out))
    header = next(reader)
    assert header == [
        by.replace("-", "_"),
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_write_tokens",
        "cache_read_tokens",
        "cost_usd",
        "denials",
    ]
    got = {line[0]: line[1:] for line in reader}
    want = expected[by]
    assert set(got) == set(want)
    for key, values in want.items():
        assert [int(v) for v in got[key][:5]] == [int(v) for v in values[:5]], key
        assert Decimal(got[key][5]) == Decimal(values[5]), key
        assert int(got[key][6]) == int(values[6]), key
    assert "1000" not in "".join(line[5] for line in got.values())


def test_usage_json_and_table_carry_the_same_totals(
    expected: dict[str, dict[str, list[str]]], config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The JSON report has the same figures (cost as an exact decimal string); the table names each user."""
    main(
        ["usage", "--config", config, "--by", "user", "--since", SINCE, "--until", UNTIL, "--format", "json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert {r["user"]: Decimal(r["cost_usd"]) for r in report} == {
        k: Decimal(v[5]) for k, v in expected["user"].items()
    }
    main(["usage", "--config", config, "--by", "user", "--since", SINCE, "--until", UNTIL])
    table = capsys.readouterr().out
    assert "bob@example.com" in table and "svc-build" in table


def test_usage_options_that_need_by_are_refused(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--since without --by is an error, not a silently ignored option."""
    assert main(["usage", "--config", config, "--since", "7d"]) == 2
    assert "--by" in capsys.readouterr().err


def test_audit_lists_events_since_a_time(
    expected: object, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`authz audit --since` shows the admin action after the time and not the sign-in before it."""
    assert main(["audit", "--config", config, "--since", "2026-11-02", "--format", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["kind"], e["email"], e["detail"]) for e in events] == [
        ("admin_revoke", "ops@example.com", {"n": 1})
    ]
    assert main(["audit", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "callback" in out and "admin_revoke" in out
