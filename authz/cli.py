"""The ``authz`` command line.

``authz serve`` runs the gateway services, ``authz envoy`` runs (or prints) Envoy's configuration,
``authz run`` runs everything, ``authz config check`` validates a configuration file offline (before
a reload, say), ``authz doctor`` checks a deployment's configuration, ``authz usage``
shows recent usage rows or their sums (``--by``), ``authz audit`` the audit log, and ``authz token
mint`` signs a short-lived token for development.

For developers: ``authz login`` signs in to a gateway (device flow), ``authz token`` prints a fresh
access token (Claude Code's ``apiKeyHelper``), ``authz logout`` ends the session, and ``authz setup
claude-code`` prints or writes the Claude Code settings. For admins: ``authz sessions list|revoke``
``authz service-tokens create|list|revoke`` (tokens for CI jobs and other service identities),
``authz spend-limits set|list|delete`` (spend caps at run time) and ``authz spend show``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import webbrowser
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authz.config import load
from authz.configtypes import GatewayConfig
from authz.errors import GatewayError

if TYPE_CHECKING:
    import httpx

    from authz.client.flow import GatewayClient
    from authz.client.tokenfile import StoredToken


def _config(args: argparse.Namespace) -> GatewayConfig:
    return load(args.config, os.environ)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the ext_authz/ext_proc gRPC services and the portal until SIGTERM."""
    from authz.service import serve

    return serve(Path(args.config), dict(os.environ), args.state_dir)


def cmd_envoy(args: argparse.Namespace) -> int:
    """Print (or write) the rendered Envoy bootstrap, or run Envoy with it."""
    from authz.envoy.render import load_for_render, render_yaml, write_bootstrap

    if args.render:
        # The bootstrap never contains the ${file:...} secrets, so they are not read (a Kubernetes
        # init container renders it without the key Secret mounted).
        config = load_for_render(args.config, os.environ)
        if args.output:
            # With listen.envoy.tls the listener's SDS file goes beside it.
            write_bootstrap(config, args.output)
        else:
            sys.stdout.write(render_yaml(config))
        return 0
    config = _config(args)
    from authz.envoy.binary import envoy_binary
    from authz.statedir import state_dir

    root = state_dir(args.config, args.state_dir, os.environ)
    out = write_bootstrap(config, Path(args.output) if args.output else root / "envoy.yaml")
    binary = envoy_binary()
    # A base id of its own, so several Envoys (several gateways) can share the host.
    argv = [binary, "-c", str(out), "--log-level", args.log_level, "--use-dynamic-base-id"]
    os.execv(binary, argv)  # noqa: S606 - replaces this process by design
    return 0  # pragma: no cover - execv does not return


