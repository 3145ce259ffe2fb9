"""The local usage spool and the UsageRow JSON it stores: pure file I/O, no sockets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

import authz.store.spool as spool_module
from authz.errors import StoreError
from authz.store.spool import Spool
from authz.store.usagerow import UsageRow


def make_row(i: int = 0, **changes: object) -> UsageRow:
    row = UsageRow(
        request_id=f"req-{i:06d}",
        started_at=datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC) + timedelta(seconds=i),
        user_sub="00u1abcd",
        user_email="ada@example.com",
        groups=("eng", "platform-admins"),
        session_id="sess-1",
        cc_session_id="8c1f0d3e-cc",
        agent_id="agent-2",
        parent_agent_id="agent-1",
        user_agent="claude-cli/2.1.0 (external, cli)",
        ingress_format="bedrock",
        operation="stream",
        upstream="bedrock-us",
        policy=None,
        requested_model="us.anthropic.claude-opus-5-5",
        upstream_model="us.anthropic.claude-opus-5-5-20260101-v1:0",
        status=200,
        outcome="complete",
        reason=None,
        input_tokens=1200,
        input_tokens_estimated=False,
        output_tokens=345,
        output_tokens_estimated=False,
        cache_write_tokens=3000,
        cache_write_5m_tokens=1000,
        cache_write_1h_tokens=2000,
        cache_read_tokens=45000,
        cost_usd=Decimal("0.04567891"),
        latency_ms=1234.5,
        ttfb_ms=321.125,
    )
    return replace(row, **changes)  # type: ignore[arg-type]


def dead_pid() -> int:
    """A pid that belonged to a process which has exited."""
    code = "import os; print(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout)


# --- UsageRow JSON -------------------------------------------------------------------------------


def test_row_json_round_trips_exactly() -> None:
    """A fully populated row survives to_json/from_json unchanged, including Decimal and offsets."""
    row = make_row(7)
    assert UsageRow.from_json(row.to_json()) == row
    back = UsageRow.from_json(row.to_json())
    assert str(back.cost_usd) == "0.04567891"
    assert back.started_at.tzinfo is not None


def test_row_json_round_trips_nulls_unicode_and_odd_values() -> None:
    """Nulls, empty groups, non-ASCII text, a lone surrogate and tiny decimals all come back equal."""
    row = make_row(
        1,
        user_sub=None,
        user_email="zoë@exämple.com",
        groups=(),
        session_id=None,
        cc_session_id=None,
        agent_id=None,
        parent_agent_id=None,
        user_agent="bad \udcff header",
        upstream=None,
        policy=None,
        requested_model=None,
        upstream_model=None,
        reason="denied: model \u201copus\u201d not allowed",
        output_tokens_estimated=True,
        cost_usd=Decimal("1E-8"),
        latency_ms=None,
        ttfb_ms=None,
        started_at=datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    text = row.to_json()
    assert "\n" not in text
    text.encode("ascii")  # the spool line is pure ASCII
    back = UsageRow.from_json(text)
    assert back == row
    assert back.cost_usd.as_tuple() == row.cost_usd.as_tuple()
    assert back.started_at.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("status"),
        lambda d: d.update(extra=1),
        lambda d: d.update(status="200"),
        lambda d: d.update(input_tokens=True),
        lambda d: d.update(output_tokens_estimated=1),
        lambda d: d.update(cost_usd=0.1),
        lambda d: d.update(cost_usd="lots"),
        lambda d: d.update(started_at="2026-01-02T03:04:05"),
        lambda d: d.update(started_at="yesterday"),
        lambda d: d.update(groups="eng"),
        lambda d: d.update(latency_ms="fast"),
        lambda d: d.update(attempts="2"),
        lambda d: d.update(attempts=True),
    ],
)
def test_row_from_json_rejects_malformed_rows(mutate) -> None:
    """Missing, extra or mistyped fields (and naive timestamps) raise ValueError, never a bad row."""
    data = json.loads(make_row().to_json())
    mutate(data)
    with pytest.raises(ValueError):
        UsageRow.from_json(json.dumps(data))


def test_rows_spooled_before_service_identity_existed_still_replay() -> None:
    """A spooled row written before the service_identity field existed reads back with it unset,
    and a row that has it round-trips."""
    data = json.loads(make_row().to_json())
    del data["service_identity"]
    assert UsageRow.from_json(json.dumps(data)) == make_row()
    row = make_row(service_identity="ci-nightly")
    assert UsageRow.from_json(row.to_json()).service_identity == "ci-nightly"


def test_rows_spooled_before_attempts_were_counted_replay_with_them_unknown() -> None:
    """A spooled row written before the attempts field existed reads back with it unknown (None),
    and a row that has it round-trips."""
    data = json.loads(make_row(attempts=2).to_json())
    del data["attempts"]
    assert UsageRow.from_json(json.dumps(data)).attempts is None
    row = make_row(attempts=3)
    assert UsageRow.from_json(row.to_json()) == row


def test_row_requires_an_aware_timestamp() -> None:
    """A naive started_at is refused when the row is built."""
    with pytest.raises(ValueError, match="timezone-aware"):
        make_row(started_at=datetime(2026, 1, 1, 0, 0))


# --- Spool -----------------------------------------------------------------------------------------


def test_append_then_seal_makes_one_readable_segment(tmp_path: Path) -> None:
    """Rows appended in several batches land in one segment, listed only once sealed."""
    spool = Spool(tmp_path / "spool")
    rows = [make_row(i) for i in range(5)]
    spool.append(rows[:2])
    spool.append(rows[2:])
    assert spool.segments() == []
    spool.seal()
    [segment] = spool.segments()
    assert spool.read(segment) == rows
    assert not list((tmp_path / "spool").glob("*.open"))


def test_segments_are_private_and_listed_oldest_first(tmp_path: Path) -> None:
    """Each seal starts a new segment; segments come back in the order they were written."""
    spool = Spool(tmp_path / "spool")
    for i in range(3):
        spool.append([make_row(i)])
        spool.seal()
    segments = spool.segments()
    assert [spool.read(s)[0].request_id for s in segments] == ["req-000000", "req-000001", "req-000002"]
    assert all(s.stat().st_mode & 0o777 == 0o600 for s in segments)
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700


def test_remove_is_idempotent_and_missing_segments_read_empty(tmp_path: Path) -> None:
    """Removing twice is fine, and a segment another worker already replayed reads as no rows."""
    spool = Spool(tmp_path)
    spool.append([make_row()])
    spool.seal()
    [segment] = spool.segments()
    spool.remove(segment)
    spool.remove(segment)
    assert spool.segments() == []
    assert spool.read(segment) == []


def test_torn_final_line_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A half-written last line from a crash is dropped with a warning; whole lines are kept."""
    spool = Spool(tmp_path)
    spool.append([make_row(1), make_row(2)])
    spool.seal()
    [segment] = spool.segments()
    with segment.open("ab") as f:
        f.write(make_row(3).to_json().encode()[:40])
    with caplog.at_level(logging.WARNING, logger="authz.store.spool"):
        rows = spool.read(segment)
    assert [r.request_id for r in rows] == ["req-000001", "req-000002"]
    assert "torn final line" in caplog.text


