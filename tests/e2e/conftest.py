"""End-to-end fixtures: the real Envoy binary in front of the gateway services, the upstream
emulator and PostgreSQL, all on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from authz.dev.devstack import Ports, Stack
from backends.emulator import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY

BODY_CAP = 1024 * 1024
# Groups whose policies put a Vertex or an Anthropic API upstream first (Messages-format requests).
VERTEX_GROUP = "messages-vertex"
ANTHROPIC_GROUP = "messages-anthropic"
PING_INTERVAL = 0.25
# Failover (tests/e2e/test_failover.py): a second Bedrock upstream on the emulator signing with its
# own key, and upstreams at ports that refuse connections.
ALT_ACCESS_KEY_ID = "AKIDEMULATORALT00002"
ALT_SECRET_ACCESS_KEY = "emulatorSecretAccessKey/alternate00002"
FAILOVER_GROUPS = {
    "failover-bedrock": ["bedrock-dev", "bedrock-alt"],
    "failover-refused": ["bedrock-down", "bedrock-dev"],
    "failover-dead": ["bedrock-down", "bedrock-down-too"],
    "failover-unsignable": ["bedrock-norole", "bedrock-dev"],
}
# A role the emulator's STS refuses to let the gateway assume.
UNTRUSTED_ROLE = "arn:aws:iam::123456789012:role/NotTrustingTheGateway"
# Sockets bound and never listening: a connection to their port is refused, and nothing else can
# take the port while the session lasts.
_REFUSING: list[socket.socket] = []


@pytest.fixture(scope="session", autouse=True)
def _refusing_ports() -> Iterator[None]:
    """Release the refusing ports once every stack of the session has stopped."""
    yield
    while _REFUSING:
        _REFUSING.pop().close()


def refusing_port() -> int:
    """A loopback port that refuses connections for the rest of the session."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _REFUSING.append(sock)
    return int(sock.getsockname()[1])


def _static_bedrock(base_url: str, key_id: str, secret: str) -> dict[str, Any]:
    return {
        "kind": "bedrock",
        "region": "us-east-1",
        "base_url": base_url,
        "credentials": {"source": "static", "access_key_id": key_id, "secret_access_key": secret},
    }


def shared_stack_config(emulator_url: str) -> dict[str, Any]:
    """Extra config merged over the development config for the shared e2e stack.

    A second Bedrock upstream, ``bedrock-badkey``, signs with a secret the emulator does not know:
    requests through it are refused upstream, which is how the tests provoke "the upstream
    rejected our signature". The developers' policy allows only some models, so a disallowed
    model can be asked for; the ``haiku-only`` group may use nothing but haiku. Messages-format
    requests go to a policy's first upstream: the developers' is Bedrock, and two more groups are
    served by the Vertex and the Anthropic API upstreams; the developers' and the Vertex group's
    fail over to the other kind. Translated streams write keep-alives after a short silence, so a
    test can see them. The failover groups' policies list a second Bedrock upstream with a key of
    its own, upstreams whose ports refuse connections, and one whose role cannot be assumed.
    """
    return {
        "upstreams": {
            "bedrock-badkey": {
                "kind": "bedrock",
                "region": "us-east-1",
                "base_url": emulator_url,
                "credentials": {
                    "source": "static",
                    "access_key_id": "AKIDEMULATOR0000001",
                    "secret_access_key": "not-the-secret-the-emulator-knows",
                },
            },
            "bedrock-alt": _static_bedrock(emulator_url, ALT_ACCESS_KEY_ID, ALT_SECRET_ACCESS_KEY),
            "bedrock-down": _static_bedrock(
                f"http://127.0.0.1:{refusing_port()}", TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
            ),
            "bedrock-down-too": _static_bedrock(
                f"http://127.0.0.1:{refusing_port()}", TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
            ),
            "bedrock-norole": {
                "kind": "bedrock",
                "region": "us-east-1",
                "base_url": emulator_url,
                "credentials": {
                    "source": "assume_role",
                    "role_arn": UNTRUSTED_ROLE,
                    "access_key_id": TEST_ACCESS_KEY_ID,
                    "secret_access_key": TEST_SECRET_ACCESS_KEY,
                    "sts_endpoint_url": emulator_url,
                    "sts_region": "us-east-1",
                },
            },
        },
        "policies": [
            {
                "name": "developers",
                "groups": ["developers"],
                "models": ["claude-sonnet-*", "claude-haiku-*", "claude-opus-5-5*"],
                "upstreams": ["bedrock-dev", "vertex-dev"],
            },
            {"name": "badkey", "groups": ["badkey"], "models": ["claude-*"], "upstreams": ["bedrock-badkey"]},
            {
                "name": "haiku-only",
                "groups": ["haiku-only"],
                "models": ["claude-haiku-*"],
                "upstreams": ["bedrock-dev", "vertex-dev"],
            },
            {
                "name": "messages-vertex",
                "groups": [VERTEX_GROUP],
                "models": ["claude-sonnet-*", "claude-haiku-*"],
                "upstreams": ["vertex-dev", "bedrock-dev"],
            },
            {
                "name": "messages-anthropic",
                "groups": [ANTHROPIC_GROUP],
                "models": ["claude-sonnet-*", "claude-haiku-*"],
                "upstreams": ["anthropic-dev"],
            },
            *(
                {"name": group, "groups": [group], "models": ["claude-*"], "upstreams": upstreams}
                for group, upstreams in FAILOVER_GROUPS.items()
            ),
        ],
        "limits": {"max_request_body_bytes": BODY_CAP},
        "translate": {"ping_interval": PING_INTERVAL},
    }