def cmd_run(args: argparse.Namespace) -> int:
    """Start the gateway services and Envoy together."""
    from authz.statedir import state_dir
    from authz.supervisor import run

    root = state_dir(args.config, args.state_dir, os.environ)
    return run(config_path=Path(args.config), root=root, environ=dict(os.environ))


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check a deployment's configuration, keys, database, IdP, upstreams and Envoy config."""
    from authz.ops.doctor import doctor

    return doctor(Path(args.config), os.environ, sys.stdout, envoy=not args.skip_envoy)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a configuration file without starting anything: exit 0, or 1 naming each field."""
    from authz.ops.configcheck import config_check

    path = args.file or args.config
    if not path:
        raise GatewayError("name the file: authz config check FILE")
    return config_check(Path(path), os.environ, sys.stdout)


def cmd_token_mint(args: argparse.Namespace) -> int:
    """Print an access token for ``--user`` signed with the configured signing key (development:
    such a token is not recorded anywhere and cannot be revoked, so its lifetime is capped)."""
    from authz.serviceid import SID_PREFIX
    from authz.signin.tokens import KeySet, mint

    config = _config(args)
    if config.sessions.signing_key is None:
        raise GatewayError("sessions.signing_key is not configured: cannot mint tokens")
    cap = config.sessions.access_token_ttl
    if args.ttl > cap and not args.dev:
        raise GatewayError(
            f"--ttl {args.ttl} exceeds sessions.access_token_ttl ({cap} seconds): a minted token cannot be "
            "revoked. For a CI job or another service use `authz service-tokens create`; for local "
            "development add --dev"
        )
    if args.sid and args.sid.startswith(SID_PREFIX):
        raise GatewayError(f"--sid must not start with {SID_PREFIX!r}: that prefix marks service tokens")
    keyset = KeySet.from_config(config.sessions)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    token = mint(
        keyset,
        issuer=config.sessions.issuer,
        audience=config.sessions.audience,
        sub=args.sub or args.user,
        email=args.user,
        groups=groups,
        sid=args.sid or f"cli-{os.urandom(8).hex()}",
        ttl=args.ttl,
        now=time.time(),
    )
    print(token)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Print the most recent usage rows, or with ``--by`` their sums per user, group, model, ..."""
    from datetime import UTC, datetime

    from authz.billing.usage_report import parse_time, print_recent, print_summary

    config = _config(args)
    if args.by is None:
        if args.since or args.until or args.format != "table":
            raise GatewayError("--since, --until and --format go with --by")
        return asyncio.run(print_recent(config, limit=args.limit, as_json=args.json))
    now = datetime.now(UTC)
    since = parse_time(args.since, now) if args.since else None
    until = parse_time(args.until, now) if args.until else None
    return asyncio.run(print_summary(config, by=args.by, since=since, until=until, fmt=args.format))


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit log: sign-ins, refreshes, revocations, logouts and admin actions."""
    from datetime import UTC, datetime

    from authz.billing.usage_report import parse_time
    from authz.signin.audit_report import print_audit

    since = parse_time(args.since, datetime.now(UTC)) if args.since else None
    config = _config(args)
    return asyncio.run(print_audit(config, since=since, kind=args.kind, limit=args.limit, fmt=args.format))


# --- developer sign-in: login, token, logout, setup --------------------------------------------


@dataclass(frozen=True)
class ClientDeps:
    """What the sign-in commands touch outside the process: tests pass fakes for each."""

    environ: Mapping[str, str]
    transport: httpx.BaseTransport | None = None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    # Opens a URL in a browser; None means webbrowser.open when there is a display.
    open_browser: Callable[[str], bool] | None = None
    # How to run this CLI again (the apiKeyHelper); None means this executable's absolute path.
    authz_argv: tuple[str, ...] | None = None

    def has_display(self) -> bool:
        """Whether a browser could open here (macOS and Windows always; elsewhere X11 or Wayland)."""
        if sys.platform in ("darwin", "win32"):
            return True
        return bool(self.environ.get("DISPLAY") or self.environ.get("WAYLAND_DISPLAY"))

    def browse(self, url: str) -> bool:
        """Try to open ``url`` in a browser; ``False`` when that did not work."""
        if self.open_browser is not None:
            return self.open_browser(url)
        try:
            return webbrowser.open(url)
        except webbrowser.Error:
            return False

    def self_argv(self) -> tuple[str, ...]:
        """The command line that runs this CLI, as absolute as can be found."""
        if self.authz_argv is not None:
            return self.authz_argv
        argv0 = sys.argv[0] if sys.argv else ""
        if Path(argv0).name == "authz" and os.path.isfile(argv0):
            return (os.path.abspath(argv0),)
        found = shutil.which("authz", path=self.environ.get("PATH"))
        if found:
            return (os.path.abspath(found),)
        return (sys.executable, "-m", "authz.cli")


def _deps(args: argparse.Namespace) -> ClientDeps:
    deps = getattr(args, "deps", None)
    return deps if isinstance(deps, ClientDeps) else ClientDeps(environ=os.environ)


def _client(gateway: str, deps: ClientDeps) -> GatewayClient:
    from authz.client.flow import GatewayClient

    return GatewayClient(gateway, transport=deps.transport, clock=deps.clock, sleep=deps.sleep)


def _fail(message: str) -> int:
    print(f"authz: {message}", file=sys.stderr)
    return 1


def cmd_login(args: argparse.Namespace) -> int:
    """Sign in to a gateway with the device flow and save the session in the token file."""
    from authz.client.flow import DeviceFlowError
    from authz.client.tokenfile import StoredToken, default_path, save

    deps = _deps(args)
    with _client(args.gateway, deps) as client:
        auth = client.start_device_authorization(surface="cli")
        print(f"To sign in, open {auth.verification_uri} and enter the code {auth.user_code}")
        if auth.verification_uri_complete:
            print(f"(or open {auth.verification_uri_complete} and check that it shows {auth.user_code})")
        target = auth.verification_uri_complete or auth.verification_uri
        # Only http(s): a URL from the network must not make the browser open anything else.
        can_open = not args.no_browser and deps.has_display() and target.startswith(("https://", "http://"))
        if can_open and deps.browse(target):
            print("A browser window should have opened.")
        print("Waiting for you to approve the sign-in...", flush=True)
        try:
            tokens = client.poll_token(auth)
        except DeviceFlowError as exc:
            return _fail(str(exc))
        gateway = client.gateway
    save(
        default_path(deps.environ),
        StoredToken(
            gateway=gateway,
            access_token=tokens.access_token,
            expires_at=deps.clock() + tokens.expires_in,
            refresh_token=tokens.refresh_token,
            email=tokens.email,
        ),
    )
    print(f"Signed in as {tokens.email or 'an unnamed user'}")
    return 0


def cmd_token_print(args: argparse.Namespace) -> int:
    """Print only a valid access token on stdout (Claude Code's apiKeyHelper), refreshing it if due."""
    from authz.client.flow import normalize_gateway
    from authz.client.tokenfile import NotSignedInError, TokenFileError, default_path, load, locked

    deps = _deps(args)
    path = default_path(deps.environ)
    wanted = normalize_gateway(args.gateway) if args.gateway else None
    hint = f"`authz login --gateway {wanted or 'URL'}`"
    try:
        stored = load(path)
        if wanted is not None and stored.gateway != wanted:
            return _fail(f"signed in to {stored.gateway}, not {wanted}: run {hint}")
        if stored.needs_refresh(deps.clock()):
            with locked(path):
                # Another apiKeyHelper may have refreshed while this one waited for the lock.
                stored = load(path)
                if stored.needs_refresh(deps.clock()):
                    refreshed = _refresh(path, stored, deps)
                    if refreshed is None:
                        return 1
                    stored = refreshed
    except NotSignedInError:
        return _fail(f"not signed in: run {hint}")
    except TokenFileError as exc:
        return _fail(str(exc))
    sys.stdout.write(stored.access_token + "\n")
    return 0


def _refresh(path: Path, stored: StoredToken, deps: ClientDeps) -> StoredToken | None:
    """Refresh and save ``stored``; on failure print why and return the old token if still valid."""
    from authz.client.flow import ClientError, SessionEndedError
    from authz.client.tokenfile import StoredToken, save

    login = f"`authz login --gateway {stored.gateway}`"
    if stored.refresh_token is None:
        if stored.is_valid(deps.clock()):
            return stored
        _fail(f"session ended: run {login}")
        return None
    try:
        with _client(stored.gateway, deps) as client:
            tokens = client.refresh(stored.refresh_token)
    except SessionEndedError:
        _fail(f"session ended: run {login}")
        return None
    except ClientError as exc:
        if stored.is_valid(deps.clock()):
            print(
                f"authz: warning: could not refresh the session ({exc}); using the current token",
                file=sys.stderr,
            )
            return stored
        _fail(f"{exc}; the access token has expired, so there is no token to use")
        return None
    fresh = StoredToken(
        gateway=stored.gateway,
        access_token=tokens.access_token,
        expires_at=deps.clock() + tokens.expires_in,
        refresh_token=tokens.refresh_token or stored.refresh_token,
        email=tokens.email or stored.email,
    )
    save(path, fresh)
    return fresh


def cmd_logout(args: argparse.Namespace) -> int:
    """Revoke the session at the gateway (best effort) and delete the token file."""
    from authz.client.flow import ClientError
    from authz.client.tokenfile import NotSignedInError, TokenFileError, default_path, delete, load

    deps = _deps(args)
    path = default_path(deps.environ)
    try:
        # Not strict: a token file others could read is all the more reason to revoke it.
        stored = load(path, strict=False)
    except NotSignedInError:
        print("Not signed in")
        return 0
    except TokenFileError as exc:
        print(f"authz: warning: {exc}; deleting it without revoking", file=sys.stderr)
        delete(path)
        print("Signed out")
        return 0
    try:
        with _client(stored.gateway, deps) as client:
            # The refresh token first: revoking it ends the session, and with it the access token.
            if stored.refresh_token:
                client.revoke(stored.refresh_token, hint="refresh_token")
            client.revoke(stored.access_token, hint="access_token")
    except ClientError as exc:
        print(
            f"authz: warning: could not revoke the session at {stored.gateway} ({exc}); the local token "
            "is deleted anyway, and the gateway keeps the session until it expires or an admin revokes it",
            file=sys.stderr,
        )
    delete(path)
    print("Signed out")
    return 0


def claude_settings_path(environ: Mapping[str, str]) -> Path:
    """Claude Code's user settings file (``$CLAUDE_CONFIG_DIR/settings.json`` or ``~/.claude/``)."""
    configured = environ.get("CLAUDE_CONFIG_DIR")
    if configured:
        return Path(configured) / "settings.json"
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".claude" / "settings.json"


def cmd_setup_claude_code(args: argparse.Namespace) -> int:
    """Print (and with ``--write`` merge into settings.json) the settings that point Claude Code here."""
    from authz.client.flow import normalize_gateway
    from authz.client.setup import SetupError, claude_code_settings, render

    deps = _deps(args)
    path = claude_settings_path(deps.environ)
    try:
        settings = claude_code_settings(
            normalize_gateway(args.gateway),
            args.format,
            authz=deps.self_argv(),
            region=args.region,
            project=args.project,
        )
    except SetupError as exc:
        return _fail(str(exc))
    sys.stdout.write(render(settings, settings_path=str(path)))
    if not args.write:
        return 0
    from authz.client.setup import UNSET_REASONS, merge_settings
    from authz.client.tokenfile import write_private

    # A settings.json symlinked from a dotfiles repository stays a symlink: write its target.
    target = path.resolve() if path.is_symlink() else path
    existing: dict[str, Any] = {}
    backup: Path | None = None
    if target.exists():
        raw = target.read_bytes()
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            return _fail(f"{target} is not valid JSON ({exc}); fix or move it, then run this again")
        if not isinstance(parsed, dict):
            return _fail(f"{target} does not hold a JSON object; fix or move it, then run this again")
        existing = parsed
        backup = target.with_name(target.name + ".bak")
        write_private(backup, raw)
    else:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        merged = merge_settings(existing, settings)
    except SetupError as exc:
        return _fail(f"{target}: {exc}")
    write_private(target, (json.dumps(merged, indent=2) + "\n").encode("utf-8"))
    saved = f" (the previous one is saved as {backup})" if backup else ""
    print(f"Wrote {target}{saved}")
    for name in settings.unset:
        print(f"Remember to `unset {name}` in your shell profile: {UNSET_REASONS[name]}.")
    return 0


# --- admin: sessions ---------------------------------------------------------------------------


def cmd_sessions_list(args: argparse.Namespace) -> int:
    """List sign-in sessions (active ones unless ``--all``), optionally for one user."""
    from authz.signin.admin import list_sessions_command

    return asyncio.run(list_sessions_command(_config(args), email=args.user, include_inactive=args.all))


def cmd_sessions_revoke(args: argparse.Namespace) -> int:
    """Revoke one session or every session of a user, and audit it."""
    from authz.signin.admin import revoke_sessions_command

    return asyncio.run(
        revoke_sessions_command(_config(args), email=args.user, session_id=args.session, reason=args.reason)
    )


_STATE_DIR_HELP = (
    "where run state goes (rendered Envoy config, logs, the usage spool); default: a directory "
    "derived from the config file's path under $XDG_STATE_HOME/claude-gateway/"
)


# --- admin: service tokens ---------------------------------------------------------------------


def cmd_service_tokens_create(args: argparse.Namespace) -> int:
    """Create a service token and print it once."""
    from authz.signin.service_tokens import create_command

    return asyncio.run(
        create_command(_config(args), name=args.name, groups=args.groups, models=args.models, ttl=args.ttl)
    )


def cmd_service_tokens_list(args: argparse.Namespace) -> int:
    """List service tokens."""
    from authz.signin.service_tokens import list_command

    return asyncio.run(list_command(_config(args), name=args.name, include_inactive=args.all))


def cmd_service_tokens_revoke(args: argparse.Namespace) -> int:
    """Revoke service tokens and audit it."""
    from authz.signin.service_tokens import revoke_command

    return asyncio.run(
        revoke_command(
            _config(args), token_id=args.token_id, name=args.name, token=args.token, reason=args.reason
        )
    )


# --- admin: spend limits -----------------------------------------------------------------------


def _limit_scope(args: argparse.Namespace) -> tuple[Any, str]:
    from authz.billing.admin import scope_of

    if args.pooled and args.group is None:
        raise GatewayError("--pooled goes with --group")
    return scope_of(user=args.user, group=args.group, pooled=args.pooled, org=args.org)


def cmd_spend_limits_set(args: argparse.Namespace) -> int:
    """Create or replace a spend cap (applied by every worker at its next sync)."""
    from authz.billing.admin import parse_usd, set_command

    scope, name = _limit_scope(args)
    return asyncio.run(set_command(_config(args), scope, name, args.period, parse_usd(args.usd)))


def cmd_spend_limits_delete(args: argparse.Namespace) -> int:
    """Delete a spend cap set with `spend-limits set`."""
    from authz.billing.admin import delete_command

    scope, name = _limit_scope(args)
    return asyncio.run(delete_command(_config(args), scope, name, args.period))


def cmd_spend_limits_list(args: argparse.Namespace) -> int:
    """List the spend caps set with `spend-limits set`."""
    from authz.billing.admin import list_command

    return asyncio.run(list_command(_config(args), as_json=args.json))


def cmd_spend_show(args: argparse.Namespace) -> int:
    """Show a user's spend per period and what remains of each cap."""
    from authz.billing.admin import show_command

    groups = None if args.groups is None else tuple(g.strip() for g in args.groups.split(",") if g.strip())
    return asyncio.run(show_command(_config(args), args.user, groups, as_json=args.json))


def _add_limit_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", metavar="EMAIL", help="one user (or a service identity, service:NAME)")
    which.add_argument(
        "--group", metavar="G", help="each member of group G (with --pooled: their spend together)"
    )
    which.add_argument("--org", action="store_true", help="everyone's spend together")
    p.add_argument("--pooled", action="store_true", help="with --group: a budget the members share")
    p.add_argument("--period", required=True, choices=["daily", "weekly", "monthly"])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="authz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway services (ext_authz, ext_proc, portal)")
    p.add_argument("--config", required=True)
    p.add_argument("--state-dir", help=_STATE_DIR_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("envoy", help="run Envoy with the rendered configuration")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--render", action="store_true", help="print (with --output: write) the bootstrap, then exit"
    )
    p.add_argument("--output", help="where to write the rendered bootstrap (default: STATE_DIR/envoy.yaml)")
    p.add_argument("--state-dir", help=_STATE_DIR_HELP)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_envoy)

    p = sub.add_parser("run", help="run the gateway services and Envoy together")
    p.add_argument("--config", required=True)
    p.add_argument("--state-dir", help=_STATE_DIR_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "doctor",
        help="check what a first deployment gets wrong: config, keys, PostgreSQL, IdP, upstreams, Envoy",
        description="One line per check, with the field it concerns and the fix; exit status 1 if any fails.",
    )
    p.add_argument("--config", required=True)
    p.add_argument(
        "--skip-envoy", action="store_true", help="skip validating Envoy's bootstrap with the binary"
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="work with configuration files")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser(
        "check",
        help="validate a configuration file without starting anything (before a reload)",
        description="Loads the file as the services would (every key, value and cross-field check), "
        "parses the keys, builds each upstream's settings and renders Envoy's bootstrap in memory; "
        "contacts nothing. Prints `FILE: ok ...` and exits 0, or one `FILE: <field>: <problem>` line "
        "per problem and exits 1.",
    )
    c.add_argument("file", nargs="?", help="the configuration file")
    c.add_argument("--config", help="the configuration file (as for the other commands)")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser(
        "token",
        help="print a fresh gateway access token (Claude Code's apiKeyHelper), or mint one",
        description="Without a subcommand: print the signed-in session's access token, refreshing it "
        "when it expires within five minutes. `token mint` signs one with the configured key.",
    )
    p.add_argument("--gateway", help="fail unless signed in to this gateway URL")
    p.set_defaults(func=cmd_token_print)
    tsub = p.add_subparsers(dest="token_command", required=False)
    m = tsub.add_parser(
        "mint",
        help="development: print a short-lived access token signed with the configured key",
        description="A development tool: the token is recorded nowhere and cannot be revoked, so its "
        "lifetime is capped at sessions.access_token_ttl unless --dev. Service identities (CI jobs) "
        "use `authz service-tokens create`.",
    )
    m.add_argument("--config", required=True)
    m.add_argument("--user", required=True, help="the user's email")
    m.add_argument("--groups", default="", help="comma-separated groups")
    m.add_argument("--sub", help="subject (defaults to the email)")
    m.add_argument("--sid", help="session id (defaults to a fresh one)")
    m.add_argument("--ttl", type=int, default=900, help="lifetime in seconds (default 900)")
    m.add_argument(
        "--dev",
        action="store_true",
        help="allow a lifetime over sessions.access_token_ttl (development only)",
    )
    m.set_defaults(func=cmd_token_mint)

    p = sub.add_parser("login", help="sign in to a gateway (opens a browser when there is one)")
    p.add_argument("--gateway", required=True, help="the gateway URL, such as https://gateway.example.com")
    p.add_argument("--no-browser", action="store_true", help="only print the URL and code")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="revoke the session and delete the local token")
    p.set_defaults(func=cmd_logout)

    p = sub.add_parser("setup", help="point a client at the gateway")
    ssub = p.add_subparsers(dest="setup_command", required=True)
    c = ssub.add_parser("claude-code", help="print (or --write) the Claude Code settings for the gateway")
    c.add_argument("--gateway", required=True, help="the gateway URL")
    c.add_argument(
        "--format",
        required=True,
        choices=["messages", "bedrock", "vertex"],
        help="messages: ANTHROPIC_BASE_URL, the Anthropic Messages API; bedrock, vertex: that cloud's format",
    )
    c.add_argument("--region", help="AWS_REGION (bedrock, default us-east-1) or CLOUD_ML_REGION (vertex)")
    c.add_argument("--project", help="ANTHROPIC_VERTEX_PROJECT_ID (vertex; the gateway uses its own)")
    c.add_argument(
        "--write",
        action="store_true",
        help="merge into ~/.claude/settings.json (backup in settings.json.bak)",
    )
    c.set_defaults(func=cmd_setup_claude_code)

    p = sub.add_parser("sessions", help="list or revoke sign-in sessions (admin)")
    ssub = p.add_subparsers(dest="sessions_command", required=True)
    s = ssub.add_parser("list", help="list sessions, newest first")
    s.add_argument("--config", required=True)
    s.add_argument("--user", metavar="EMAIL", help="only this user's sessions")
    s.add_argument("--all", action="store_true", help="include revoked and expired sessions")
    s.set_defaults(func=cmd_sessions_list)
    s = ssub.add_parser("revoke", help="revoke a session, or all of a user's sessions")
    s.add_argument("--config", required=True)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", metavar="EMAIL", help="revoke every active session of this user")
    which.add_argument("--session", metavar="ID", help="revoke this session")
    s.add_argument("--reason", default="revoked by an administrator", help="recorded with the revocation")
    s.set_defaults(func=cmd_sessions_revoke)

    p = sub.add_parser("service-tokens", help="create, list or revoke tokens of service identities (admin)")
    vsub = p.add_subparsers(dest="service_tokens_command", required=True)
    v = vsub.add_parser(
        "create",
        help="create a token for a service identity; prints it once on stdout",
        description="The token is a gateway access token for NAME with GROUPS (what policies match), "
        "optionally limited to model PATTERNS, stored hashed, revocable, at most service_tokens.max_ttl.",
    )
    v.add_argument("--config", required=True)
    v.add_argument("--name", required=True, help="the service identity, such as ci-nightly")
    v.add_argument("--groups", required=True, help="comma-separated groups the policies admit it by")
    v.add_argument("--models", metavar="PATTERNS", help="comma-separated model patterns it is limited to")
    v.add_argument(
        "--ttl", type=int, required=True, help="lifetime in seconds (at most service_tokens.max_ttl)"
    )
    v.set_defaults(func=cmd_service_tokens_create)
    v = vsub.add_parser("list", help="list service tokens, newest first")
    v.add_argument("--config", required=True)
    v.add_argument("--name", help="only this service identity's tokens")
    v.add_argument("--all", action="store_true", help="include revoked and expired tokens")
    v.set_defaults(func=cmd_service_tokens_list)
    v = vsub.add_parser("revoke", help="revoke a service token, or all tokens of a service identity")
    v.add_argument("--config", required=True)
    which = v.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="token_id", help="revoke the token with this id")
    which.add_argument("--name", help="revoke every active token of this service identity")
    which.add_argument("--token", help="revoke this token (the token string itself)")
    v.add_argument("--reason", default="revoked by an administrator", help="recorded with the revocation")
    v.set_defaults(func=cmd_service_tokens_revoke)

    p = sub.add_parser(
        "spend-limits",
        help="set, list or delete spend caps at run time (admin)",
        description="Caps set here apply on top of the file's (every cap applies; the tightest "
        "blocks); every worker picks a change up within spend.sync_interval seconds. Audited.",
    )
    lsub = p.add_subparsers(dest="spend_limits_command", required=True)
    lset = lsub.add_parser("set", help="create or replace a cap")
    _add_limit_target(lset)
    lset.add_argument("--usd", required=True, help="the cap in dollars (0 blocks every billable request)")
    lset.set_defaults(func=cmd_spend_limits_set)
    ldel = lsub.add_parser("delete", help="delete a cap")
    _add_limit_target(ldel)
    ldel.set_defaults(func=cmd_spend_limits_delete)
    llist = lsub.add_parser("list", help="list the caps set at run time")
    llist.add_argument("--config", required=True)
    llist.add_argument("--json", action="store_true", help="one JSON object per line")
    llist.set_defaults(func=cmd_spend_limits_list)

    p = sub.add_parser("spend", help="where a user stands against the spend caps (admin)")
    psub = p.add_subparsers(dest="spend_command", required=True)
    show = psub.add_parser("show", help="a user's spend per period and what remains of each cap")
    show.add_argument("--config", required=True)
    show.add_argument("--user", required=True, metavar="EMAIL", help="the user (or service:NAME)")
    show.add_argument(
        "--groups", help="comma-separated groups (default: the groups of the user's latest session)"
    )
    show.add_argument("--json", action="store_true", help="the figures as JSON (exact amounts)")
    show.set_defaults(func=cmd_spend_show)

    from authz.store.reports import GROUPINGS

    p = sub.add_parser("usage", help="show recent usage rows, or their sums per user, group, model, day, ...")
    p.add_argument("--config", required=True)
    p.add_argument("--by", choices=list(GROUPINGS), help="sum requests, tokens, cost and denials per key")
    p.add_argument("--since", help="with --by: from this time (2026-11-01, 2026-11-01T09:30, 24h, 7d)")
    p.add_argument("--until", help="with --by: before this time (same forms)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="with --by")
    p.add_argument("--limit", type=int, default=20, help="without --by: how many recent rows")
    p.add_argument("--json", action="store_true", help="without --by: one JSON object per line")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("audit", help="show the audit log (sign-ins, revocations, admin actions)")
    p.add_argument("--config", required=True)
    p.add_argument("--since", help="from this time (2026-11-01, 2026-11-01T09:30, 24h, 7d)")
    p.add_argument("--kind", help="only events of this kind (callback, approval, admin_revoke, ...)")
    p.add_argument("--limit", type=int, default=1000, help="at most this many, the newest (default 1000)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None, *, deps: ClientDeps | None = None) -> int:
    """Entry point of the ``authz`` console script; ``deps`` replaces the real world in tests."""
    args = build_parser().parse_args(argv)
    args.deps = deps
    try:
        result: int = args.func(args)
        return result
    except GatewayError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
