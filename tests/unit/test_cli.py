"""The developer commands (login, token, logout, setup) run through ``authz.cli.main`` with fakes."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from authz.cli import ClientDeps, build_parser, cmd_token_mint, cmd_token_print, main
from authz.client.tokenfile import StoredToken, default_path, load, save
from authz.signin.admin import format_sessions
from authz.signin.tokens import generate_signing_key
from authz.store.sessions import Session
from tests.unit.test_client_flow import GW, NOW, TOKENS, FakeClock, FakePortal, oauth_error, pending

AUTHZ = "/opt/venv/bin/authz"


class World:
    """A fake portal, clock, browser and home directory for one test."""

    def __init__(self, tmp_path: Path, portal: FakePortal | None = None, *, display: bool = False) -> None:
        self.portal = portal or FakePortal()
        self.clock = FakeClock()
        self.opened: list[str] = []
        self.environ = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "HOME": str(tmp_path / "home")}
        if display:
            self.environ["DISPLAY"] = ":0"
        self.token_path = default_path(self.environ)

    def _open(self, url: str) -> bool:
        self.opened.append(url)
        return True

    def deps(self) -> ClientDeps:
        """The ClientDeps that route every outside effect to this world."""
        return ClientDeps(
            environ=self.environ,
            transport=self.portal.transport(),
            clock=self.clock.time,
            sleep=self.clock.sleep,
            open_browser=self._open,
            authz_argv=(AUTHZ,),
        )

    def run(self, *argv: str) -> int:
        """Run ``authz argv...`` in this world."""
        return main(list(argv), deps=self.deps())

    def sign_in(self, *, expires_in: float = 900, refresh_token: str | None = "rt-1") -> None:
        """Write a token file as ``authz login`` would have."""
        save(
            self.token_path,
            StoredToken(GW, "at-1", self.clock.now + expires_in, refresh_token, "ada@example.com"),
        )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- login ---------------------------------------------------------------------------------------


def test_login_polls_to_success_and_writes_a_private_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Login prints the URL and code, opens the browser, polls through pending and slow_down, saves 0600."""
    world = World(
        tmp_path, FakePortal(polls=[pending(), oauth_error("slow_down"), (200, TOKENS)]), display=True
    )
    assert world.run("login", "--gateway", GW + "/") == 0
    out = capsys.readouterr().out
    assert f"{GW}/device" in out and "WDJB-MJHT" in out and f"{GW}/device?user_code=WDJB-MJHT" in out
    assert out.rstrip().endswith("Signed in as ada@example.com")
    assert world.opened == [f"{GW}/device?user_code=WDJB-MJHT"]
    assert world.clock.sleeps == [5, 5, 10]
    assert ("/oauth/device_authorization", {"surface": "cli"}) in world.portal.forms
    assert _mode(world.token_path) == 0o600 and _mode(world.token_path.parent) == 0o700
    stored = load(world.token_path)
    assert stored == StoredToken(GW, "at-1", world.clock.now + 900, "rt-1", "ada@example.com")


def test_login_does_not_open_a_browser_with_no_browser_or_no_display(tmp_path: Path) -> None:
    """``--no-browser``, or no DISPLAY on Linux, only prints the URL."""
    world = World(tmp_path, display=True)
    assert world.run("login", "--gateway", GW, "--no-browser") == 0
    headless = World(tmp_path / "other")
    assert headless.run("login", "--gateway", GW) == 0
    assert world.opened == [] and headless.opened == []


@pytest.mark.parametrize(
    ("code", "text"),
    [("access_denied", "sign-in was denied"), ("expired_token", "expired before it was approved")],
)
def test_login_denied_or_expired_exits_1_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], code: str, text: str
) -> None:
    """access_denied and expired_token exit 1, explain on stderr, and write no token file."""
    world = World(tmp_path, FakePortal(polls=[pending(), oauth_error(code)]))
    assert world.run("login", "--gateway", GW) == 1
    err = capsys.readouterr().err
    assert text in err and f"authz login --gateway {GW}" in err
    assert not world.token_path.exists()


# --- token (apiKeyHelper) ----------------------------------------------------------------------


