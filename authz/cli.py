"""The ``authz`` command line.

``authz serve`` runs the gateway services, ``authz envoy`` runs (or prints) Envoy's configuration,
``authz run`` runs everything, ``authz token mint`` issues a token for local use and service
identities, and ``authz usage`` shows recent usage rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from authz.config import load
from authz.configtypes import GatewayConfig
from authz.errors import GatewayError
from backends.base import BackendError


def _config(args: argparse.Namespace) -> GatewayConfig:
    return load(args.config, os.environ)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the ext_authz/ext_proc gRPC services and the portal until SIGTERM."""
    from authz.service import serve

    serve(Path(args.config), dict(os.environ))
    return 0


def cmd_envoy(args: argparse.Namespace) -> int:
    """Print the rendered Envoy bootstrap, or run Envoy with it."""
    from authz.envoy_render import render_yaml

    config = _config(args)
    text = render_yaml(config)
    if args.render:
        sys.stdout.write(text)
        return 0
    from authz.runtime import envoy_binary

    out = Path(args.output or Path(".run") / "envoy.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    binary = envoy_binary()
    os.execv(binary, [binary, "-c", str(out), "--log-level", args.log_level])  # noqa: S606 - replaces this process by design
    return 0  # pragma: no cover - execv does not return


def cmd_run(args: argparse.Namespace) -> int:
    """Start everything (Postgres if needed, the emulator in dev mode, services, Envoy)."""
    from authz.devstack import run_forever

    return run_forever(
        config_path=Path(args.config) if args.config else None,
        dev=args.dev,
        root=Path(args.state_dir),
        environ=dict(os.environ),
    )


def cmd_token_mint(args: argparse.Namespace) -> int:
    """Print an access token for ``--user`` signed with the configured signing key."""
    from authz.tokens import KeySet, mint

    config = _config(args)
    if config.sessions.signing_key is None:
        raise GatewayError("sessions.signing_key is not configured: cannot mint tokens")
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
    """Print the most recent usage rows."""
    from authz.usage_report import print_recent

    config = _config(args)
    return asyncio.run(print_recent(config, limit=args.limit, as_json=args.json))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="authz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway services (ext_authz, ext_proc, portal)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("envoy", help="run Envoy with the rendered configuration")
    p.add_argument("--config", required=True)
    p.add_argument("--render", action="store_true", help="print the bootstrap YAML and exit")
    p.add_argument("--output", help="where to write the rendered bootstrap before starting Envoy")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_envoy)

    p = sub.add_parser(
        "run", help="run everything: services, Envoy (and in --dev mode Postgres and the emulator)"
    )
    p.add_argument("--config", help="gateway config; omit with --dev to generate a development one")
    p.add_argument("--dev", action="store_true", help="embedded Postgres, upstream emulator, generated keys")
    p.add_argument("--state-dir", default=".run", help="where --dev keeps its generated files and data")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("token", help="gateway access tokens")
    tsub = p.add_subparsers(dest="token_command", required=True)
    m = tsub.add_parser("mint", help="print an access token signed with the configured key")
    m.add_argument("--config", required=True)
    m.add_argument("--user", required=True, help="the user's email")
    m.add_argument("--groups", default="", help="comma-separated groups")
    m.add_argument("--sub", help="subject (defaults to the email)")
    m.add_argument("--sid", help="session id (defaults to a fresh one)")
    m.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    m.set_defaults(func=cmd_token_mint)

    p = sub.add_parser("usage", help="show recent usage rows")
    p.add_argument("--config", required=True)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_usage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``authz`` console script."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except (GatewayError, BackendError) as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