def test_garbage_line_in_the_middle_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unreadable complete line is skipped with a warning rather than failing the whole segment."""
    segment = tmp_path / f"seg-{0:020d}-1-ab-000001.jsonl"
    segment.write_text(make_row(1).to_json() + "\n{not json\n" + make_row(2).to_json() + "\n")
    with caplog.at_level(logging.WARNING, logger="authz.store.spool"):
        rows = Spool(tmp_path).read(segment)
    assert [r.request_id for r in rows] == ["req-000001", "req-000002"]
    assert "line 2" in caplog.text


def test_segment_is_sealed_when_it_reaches_the_size_cap(tmp_path: Path) -> None:
    """Appends past max_segment_bytes seal the segment so replay never reads a huge file."""
    spool = Spool(tmp_path, max_segment_bytes=2000)
    for i in range(6):
        spool.append([make_row(i)])
    sealed = spool.segments()
    assert len(sealed) >= 2
    spool.seal()
    rows = [r for s in spool.segments() for r in spool.read(s)]
    assert [r.request_id for r in rows] == [f"req-{i:06d}" for i in range(6)]


def test_segment_left_open_by_a_dead_process_is_sealed_and_replayable(tmp_path: Path) -> None:
    """An open segment whose writer died (a crash) is sealed by the next listing, torn tail and all."""
    pid = dead_pid()
    orphan = tmp_path / f"seg-{1:020d}-{pid}-deadbeef-000001.jsonl.open"
    orphan.write_text(make_row(1).to_json() + "\n" + make_row(2).to_json()[:30])
    spool = Spool(tmp_path)
    [segment] = spool.segments()
    assert segment.name == orphan.name.removesuffix(".open")
    assert [r.request_id for r in spool.read(segment)] == ["req-000001"]


def test_segment_of_a_predecessor_with_our_pid_is_recovered(tmp_path: Path) -> None:
    """A container restart reuses pids: an open file with our pid but another token is an orphan."""
    orphan = tmp_path / f"seg-{1:020d}-{os.getpid()}-0badf00d-000001.jsonl.open"
    orphan.write_text(make_row(1).to_json() + "\n")
    assert len(Spool(tmp_path).segments()) == 1


def test_open_segment_of_a_live_sibling_is_left_alone(tmp_path: Path) -> None:
    """Another live worker's open segment is still being written, so it is not listed or renamed."""
    sibling = tmp_path / f"seg-{1:020d}-{os.getppid()}-0badf00d-000001.jsonl.open"
    sibling.write_text(make_row(1).to_json() + "\n")
    assert Spool(tmp_path).segments() == []
    assert sibling.exists()


