"""The token file: location, private atomic writes, and refusal of files others can read."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from authz.client.tokenfile import (
    NotSignedInError,
    StoredToken,
    TokenFileError,
    default_path,
    delete,
    load,
    locked,
    save,
)

TOKEN = StoredToken(
    gateway="https://gw.example",
    access_token="at-1",
    expires_at=1_800_000_900.0,
    refresh_token="rt-1",
    email="ada@example.com",
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_path_follows_xdg_then_home(tmp_path: Path) -> None:
    """$XDG_CONFIG_HOME wins when absolute; a relative one is ignored in favour of ~/.config."""
    home = str(tmp_path / "home")
    assert default_path({"XDG_CONFIG_HOME": "/x", "HOME": home}) == Path("/x/claude-gateway/token.json")
    expected = Path(home) / ".config" / "claude-gateway" / "token.json"
    assert default_path({"XDG_CONFIG_HOME": "relative", "HOME": home}) == expected
    assert default_path({"HOME": home}) == expected


def test_save_writes_a_0600_file_in_a_0700_directory_and_loads_back(tmp_path: Path) -> None:
    """A saved token round-trips, with the file 0600 and its directory 0700 whatever the umask."""
    path = default_path({"XDG_CONFIG_HOME": str(tmp_path)})
    old_umask = os.umask(0o022)
    try:
        save(path, TOKEN)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert load(path) == TOKEN
    assert json.loads(path.read_text())["refresh_token"] == "rt-1"


def test_save_replaces_atomically_without_leaving_temporary_files(tmp_path: Path) -> None:
    """A second save replaces the file and leaves nothing else behind in the directory."""
    path = tmp_path / "claude-gateway" / "token.json"
    save(path, TOKEN)
    newer = StoredToken(TOKEN.gateway, "at-2", TOKEN.expires_at + 900, "rt-2", TOKEN.email)
    save(path, newer)
    assert load(path) == newer
    assert sorted(p.name for p in path.parent.iterdir()) == ["token.json"]


def test_save_tightens_an_existing_directory_to_0700(tmp_path: Path) -> None:
    """An existing, too-open claude-gateway directory is made 0700."""
    path = tmp_path / "claude-gateway" / "token.json"
    path.parent.mkdir(mode=0o755)
    os.chmod(path.parent, 0o755)
    save(path, TOKEN)
    assert _mode(path.parent) == 0o700


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_token_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    """A group- or world-accessible token file is refused with a message naming the fix."""
    path = tmp_path / "token.json"
    save(path, TOKEN)
    os.chmod(path, mode)
    with pytest.raises(TokenFileError) as info:
        load(path)
    assert "refusing to read" in str(info.value) and f"{mode:04o}" in str(info.value)
    assert "chmod 600" in str(info.value)


def test_non_strict_load_reads_a_too_open_file(tmp_path: Path) -> None:
    """``strict=False`` (used by logout, to revoke it) still reads a too-open file."""
    path = tmp_path / "token.json"
    save(path, TOKEN)
    os.chmod(path, 0o644)
    assert load(path, strict=False) == TOKEN


def test_a_missing_file_means_not_signed_in(tmp_path: Path) -> None:
    """No token file raises NotSignedInError pointing at ``authz login``."""
    with pytest.raises(NotSignedInError, match="authz login"):
        load(tmp_path / "token.json")


def test_a_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    """Invalid JSON or a missing field is reported as a damaged file, not a crash."""
    path = tmp_path / "token.json"
    save(path, TOKEN)
    for text in ("{not json", json.dumps({"version": 1, "gateway": "https://gw.example"})):
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, text.encode())
        os.close(fd)
        with pytest.raises(TokenFileError, match="damaged"):
            load(path)


def test_a_symlinked_token_file_is_not_followed(tmp_path: Path) -> None:
    """A token file that is a symlink is refused rather than read through."""
    real = tmp_path / "real.json"
    save(real, TOKEN)
    link = tmp_path / "token.json"
    link.symlink_to(real)
    with pytest.raises(TokenFileError):
        load(link)


def test_delete_reports_whether_there_was_a_file(tmp_path: Path) -> None:
    """``delete`` removes the file and says False when there was none."""
    path = tmp_path / "token.json"
    save(path, TOKEN)
    assert delete(path) is True
    assert delete(path) is False


def test_refresh_is_due_within_five_minutes_of_expiry() -> None:
    """A token is refreshed when less than five minutes are left (Claude Code re-runs the helper
    every five), and is valid until it expires."""
    assert not TOKEN.needs_refresh(TOKEN.expires_at - 301)
    assert TOKEN.needs_refresh(TOKEN.expires_at - 299)
    assert TOKEN.needs_refresh(TOKEN.expires_at + 10)
    assert TOKEN.is_valid(TOKEN.expires_at - 1) and not TOKEN.is_valid(TOKEN.expires_at)


def test_the_refresh_lock_is_private_and_released(tmp_path: Path) -> None:
    """The lock file lives beside the token file with mode 0600 and can be taken again after release."""
    path = tmp_path / "claude-gateway" / "token.json"
    with locked(path):
        pass
    with locked(path):
        pass
    assert _mode(path.with_name("token.json.lock")) == 0o600