def test_token_prints_a_fresh_token_without_the_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token with more than two minutes left is printed alone on stdout with no request made."""
    world = World(tmp_path, FakePortal(down=True))
    world.sign_in(expires_in=600)
    assert world.run("token", "--gateway", GW) == 0
    captured = capsys.readouterr()
    assert captured.out == "at-1\n" and captured.err == ""
    assert world.portal.requests == []


def test_token_refreshes_near_expiry_and_saves_the_rotated_refresh_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Within two minutes of expiry the token is refreshed silently and the rotated pair is saved."""
    world = World(tmp_path)
    world.sign_in(expires_in=90)
    assert world.run("token") == 0
    captured = capsys.readouterr()
    assert captured.out == "at-2\n" and captured.err == ""
    assert world.portal.forms == [("/oauth/token", {"grant_type": "refresh_token", "refresh_token": "rt-1"})]
    stored = load(world.token_path)
    assert (stored.access_token, stored.refresh_token, stored.expires_at) == ("at-2", "rt-2", NOW + 900)
    assert _mode(world.token_path) == 0o600


def test_token_exits_1_with_the_login_hint_when_the_session_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """invalid_grant at refresh prints nothing on stdout and the login command on stderr."""
    world = World(tmp_path, FakePortal(refresh=oauth_error("invalid_grant", 401)))
    world.sign_in(expires_in=60)
    assert world.run("token") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"session ended: run `authz login --gateway {GW}`" in captured.err


