"""``authz doctor --config F``: what a first deployment gets wrong, checked one line at a time.

Each check prints ``ok`` or ``FAIL``, the field it concerns, what it found, and for a failure what
to do. The checks touch what the gateway will touch: the config file and the secrets it
references, the key material, PostgreSQL (reachable, migrated), the IdP's discovery document,
each upstream's credential (fetched for real: an STS AssumeRole, a Google token), and Envoy's
rendered bootstrap (validated by the real Envoy binary). Nothing is written anywhere.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from authz.config import load
from authz.configtypes import GatewayConfig
from authz.errors import ConfigError, GatewayError, StoreError

# How long each network check may take before it counts as failed.
CHECK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Finding:
    """The result of one check: ``field`` is the configuration key it concerns."""

    name: str
    ok: bool
    field: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """One line for the terminal."""
        mark = "ok  " if self.ok else "FAIL"
        text = f"{mark} {self.name} [{self.field}]: {self.detail}"
        if not self.ok and self.fix:
            text += f" -> fix: {self.fix}"
        return text


def _fail(name: str, field: str, detail: str, fix: str) -> Finding:
    return Finding(name, False, field, detail, fix)


def check_config(path: Path, environ: Mapping[str, str]) -> tuple[Finding, GatewayConfig | None]:
    """The file loads, every ``${VAR}`` and ``${file:...}`` resolves, every value validates."""
    try:
        config = load(path, environ)
    except ConfigError as exc:
        return (
            _fail(
                "config",
                exc.field or str(path),
                exc.problem,
                "correct that key (docs/configuration.md lists every key with its default)",
            ),
            None,
        )
    return Finding("config", True, str(path), "loads and validates"), config


def check_keys(config: GatewayConfig) -> list[Finding]:
    """The session keys, the encryption key and the IdP client key parse."""
    from authz.signin.secretbox import SecretBox, SecretBoxError
    from authz.signin.tokens import KeySet

    findings: list[Finding] = []
    try:
        keyset = KeySet.from_config(config.sessions)
    except ConfigError as exc:
        findings.append(
            _fail(
                "session keys",
                exc.field,
                exc.problem,
                "give an unencrypted PEM key of the configured algorithm (ES256: P-256; EdDSA: Ed25519)",
            )
        )
    else:
        kid = keyset.signing_kid
        detail = f"signing kid {kid}" if kid else "verify keys only"
        findings.append(
            Finding(
                "session keys",
                True,
                "sessions.signing_key",
                f"{detail}; {len(keyset.kids())} key(s) verify tokens",
            )
        )
    if config.sessions.encryption_key:
        try:
            SecretBox(config.sessions.encryption_key)
        except SecretBoxError as exc:
            findings.append(
                _fail(
                    "encryption key",
                    "sessions.encryption_key",
                    str(exc),
                    "generate one (32 random bytes, base64url)",
                )
            )
        else:
            findings.append(Finding("encryption key", True, "sessions.encryption_key", "parses"))
    if config.oidc is not None and config.oidc.client_auth_method == "private_key_jwt":
        from authz.signin.oidc import OidcClient

        try:
            OidcClient(config.oidc)
        except ConfigError as exc:
            findings.append(
                _fail("IdP client key", exc.field, exc.problem, "give the client's PEM private key")
            )
        else:
            findings.append(Finding("IdP client key", True, "oidc.private_key", "parses"))
    return findings


async def check_database(config: GatewayConfig) -> list[Finding]:
    """PostgreSQL answers at ``store.url`` and carries every migration this release ships."""
    from authz.store.db import connect, redact_url
    from authz.store.migrate import migrations

    field = "store.url"
    if not config.store.url:
        return [_fail("postgresql", field, "is empty", "set store.url (often ${DATABASE_URL})")]
    try:
        conn = await connect(config.store.url, timeout=min(config.store.connect_timeout, CHECK_TIMEOUT))
    except StoreError as exc:
        return [
            _fail(
                "postgresql",
                field,
                str(exc),
                "check the host, port, database, user and password in store.url, and that the "
                "server accepts connections from this host (pg_hba.conf, firewall)",
            )
        ]
    try:
        applied: set[str] = set()
        try:
            if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
                applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        except Exception as exc:  # asyncpg's errors, whose text says what went wrong
            return [
                _fail(
                    "postgresql",
                    field,
                    f"cannot read schema_migrations: {exc}",
                    "grant the gateway's role SELECT on it",
                )
            ]
    finally:
        await conn.close()
    found = [Finding("postgresql", True, field, f"reachable at {redact_url(config.store.url)}")]
    missing = [version for version, _ in migrations() if version not in applied]
    if missing:
        found.append(
            _fail(
                "migrations",
                field,
                f"{len(missing)} not applied ({', '.join(missing)})",
                "start `authz serve` once with a role that may CREATE in the database (it migrates at "
                "start-up), or apply authz/store/migrations/*.sql in order",
            )
        )
    else:
        found.append(Finding("migrations", True, field, "schema up to date"))
    return found


async def check_idp(config: GatewayConfig) -> list[Finding]:
    """The IdP serves a discovery document whose issuer is ``oidc.issuer``, and its keys."""
    if config.oidc is None:
        return [Finding("IdP discovery", True, "oidc", "not configured (sign-in is off)")]
    from authz.signin.oidc import OidcClient, OidcError

    issuer = config.oidc.issuer
    try:
        client = OidcClient(config.oidc)
    except ConfigError:
        return []  # reported by check_keys
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await client.discover()
    except TimeoutError:
        return [
            _fail(
                "IdP discovery",
                "oidc.issuer",
                f"{issuer} did not answer within {CHECK_TIMEOUT:g}s",
                "check the URL and that this host can reach it",
            )
        ]
    except OidcError as exc:
        return [
            _fail(
                "IdP discovery",
                "oidc.issuer",
                str(exc),
                "set oidc.issuer to the exact issuer the IdP publishes (the URL in front of its "
                "/.well-known/openid-configuration, with no extra path or trailing slash)",
            )
        ]
    finally:
        await client.aclose()
    return [Finding("IdP discovery", True, "oidc.issuer", f"{issuer} publishes its metadata and keys")]


async def check_upstreams(config: GatewayConfig) -> list[Finding]:
    """Each upstream's credential can be obtained now."""
    from authz.ops.health import check_upstream
    from backends.errors import BackendError
    from backends.kinds import KINDS

    findings: list[Finding] = []
    for name, up in config.upstreams:
        field = f"upstreams.{name}.credentials"
        try:
            upstream = KINDS[up.kind].build(name, up.settings)
        except BackendError as exc:
            findings.append(
                _fail(f"upstream {name}", f"upstreams.{name}", str(exc), "correct the upstream's settings")
            )
            continue
        try:
            result = await check_upstream(upstream, timeout=CHECK_TIMEOUT)
        finally:
            await upstream.aclose()
        if result.ok:
            findings.append(Finding(f"upstream {name}", True, field, f"{up.kind} {result.detail}"))
        else:
            findings.append(
                _fail(
                    f"upstream {name}", field, result.detail, _credential_fix(up.kind, _source(up.settings))
                )
            )
    return findings