@pytest.fixture(scope="session")
def stack(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack shared by the tests that do not disturb it."""
    s = Stack(root=tmp_path_factory.mktemp("stack"), database_url=pg_dsn)
    s.ports = Ports.pick(s.workers)
    s.extra_config = shared_stack_config(s.emulator_url)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def emulator_reset(stack: Stack) -> Iterator[Stack]:
    """Reset the emulator's scenario and recorded requests before and after a test."""
    stack.emulator("POST", "/_emulator/state", {"reset": True})
    stack.emulator("DELETE", "/_emulator/requests")
    yield stack
    stack.emulator("POST", "/_emulator/state", {"reset": True})


def fetch_rows(dsn: str, where: str = "true", *args: Any) -> list[dict[str, Any]]:
    """Usage rows matching ``where`` (SQL with $n parameters)."""

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(f"SELECT * FROM usage_events WHERE {where} ORDER BY started_at", *args)
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(go())


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def row_for(dsn: str, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait for the usage row of ``request_id``."""
    rows = wait_for(lambda: fetch_rows(dsn, "request_id = $1", request_id), timeout)
    return rows[0]  # type: ignore[no-any-return]


def rows_for_user(dsn: str, email: str) -> list[dict[str, Any]]:
    """Every usage row of ``email``."""
    return fetch_rows(dsn, "user_email = $1", email)


def single_row(stack: Stack, email: str) -> dict[str, Any]:
    """The one usage row of ``email``, once written."""
    rows = wait_for(lambda: rows_for_user(stack.database_url, email))
    assert len(rows) == 1, rows
    return rows[0]  # type: ignore[no-any-return]


def assert_exact_usage(row: dict[str, Any], usage: dict[str, int]) -> None:
    """The row carries exactly the counts the emulator reported (``usage``, in its own keys)."""
    assert row["input_tokens"] == usage["input_tokens"]
    assert row["output_tokens"] == usage["output_tokens"]
    assert row["cache_write_tokens"] == usage["cache_creation_input_tokens"]
    assert row["cache_write_5m_tokens"] == usage["cache_creation_5m_input_tokens"]
    assert row["cache_write_1h_tokens"] == usage["cache_creation_1h_input_tokens"]
    assert row["cache_read_tokens"] == usage["cache_read_input_tokens"]
    assert row["output_tokens_estimated"] is False


@pytest.fixture
def unique_user() -> str:
    """A fresh email per test so rows can be told apart."""
    return f"user-{time.monotonic_ns()}@example.com"