def test_token_prints_the_still_valid_token_when_the_gateway_answers_503(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """temporarily_unavailable at refresh falls back to the current, still valid token."""
    world = World(tmp_path, FakePortal(refresh=oauth_error("temporarily_unavailable", 503)))
    world.sign_in(expires_in=60)
    assert world.run("token") == 0
    assert capsys.readouterr().out == "at-1\n"
    assert load(world.token_path).refresh_token == "rt-1"


def test_token_prints_the_still_valid_token_when_the_gateway_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A network error at refresh falls back to the current token while it is valid, else exits 1."""
    world = World(tmp_path, FakePortal(down=True))
    world.sign_in(expires_in=60)
    assert world.run("token") == 0
    assert capsys.readouterr().out == "at-1\n"
    world.clock.now += 120
    assert world.run("token") == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "expired" in captured.err


def test_token_refuses_a_world_readable_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token file others can read is refused: exit 1, nothing on stdout, the reason on stderr."""
    world = World(tmp_path, FakePortal(down=True))
    world.sign_in()
    os.chmod(world.token_path, 0o644)
    assert world.run("token") == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "refusing to read" in captured.err


def test_token_without_sign_in_or_for_another_gateway_points_at_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No token file, or one for a different gateway, exits 1 with the login command to run."""
    world = World(tmp_path, FakePortal(down=True))
    assert world.run("token", "--gateway", GW) == 1
    assert f"not signed in: run `authz login --gateway {GW}`" in capsys.readouterr().err
    world.sign_in()
    assert world.run("token", "--gateway", "https://other.example") == 1
    assert "authz login --gateway https://other.example" in capsys.readouterr().err


def test_token_with_and_without_mint_dispatch_to_the_right_command() -> None:
    """``authz token`` prints the session token; ``authz token mint`` still mints."""
    parser = build_parser()
    assert parser.parse_args(["token"]).func is cmd_token_print
    args = parser.parse_args(["token", "mint", "--config", "c.yaml", "--user", "ada@example.com"])
    assert args.func is cmd_token_mint and args.ttl == 900


def _mint_config(tmp_path: Path) -> Path:
    key = generate_signing_key("k1")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        textwrap.dedent(
            """
            upstreams:
              main:
                kind: bedrock
                region: us-east-1
                credentials: {source: static, access_key_id: AKIDEXAMPLE, secret_access_key: secret}
            policies:
              - {name: eng, groups: [eng], upstreams: [main]}
            sessions:
              signing_key:
                kid: k1
                private_key: |
            """
        )
        + textwrap.indent(key.private_key or "", " " * 6)
    )
    return config


def test_token_mint_still_mints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``authz token mint`` prints a token signed with the configured key, as before."""
    config = _mint_config(tmp_path)
    assert (
        main(["token", "mint", "--config", str(config), "--user", "ada@example.com", "--groups", "eng"]) == 0
    )
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["email"] == "ada@example.com" and claims["groups"] == ["eng"]


def test_token_mint_caps_the_lifetime_unless_dev(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A minted token cannot be revoked, so a lifetime over sessions.access_token_ttl (900 s) is
    refused, pointing at service tokens, unless --dev; a service-token session id is refused."""
    config = str(_mint_config(tmp_path))
    base = ["token", "mint", "--config", config, "--user", "ci@example.com"]
    assert main([*base, "--ttl", "86400"]) == 2
    err = capsys.readouterr().err
    assert "sessions.access_token_ttl" in err and "authz service-tokens create" in err
    assert main([*base, "--ttl", "86400", "--dev"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 86400
    assert main([*base, "--sid", "svc:abc"]) == 2
    assert "svc:" in capsys.readouterr().err


# --- logout -------------------------------------------------------------------------------------


def test_logout_revokes_both_tokens_and_deletes_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logout revokes the refresh token, then the access token, and deletes the token file."""
    world = World(tmp_path)
    world.sign_in()
    assert world.run("logout") == 0
    assert capsys.readouterr().out.strip() == "Signed out"
    assert world.portal.forms == [
        ("/oauth/revoke", {"token": "rt-1", "token_type_hint": "refresh_token"}),
        ("/oauth/revoke", {"token": "at-1", "token_type_hint": "access_token"}),
    ]
    assert not world.token_path.exists()


def test_logout_deletes_locally_when_the_gateway_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreachable gateway only produces a warning: the token file is deleted anyway."""
    world = World(tmp_path, FakePortal(down=True))
    world.sign_in()
    assert world.run("logout") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "Signed out" and "could not revoke" in captured.err
    assert not world.token_path.exists()


def test_logout_when_not_signed_in_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Logout without a token file succeeds and says there was nothing to do."""
    world = World(tmp_path, FakePortal(down=True))
    assert world.run("logout") == 0
    assert capsys.readouterr().out.strip() == "Not signed in"


# --- setup ---------------------------------------------------------------------------------------


def test_setup_prints_bedrock_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bedrock setup prints the exports, the unset reminder and the apiKeyHelper of this executable."""
    world = World(tmp_path)
    assert world.run("setup", "claude-code", "--gateway", GW, "--format", "bedrock") == 0
    out = capsys.readouterr().out
    assert "export CLAUDE_CODE_USE_BEDROCK=1" in out and f"export ANTHROPIC_BEDROCK_BASE_URL={GW}" in out
    assert "export CLAUDE_CODE_SKIP_BEDROCK_AUTH=1" in out and "export AWS_REGION=us-east-1" in out
    assert "unset AWS_BEARER_TOKEN_BEDROCK" in out
    assert f'"apiKeyHelper": "{AUTHZ} token --gateway {GW}"' in out
    assert not (tmp_path / "home" / ".claude").exists()


def test_setup_prints_vertex_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Vertex setup prints the /v1 base URL, skip-auth, project and region."""
    world = World(tmp_path)
    argv = [
        "setup",
        "claude-code",
        "--gateway",
        GW,
        "--format",
        "vertex",
        "--project",
        "p1",
        "--region",
        "r1",
    ]
    assert world.run(*argv) == 0
    out = capsys.readouterr().out
    assert f"export ANTHROPIC_VERTEX_BASE_URL={GW}/v1" in out and "export CLAUDE_CODE_USE_VERTEX=1" in out
    assert "export CLAUDE_CODE_SKIP_VERTEX_AUTH=1" in out
    assert "export ANTHROPIC_VERTEX_PROJECT_ID=p1" in out and "export CLOUD_ML_REGION=r1" in out


def test_setup_prints_messages_settings_with_the_native_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Messages setup prints /login as the preferred way, then ANTHROPIC_BASE_URL and the apiKeyHelper."""
    world = World(tmp_path)
    assert world.run("setup", "claude-code", "--gateway", GW, "--format", "messages") == 0
    out = capsys.readouterr().out
    assert '/login, choose "Cloud gateway"' in out
    assert f"export ANTHROPIC_BASE_URL={GW}" in out
    assert f'"apiKeyHelper": "{AUTHZ} token --gateway {GW}"' in out
    assert "export CLAUDE_CODE_USE_BEDROCK" not in out and "export CLAUDE_CODE_USE_VERTEX" not in out


def test_setup_write_messages_says_why_each_variable_must_be_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--write`` in the Messages format writes ANTHROPIC_BASE_URL and says which shell variables
    to unset, and why."""
    world = World(tmp_path)
    assert world.run("setup", "claude-code", "--gateway", GW, "--format", "messages", "--write") == 0
    settings_path = tmp_path / "home" / ".claude" / "settings.json"
    assert json.loads(settings_path.read_text())["env"] == {"ANTHROPIC_BASE_URL": GW}
    out = capsys.readouterr().out
    assert (
        "Remember to `unset ANTHROPIC_AUTH_TOKEN` in your shell profile: it would replace the gateway token."
        in out
    )
    assert (
        "`unset CLAUDE_CODE_USE_VERTEX` in your shell profile: it would switch Claude Code to Vertex format."
        in out
    )


def test_setup_write_merges_into_an_existing_settings_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--write`` keeps other keys, sets apiKeyHelper and env, backs up the old file and writes 0600."""
    world = World(tmp_path)
    settings_path = tmp_path / "home" / ".claude" / "settings.json"
    settings_path.parent.mkdir(parents=True)
    old = {"model": "opus", "env": {"EDITOR": "vim"}, "hooks": {"Stop": []}}
    settings_path.write_text(json.dumps(old))
    assert world.run("setup", "claude-code", "--gateway", GW, "--format", "bedrock", "--write") == 0
    written = json.loads(settings_path.read_text())
    assert written["model"] == "opus" and written["hooks"] == {"Stop": []}
    assert written["apiKeyHelper"] == f"{AUTHZ} token --gateway {GW}"
    assert written["env"]["EDITOR"] == "vim" and written["env"]["ANTHROPIC_BEDROCK_BASE_URL"] == GW
    assert json.loads(settings_path.with_name("settings.json.bak").read_text()) == old
    assert _mode(settings_path) == 0o600
    assert f"Wrote {settings_path}" in capsys.readouterr().out


def test_setup_write_creates_a_missing_settings_file(tmp_path: Path) -> None:
    """``--write`` creates ~/.claude/settings.json when there is none, without a backup."""
    world = World(tmp_path)
    assert world.run("setup", "claude-code", "--gateway", GW, "--format", "vertex", "--write") == 0
    settings_path = tmp_path / "home" / ".claude" / "settings.json"
    assert json.loads(settings_path.read_text())["env"]["CLAUDE_CODE_USE_VERTEX"] == "1"
    assert not settings_path.with_name("settings.json.bak").exists()


def test_setup_write_leaves_an_invalid_settings_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A settings.json that is not valid JSON is reported and not overwritten."""
    world = World(tmp_path)
    settings_path = tmp_path / "home" / ".claude" / "settings.json"
    settings_path.parent.mkdir(parents=True)
    settings_path.write_text("{oops")
    assert world.run("setup", "claude-code", "--gateway", GW, "--format", "bedrock", "--write") == 1
    assert settings_path.read_text() == "{oops"
    assert "not valid JSON" in capsys.readouterr().err


# --- admin ---------------------------------------------------------------------------------------


def test_sessions_revoke_needs_exactly_one_of_user_or_session(capsys: pytest.CaptureFixture[str]) -> None:
    """``sessions revoke`` refuses to run without --user or --session, or with both."""
    parser = build_parser()
    for argv in (["--config", "c"], ["--config", "c", "--user", "a@x", "--session", "s"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["sessions", "revoke", *argv])
    args = parser.parse_args(["sessions", "revoke", "--config", "c", "--session", "s1"])
    assert (args.session, args.user, args.reason) == ("s1", None, "revoked by an administrator")


def test_sessions_table_shows_state_and_reason() -> None:
    """The session table shows active, expired and revoked sessions with the revocation reason."""
    now = datetime(2027, 1, 1, 12, 0, tzinfo=UTC)

    def session(sid: str, *, expires: timedelta, revoked: str | None = None) -> Session:
        return Session(
            id=sid,
            sub="u1",
            email="ada@example.com",
            groups=("eng", "ops"),
            idp_sid=None,
            idp_refresh_token_enc=None,
            surface="cli",
            user_agent=None,
            created_at=now - timedelta(hours=1),
            last_refresh_at=now,
            expires_at=now + expires,
            revoked_at=now if revoked else None,
            revoked_reason=revoked,
        )

    table = format_sessions(
        [
            session("s-active", expires=timedelta(hours=8)),
            session("s-expired", expires=-timedelta(minutes=1)),
            session("s-revoked", expires=timedelta(hours=8), revoked="laptop stolen"),
        ],
        now,
    )
    lines = table.splitlines()
    assert lines[1].startswith("s-active") and lines[1].endswith("active") and "eng,ops" in lines[1]
    assert lines[2].endswith("expired")
    assert lines[3].endswith("revoked 2027-01-01 12:00: laptop stolen")
    assert format_sessions([], now) == "No sessions.\n"


def test_a_worker_is_restarted_until_it_crash_loops() -> None:
    """A worker may die and be restarted three times within a minute; the fourth death in that
    window is a crash loop, and deaths spread over time never add up to one."""
    from authz.service import RestartBudget

    now = [0.0]
    budget = RestartBudget(clock=lambda: now[0])
    assert [budget.may_restart(0) for _ in range(3)] == [True, True, True]
    assert budget.may_restart(1) is True  # another worker has a budget of its own
    assert budget.may_restart(0) is False
    now[0] = 61.0
    assert budget.may_restart(0) is True
