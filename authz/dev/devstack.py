"""The whole gateway on loopback: what ``make run`` (``python -m authz.dev``) and the end-to-end tests use.

Processes: the upstream emulator (standing in for Bedrock, Vertex and the Anthropic API), the
gateway services (``authz serve``), and Envoy with the rendered configuration. PostgreSQL comes from
``DATABASE_URL`` or an embedded throwaway server. Generated keys and the development config live
in the state directory (``.run/`` by default).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authz.config import load
from authz.configtypes import GatewayConfig
from authz.dev.ports import consecutive_free_ports, free_port
from authz.envoy.binary import envoy_binary
from authz.envoy.render import write_bootstrap
from authz.signin.secretbox import generate_key
from authz.signin.tokens import KeySet, generate_signing_key, mint
from authz.supervisor import Proc, wait_http_ok, wait_port
from backends.emulator.google import generate_service_account_key
from backends.emulator.state import (
    DEFAULT_PROJECT,
    TEST_ACCESS_KEY_ID,
    TEST_ANTHROPIC_API_KEY,
    TEST_SECRET_ACCESS_KEY,
)

DEV_USER = "dev@example.com"
# Loopback-only development IdP credentials, printed to the developer on purpose.
DEV_PASSWORD = "dev"  # noqa: S105
DEV_CLIENT_ID = "claude-gateway-dev"
DEV_CLIENT_SECRET = "dev-client-secret"  # noqa: S105
_REPO = Path(__file__).resolve().parents[2]
DEV_GROUPS = ("developers",)
BEDROCK_REGION = "us-east-1"
VERTEX_REGION = "us-east5"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Ports:
    """Every loopback port the stack uses."""

    envoy: int
    admin: int
    grpc: int
    portal: int
    emulator: int
    idp: int = 0

    @classmethod
    def pick(cls, workers: int, preferred: bool = False) -> Ports:
        """Free ports; with ``preferred``, the documented defaults when they are free."""

        def want(port: int) -> int:
            if preferred:
                with socket.socket() as sock:
                    try:
                        sock.bind(("127.0.0.1", port))
                        return port
                    except OSError:
                        pass
            return free_port()

        grpc = 9001 if preferred and workers == 1 and want(9001) == 9001 else consecutive_free_ports(workers)
        return cls(
            envoy=want(8080),
            admin=want(9901),
            grpc=grpc,
            portal=want(9100),
            emulator=want(18081),
            idp=want(18082),
        )


@dataclass
class Stack:
    """Emulator, gateway services and Envoy, started and stopped together."""

    root: Path
    database_url: str
    workers: int = 1
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    preferred_ports: bool = False
    ports: Ports | None = None
    procs: dict[str, Proc] = field(default_factory=dict)
    config_path: Path | None = None
    config: GatewayConfig | None = None
    # `make run` also starts a development OpenID Provider so `authz login` works locally.
    dev_idp: bool = False
    # Extra command-line arguments for the emulator, e.g. ("--no-verify",) for the benchmark.
    emulator_args: tuple[str, ...] = ()

    @property
    def envoy_url(self) -> str:
        """Where clients connect: https when ``extra_config`` gives Envoy's listener a certificate."""
        assert self.ports is not None
        envoy = self.extra_config.get("listen", {}).get("envoy", {})
        scheme = "https" if isinstance(envoy, Mapping) and envoy.get("tls") else "http"
        return f"{scheme}://127.0.0.1:{self.ports.envoy}"

    @property
    def emulator_url(self) -> str:
        """The upstream emulator's base URL."""
        assert self.ports is not None
        return f"http://127.0.0.1:{self.ports.emulator}"

    def start(self) -> None:
        """Start every process and wait until each is ready."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports = self.ports or Ports.pick(self.workers, self.preferred_ports)
        self.start_emulator()
        if self.dev_idp:
            self.start_dev_idp()
        self.config_path = self.write_config()
        self.config = load(self.config_path, os.environ)
        self.start_gateway()
        self.start_envoy()

    def start_emulator(self) -> None:
        """Start the upstream emulator and register the development service account with it."""
        assert self.ports is not None
        sa_path = self.root / "keys" / "vertex-service-account.json"
        sa_path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh key each start: its token_uri must name this run's emulator port.
        generate_service_account_key(
            sa_path, token_uri=f"{self.emulator_url}/token", project_id=DEFAULT_PROJECT
        )
        argv = [
            sys.executable,
            "-m",
            "backends.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports.emulator),
            *self.emulator_args,
        ]
        proc = Proc("emulator", argv, self.root / "logs" / "emulator.log")
        self.procs["emulator"] = proc
        wait_port("127.0.0.1", self.ports.emulator, proc)
        self.emulator("POST", "/_emulator/state", {"service_account_keys": [str(sa_path)]})

    @property
    def idp_url(self) -> str:
        """The development IdP's issuer."""
        assert self.ports is not None
        return f"http://127.0.0.1:{self.ports.idp}"

    def start_dev_idp(self) -> None:
        """Start the development OpenID Provider (npm oidc-provider, in tests/idp) with one user.

        Skipped with a note when Node.js or the IdP's packages are missing (`make run` installs
        them); the gateway then runs without sign-in, and `authz token mint` still works.
        """
        assert self.ports is not None
        server = _REPO / "tests" / "idp" / "server.mjs"
        node = shutil.which("node")
        if node is None or not (server.parent / "node_modules" / "oidc-provider").is_dir():
            print(
                "note: no development IdP (needs Node.js and `npm ci` in tests/idp); sign-in is off",
                flush=True,
            )
            self.dev_idp = False
            return
        if not self.ports.idp:
            self.ports.idp = free_port()
        idp_config = {
            "clients": [
                {
                    "client_id": DEV_CLIENT_ID,
                    "client_secret": DEV_CLIENT_SECRET,
                    "redirect_uris": [f"{self.envoy_url}/oauth/callback"],
                    "grant_types": ["authorization_code", "refresh_token"],
                    "response_types": ["code"],
                    "token_endpoint_auth_method": "client_secret_basic",
                    "backchannel_logout_uri": f"{self.envoy_url}/oauth/backchannel-logout",
                    "backchannel_logout_session_required": True,
                }
            ],
            "accounts": {
                "dev": {
                    "email": DEV_USER,
                    "email_verified": True,
                    "groups": list(DEV_GROUPS),
                    "password": DEV_PASSWORD,
                }
            },
        }
        path = self.root / "idp.json"
        path.write_text(json.dumps(idp_config), encoding="utf-8")
        argv = [
            node,
            str(server),
            "--port",
            str(self.ports.idp),
            "--issuer",
            self.idp_url,
            "--config",
            str(path),
        ]
        proc = Proc("idp", argv, self.root / "logs" / "idp.log")
        self.procs["idp"] = proc
        wait_port("127.0.0.1", self.ports.idp, proc, timeout=60)

    def write_config(self) -> Path:
        """Write the development gateway config (and its signing key) into the state directory."""
        assert self.ports is not None
        keys = self.root / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        key_path = keys / "signing-dev-1.pem"
        if not key_path.exists():
            key = generate_signing_key("dev-1")
            key_path.write_text(key.private_key or "", encoding="utf-8")
            key_path.chmod(0o600)
        sa_path = keys / "vertex-service-account.json"
        raw: dict[str, Any] = {
            "listen": {
                "envoy": {"address": "127.0.0.1", "port": self.ports.envoy},
                "envoy_admin": {"address": "127.0.0.1", "port": self.ports.admin},
                "grpc": {"address": "127.0.0.1", "port": self.ports.grpc},
                "portal": {"address": "127.0.0.1", "port": self.ports.portal},
            },
            "workers": self.workers,
            "sessions": {
                "issuer": self.envoy_url,
                "audience": "claude-gateway",
                "signing_key": {"kid": "dev-1", "algorithm": "ES256", "private_key": f"${{file:{key_path}}}"},
            },
            "store": {"url": self.database_url, "spool_dir": str(self.root / "spool")},
            # What the portal publishes (and, over https, whether its cookies are __Host-).
            "portal": {"public_url": self.envoy_url},
            "upstreams": {
                "bedrock-dev": {
                    "kind": "bedrock",
                    "region": BEDROCK_REGION,
                    "base_url": self.emulator_url,
                    "credentials": {
                        "source": "static",
                        "access_key_id": TEST_ACCESS_KEY_ID,
                        "secret_access_key": TEST_SECRET_ACCESS_KEY,
                    },
                },
                "vertex-dev": {
                    "kind": "vertex",
                    "region": VERTEX_REGION,
                    "project": DEFAULT_PROJECT,
                    "base_url": self.emulator_url,
                    "credentials": {"source": "service_account_file", "path": str(sa_path)},
                },
                "anthropic-dev": {
                    "kind": "anthropic",
                    "base_url": self.emulator_url,
                    "credentials": {"api_key": TEST_ANTHROPIC_API_KEY},
                },
            },
            "policies": [
                {
                    "name": "developers",
                    "groups": list(DEV_GROUPS),
                    "models": ["claude-*"],
                    "upstreams": ["bedrock-dev", "vertex-dev"],
                }
            ],
        }
        if self.dev_idp:
            box_key = keys / "session-encryption.key"
            if not box_key.exists():
                box_key.write_text(generate_key(), encoding="utf-8")
                box_key.chmod(0o600)
            raw["sessions"]["encryption_key"] = f"${{file:{box_key}}}"
            raw["oidc"] = {
                "issuer": self.idp_url,
                "client_id": DEV_CLIENT_ID,
                "client_secret": DEV_CLIENT_SECRET,
                "allowed_groups": list(DEV_GROUPS),
            }
        raw = _merge(raw, self.extra_config)
        path = self.root / "gateway.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    def start_gateway(self) -> None:
        """Start ``authz serve`` and wait for the gRPC ports and the portal."""
        assert self.ports is not None and self.config_path is not None
        argv = [
            sys.executable,
            "-m",
            "authz.cli",
            "serve",
            "--config",
            str(self.config_path),
            "--state-dir",
            str(self.root),
        ]
        proc = Proc("gateway", argv, self.root / "logs" / "gateway.log")
        self.procs["gateway"] = proc
        for i in range(self.workers):
            wait_port("127.0.0.1", self.ports.grpc + i, proc)
        wait_http_ok(f"http://127.0.0.1:{self.ports.portal}/healthz", proc)

    def stop_gateway(self, sig: int = signal.SIGTERM) -> None:
        """Stop the gateway services (for fail-closed and drain tests)."""
        proc = self.procs.pop("gateway", None)
        if proc is not None:
            proc.stop(sig)

    def start_envoy(self) -> None:
        """Render Envoy's bootstrap and start Envoy; wait until it reports ready."""
        assert self.ports is not None and self.config is not None
        path = write_bootstrap(self.config, self.root / "envoy.yaml")
        argv = [
            envoy_binary(),
            "-c",
            str(path),
            "--log-level",
            os.environ.get("GATEWAY_ENVOY_LOG_LEVEL", "warning"),
            "--base-id",
            str(self.ports.admin),
            "--concurrency",
            "2",
        ]
        proc = Proc("envoy", argv, self.root / "logs" / "envoy.log")
        self.procs["envoy"] = proc
        wait_http_ok(f"http://127.0.0.1:{self.ports.admin}/ready", proc)

    def stop(self) -> None:
        """Stop everything, Envoy first so no new requests arrive."""
        for name in ("envoy", "gateway", "emulator", "idp"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()

    def mint(
        self, email: str = DEV_USER, groups: tuple[str, ...] = DEV_GROUPS, ttl: int = 3600, **kw: Any
    ) -> str:
        """A gateway access token signed with the stack's key."""
        assert self.config is not None
        keyset = KeySet.from_config(self.config.sessions)
        return mint(
            keyset,
            issuer=self.config.sessions.issuer,
            audience=self.config.sessions.audience,
            sub=kw.get("sub", email),
            email=email,
            groups=groups,
            sid=kw.get("sid", f"dev-{os.urandom(6).hex()}"),
            ttl=ttl,
            now=kw.get("now", time.time()),
        )

    def emulator(self, method: str, path: str, body: Any = None) -> Any:
        """Call one of the emulator's control endpoints and return the decoded JSON."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - loopback URL we built
            f"{self.emulator_url}{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            text = resp.read()
        return json.loads(text) if text else None


def settings_text(stack: Stack, token: str) -> str:
    """How to point Claude Code (and the SDKs) at the running stack."""
    assert stack.config_path is not None
    authz = Path(sys.executable).parent / "authz"
    groups = ",".join(DEV_GROUPS)
    helper = f"{authz} token mint --config {stack.config_path} --user {DEV_USER} --groups {groups} --ttl 900"
    settings = json.dumps({"apiKeyHelper": helper}, indent=2)
    return f"""
Claude gateway is running on {stack.envoy_url}

{_native_text(stack)}Claude Code, Anthropic Messages format, with the apiKeyHelper below
(unset ANTHROPIC_AUTH_TOKEN and ANTHROPIC_API_KEY, which would replace it):
  export ANTHROPIC_BASE_URL={stack.envoy_url}

Claude Code, Bedrock format (no AWS credentials needed; unset AWS_BEARER_TOKEN_BEDROCK):
  export CLAUDE_CODE_USE_BEDROCK=1
  export ANTHROPIC_BEDROCK_BASE_URL={stack.envoy_url}
  export CLAUDE_CODE_SKIP_BEDROCK_AUTH=1
  export AWS_REGION={BEDROCK_REGION}

Claude Code, Vertex format:
  export CLAUDE_CODE_USE_VERTEX=1
  export ANTHROPIC_VERTEX_BASE_URL={stack.envoy_url}/v1
  export CLAUDE_CODE_SKIP_VERTEX_AUTH=1
  export ANTHROPIC_VERTEX_PROJECT_ID={DEFAULT_PROJECT}
  export CLOUD_ML_REGION={VERTEX_REGION}

Claude Code, Messages API (the gateway translates for the policy's first upstream, Bedrock here):
  export ANTHROPIC_BASE_URL={stack.envoy_url}

~/.claude/settings.json (the helper prints a fresh 15-minute token for {DEV_USER}):
{settings}

A token for {DEV_USER} (groups: {", ".join(DEV_GROUPS)}), valid for one hour:
  {token}

{_signin_text(stack, authz)}Recent usage:  {authz} usage --config {stack.config_path}
Logs:          {stack.root / "logs"}
Stop with Ctrl-C.
"""


def _native_text(stack: Stack) -> str:
    """Claude Code's own gateway sign-in, the preferred way in: shown when sign-in is on."""
    if not stack.dev_idp:
        return ""
    return f"""Claude Code's own gateway sign-in (preferred: no apiKeyHelper, managed settings applied):
  in Claude Code run /login, choose "Cloud gateway" and enter {stack.envoy_url}
  (the development IdP's user is {DEV_USER}, password {DEV_PASSWORD}; plain http is accepted on
  loopback only, so a gateway on another host needs listen.envoy.tls or an https terminator)

"""


def _signin_text(stack: Stack, authz: Path) -> str:
    if not stack.dev_idp:
        return ""
    return f"""Sign in through the development IdP at {stack.idp_url} ({DEV_USER}, password {DEV_PASSWORD}):
  {authz} login --gateway {stack.envoy_url}
  then use `{authz} token --gateway {stack.envoy_url}` as the apiKeyHelper instead.

"""


@contextlib.contextmanager
def database(root: Path, environ: Mapping[str, str]) -> Iterator[str]:
    """``DATABASE_URL`` when set, else an embedded throwaway PostgreSQL in ``root``."""
    url = environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from authz.store.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres()
    dsn = pg.start(root / "postgres")
    try:
        yield dsn
    finally:
        pg.stop()


def run_forever(*, root: Path, environ: Mapping[str, str]) -> int:
    """``make run``: start the development stack, print how to use it, and wait for Ctrl-C or SIGTERM."""
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    root = root.resolve()
    with database(root, environ) as dsn:
        stack = Stack(root=root, database_url=dsn, preferred_ports=True, dev_idp=True)
        try:
            stack.start()
            print(settings_text(stack, stack.mint()), flush=True)
            while not stopping and all(p.alive() for p in stack.procs.values()):
                time.sleep(0.5)
        finally:
            stack.stop()
    return 0
