"""Service identities end to end: `authz service-tokens` creates a token that works through Envoy
for the models it may use and not for others, revoking it is felt by both replicas within 2
seconds, an over-long lifetime is refused, and every step is audited and named in usage rows."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from authz.dev.devstack import Ports, Stack
from tests.e2e.conftest import fetch_rows, wait_for

pytestmark = pytest.mark.e2e

HAIKU = "/model/us.anthropic.claude-haiku-4-5-20251001-v1:0/invoke"
SONNET = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "x"}],
}


@pytest.fixture(scope="module")
def replica_b(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second replica of the shared stack: its own services and Envoy, the same PostgreSQL,
    signing key and issuer."""
    root = tmp_path_factory.mktemp("replica-b")
    (root / "keys").mkdir()
    shutil.copy2(stack.root / "keys" / "signing-dev-1.pem", root / "keys" / "signing-dev-1.pem")
    b = Stack(root=root, database_url=stack.database_url)
    b.ports = Ports.pick(b.workers)
    b.extra_config = {**stack.extra_config, "sessions": {"issuer": stack.envoy_url}}
    try:
        b.start()
        yield b
    finally:
        b.stop()


def authz(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``authz service-tokens ARGS --config <the stack's config>``."""
    assert stack.config_path is not None
    return subprocess.run(
        [sys.executable, "-m", "authz.cli", "service-tokens", *args, "--config", str(stack.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def call(url: str, token: str, path: str) -> httpx.Response:
    """One Bedrock-format call."""
    return httpx.post(f"{url}{path}", headers={"authorization": f"Bearer {token}"}, json=BODY, timeout=30)


def audit(dsn: str, kind: str, name: str) -> list[dict[str, Any]]:
    """Audit rows of ``kind`` about the service identity ``name``."""

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT * FROM audit_events WHERE kind = $1 ORDER BY id", kind)
        finally:
            await conn.close()
        return [dict(r) for r in rows if json.loads(r["detail"])["name"] == name]

    return asyncio.run(go())


def test_service_token_lifecycle_across_replicas(stack: Stack, replica_b: Stack) -> None:
    """create -> allowed models answer 200 and others 400 on both replicas; revoke -> both replicas
    answer 401 within 2 seconds; over-max TTL refused; audit rows and usage rows name the service."""
    name = f"ci-{time.monotonic_ns()}"
    refused = authz(stack, "create", "--name", name, "--groups", "developers", "--ttl", str(31 * 24 * 3600))
    assert refused.returncode == 2 and "service_tokens.max_ttl" in refused.stderr
    assert refused.stdout == ""

    created = authz(
        stack,
        "create",
        "--name",
        name,
        "--groups",
        "developers",
        "--models",
        "claude-haiku-*",
        "--ttl",
        "3600",
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.count(".") == 2 and "shown once" in created.stderr

    for url in (stack.envoy_url, replica_b.envoy_url):
        assert call(url, token, HAIKU).status_code == 200
        denied = call(url, token, SONNET)
        assert denied.status_code == 400
        assert "not allowed for this service token" in denied.json()["error"]["message"]

    listed = authz(stack, "list", "--name", name)
    assert listed.returncode == 0 and name in listed.stdout and "active" in listed.stdout

    revoked = authz(stack, "revoke", "--name", name, "--reason", "rotated")
    assert revoked.returncode == 0, revoked.stderr
    done = time.monotonic()
    for url in (stack.envoy_url, replica_b.envoy_url):
        wait_for(lambda url=url: call(url, token, HAIKU).status_code == 401, timeout=5, interval=0.05)
        elapsed = time.monotonic() - done
        assert elapsed < 2.0, f"{url} still accepted the revoked token {elapsed:.2f}s after the revocation"
        refusal = call(url, token, HAIKU)
        assert refusal.headers.get("x-should-retry") == "false"

    assert len(audit(stack.database_url, "service_token_create", name)) == 1
    (revocation,) = audit(stack.database_url, "service_token_revoke", name)
    assert revocation["reason"] == "rotated"
    # Two answered and two refused calls, one pair per replica (a revoked token's refusal, like a
    # revoked session's, records no identity: the token is no longer trusted).
    rows = wait_for(
        lambda: len(r := fetch_rows(stack.database_url, "service_identity = $1", name)) == 4 and r
    )
    assert (
        sorted((r["outcome"], r["status"]) for r in rows) == [("complete", 200)] * 2 + [("denied", 400)] * 2
    )
    assert all(r["user_sub"] == f"service:{name}" for r in rows)


def test_revoking_an_unknown_service_says_so(stack: Stack, tmp_path: Path) -> None:
    """Revoking a service identity with no active token exits 1 and says nothing matched."""
    result = authz(stack, "revoke", "--name", "no-such-service")
    assert result.returncode == 1 and "no active service token" in result.stderr