def _source(settings: object) -> str:
    credentials = getattr(settings, "credentials", None)
    return str(getattr(credentials, "source", ""))


def _credential_fix(kind: str, source: str) -> str:
    return {
        ("bedrock", "default"): "give this host AWS credentials (instance or pod role, AWS_* variables, "
        "a shared profile), or set credentials.source static or assume_role",
        (
            "bedrock",
            "static",
        ): "check access_key_id and secret_access_key (and session_token for temporary keys)",
        ("bedrock", "assume_role"): "check role_arn, and that the role trusts this host's principal for "
        "sts:AssumeRole, sts:SetSourceIdentity and sts:TagSession",
        ("vertex", "adc"): "give this host Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, "
        "workload identity, the metadata server) or set credentials.source service_account_file",
        ("vertex", "default"): "give this host Application Default Credentials or set credentials.source "
        "service_account_file",
        (
            "vertex",
            "service_account_file",
        ): "check credentials.path names a readable service-account JSON key",
    }.get((kind, source), "check the upstream's credentials section")


def check_envoy(config: GatewayConfig) -> Finding:
    """Envoy's rendered bootstrap passes ``envoy --mode validate`` with the real binary."""
    from authz.envoy.binary import envoy_binary
    from authz.envoy.render import write_bootstrap

    with tempfile.TemporaryDirectory() as tmp:
        try:
            # With listen.envoy.tls the listener's SDS file is written beside the bootstrap.
            path = write_bootstrap(config, Path(tmp) / "envoy.yaml")
            binary = envoy_binary()
        except (ConfigError, GatewayError) as exc:
            field = exc.field if isinstance(exc, ConfigError) else "listen"
            return _fail("envoy config", field, str(exc), "correct the configuration Envoy is rendered from")
        result = subprocess.run(  # noqa: S603 - the Envoy binary on a file we wrote
            [binary, "--mode", "validate", "-c", str(path), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return _fail(
            "envoy config",
            "listen",
            f"envoy --mode validate failed: {last[0]}",
            "see the message; check listen addresses and upstream settings",
        )
    return Finding("envoy config", True, "listen", f"validated by {binary}")


async def run_checks(path: Path, environ: Mapping[str, str], *, envoy: bool = True) -> list[Finding]:
    """Every check, in the order a deployment depends on them; stops after a config that does not load."""
    finding, config = check_config(path, environ)
    if config is None:
        return [finding]
    findings = [finding, *check_keys(config)]
    findings += await check_database(config)
    findings += await check_idp(config)
    findings += await check_upstreams(config)
    if envoy:
        findings.append(await asyncio.to_thread(check_envoy, config))
    return findings


def doctor(path: Path, environ: Mapping[str, str], out: TextIO, *, envoy: bool = True) -> int:
    """Print one line per check; 0 when all pass, 1 otherwise."""
    findings = asyncio.run(run_checks(path, environ, envoy=envoy))
    for finding in findings:
        print(finding.line(), file=out, flush=True)
    failed = sum(not f.ok for f in findings)
    if failed:
        print(f"{failed} of {len(findings)} checks failed", file=out)
        return 1
    print(f"all {len(findings)} checks passed", file=out)
    return 0
