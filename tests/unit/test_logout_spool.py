"""The journal of back-channel logouts waiting for PostgreSQL: pure file I/O, no sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from authz.configtypes import Store
from authz.errors import StoreError
from authz.store.logout_spool import LogoutSpool, SpooledLogout, logout_spool_dir, new_entry_id


def entry(jti: str = "jti-1", *, issuer: str = "https://idp.example", **changes: object) -> SpooledLogout:
    values: dict[str, object] = {
        "entry": new_entry_id(),
        "issuer": issuer,
        "jti": jti,
        "sub": "00u-ada",
        "sid": "idp-s1",
        "accepted_at": 1_800_000_000.25,
        "jti_expires_at": 1_800_000_300.0,
        "client_ip": "192.0.2.9",
        "user_agent": "idp/1",
    }
    values.update(changes)
    return SpooledLogout(**values)  # type: ignore[arg-type]


def test_an_entry_round_trips_and_a_second_one_for_the_jti_is_refused(tmp_path: Path) -> None:
    """add writes a private file read back exactly; the same issuer and jti again is refused
    (a replay), another issuer's identical jti is not."""
    spool = LogoutSpool(tmp_path / "logouts")
    first = entry()
    assert spool.add(first)
    assert not spool.add(entry())
    other = entry(issuer="https://other.example")
    assert spool.add(other)
    found = spool.entries()
    assert sorted(e.entry for _, e in found) == sorted([first.entry, other.entry])
    assert dict((e.entry, e) for _, e in found)[first.entry] == first
    path = spool.path_for(first.issuer, first.jti)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    spool.remove(path)
    spool.remove(path)
    assert [e for _, e in spool.entries()] == [other]
    assert spool.add(entry())


def test_entries_come_oldest_first_and_survive_a_new_instance(tmp_path: Path) -> None:
    """Another process opening the directory reads every entry, in acceptance order."""
    spool = LogoutSpool(tmp_path)
    late, early = entry("b", accepted_at=20.0), entry("a", accepted_at=10.0)
    spool.add(late)
    spool.add(early)
    assert [e for _, e in LogoutSpool(tmp_path).entries()] == [early, late]


def test_unreadable_and_foreign_files_are_skipped_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt entry, one renamed to another token's name and unrelated files are skipped with a
    warning and left for an operator; only stale temporary files are removed."""
    spool = LogoutSpool(tmp_path)
    good = entry()
    spool.add(good)
    corrupt = spool.path_for("https://idp.example", "corrupt")
    corrupt.write_text("{not json")
    moved = spool.path_for("https://idp.example", "moved")
    moved.write_text(entry("something-else").to_json())
    neither = spool.path_for("https://idp.example", "neither")
    neither.write_text(entry("neither", sub=None, sid=None).to_json())
    (tmp_path / "notes.txt").write_text("hello")
    fresh_temp, stale_temp = tmp_path / ".tmp-logout-x-1", tmp_path / ".tmp-logout-x-2"
    fresh_temp.write_text("partial")
    stale_temp.write_text("partial")
    os.utime(stale_temp, (0, 0))
    assert [e for _, e in spool.entries()] == [good]
    assert corrupt.exists() and moved.exists() and neither.exists()
    assert fresh_temp.exists() and not stale_temp.exists()
    assert "unreadable" in caplog.text and "does not match" in caplog.text


def test_the_directory_defaults_under_the_usage_spool() -> None:
    """Unset, the journal lives in logouts/ under store.spool_dir; set, where it says; empty refuses."""
    assert logout_spool_dir(Store(spool_dir="/var/spool/gw")) == Path("/var/spool/gw/logouts")
    assert logout_spool_dir(Store(logout_spool_dir="/shared/logouts")) == Path("/shared/logouts")
    with pytest.raises(StoreError):
        LogoutSpool("")