def test_second_spool_in_the_same_process_does_not_steal_the_open_segment(tmp_path: Path) -> None:
    """Two Spool objects on one directory in one process leave each other's open file alone."""
    first = Spool(tmp_path)
    first.append([make_row(1)])
    second = Spool(tmp_path)
    assert second.segments() == []
    first.append([make_row(2)])
    first.seal()
    [segment] = second.segments()
    assert [r.request_id for r in second.read(segment)] == ["req-000001", "req-000002"]


def test_failed_write_is_cut_back_so_the_next_append_starts_on_a_clean_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails halfway (disk full) raises, leaves no fragment, and later appends still work."""
    spool = Spool(tmp_path)
    spool.append([make_row(1)])

    def half_then_fail(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_all", half_then_fail)
    with pytest.raises(OSError):
        spool.append([make_row(2)])
    monkeypatch.undo()
    spool.append([make_row(3)])
    spool.seal()
    rows = [r for s in spool.segments() for r in spool.read(s)]
    assert [r.request_id for r in rows] == ["req-000001", "req-000003"]


def test_rejected_rows_are_kept_but_never_listed_for_replay(tmp_path: Path) -> None:
    """reject() writes a separate file that segments() ignores and read() can still parse."""
    spool = Spool(tmp_path)
    path = spool.reject([make_row(9)])
    assert path.name.startswith("rejected-")
    assert spool.segments() == []
    assert spool.read(path) == [make_row(9)]


def test_an_empty_spool_directory_setting_is_refused() -> None:
    """An empty spool_dir is an error, not the process's working directory."""
    with pytest.raises(StoreError, match="spool_dir"):
        Spool("")


def test_empty_append_and_seal_without_data_create_no_files(tmp_path: Path) -> None:
    """Nothing to write means no segment files at all."""
    spool = Spool(tmp_path)
    spool.append([])
    spool.seal()
    spool.close()
    assert list(tmp_path.iterdir()) == []
