"""Run state goes under the state directory: explicit, or derived from the config path; never the CWD."""

from __future__ import annotations

from pathlib import Path

from authz.configtypes import GatewayConfig, Store
from authz.statedir import default_state_dir, state_dir, with_state_dir


def test_the_default_is_per_config_path_under_xdg_state_home(tmp_path: Path) -> None:
    """Two configs get two directories under $XDG_STATE_HOME/claude-gateway; the same config
    (however it is spelled) always gets the same one; HOME is the fallback."""
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path / "home")}
    a = default_state_dir(tmp_path / "a" / "gateway.yaml", env)
    b = default_state_dir(tmp_path / "b" / "gateway.yaml", env)
    assert a != b and a.parent == b.parent == tmp_path / "state" / "claude-gateway"
    assert a.name.startswith("gateway-")
    assert default_state_dir(tmp_path / "a" / ".." / "a" / "gateway.yaml", env) == a
    home = default_state_dir(tmp_path / "a" / "gateway.yaml", {"HOME": str(tmp_path / "home")})
    assert home.parent == tmp_path / "home" / ".local" / "state" / "claude-gateway"


def test_an_explicit_state_dir_wins_and_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    """--state-dir is used as given, resolved to an absolute path."""
    monkeypatch.chdir(tmp_path)
    assert state_dir("gateway.yaml", "run", {}) == tmp_path / "run"
    assert state_dir("gateway.yaml", None, {"XDG_STATE_HOME": "/x"}).parent == Path("/x/claude-gateway")


def test_the_spool_resolves_against_the_state_directory(tmp_path: Path) -> None:
    """An empty spool_dir is <state>/spool, a relative one is under the state directory, an
    absolute one stays."""

    def spool(value: str) -> str:
        return with_state_dir(GatewayConfig(store=Store(spool_dir=value)), tmp_path).store.spool_dir

    assert spool("") == str(tmp_path / "spool")
    assert spool("usage/spool") == str(tmp_path / "usage" / "spool")
    assert spool("/var/spool/gw") == "/var/spool/gw"
