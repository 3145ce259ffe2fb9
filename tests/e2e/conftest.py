"""End-to-end fixtures: the real Envoy binary in front of the gateway services, the upstream
emulator and PostgreSQL, all on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from authz.dev.devstack import Ports, Stack

BODY_CAP = 1024 * 1024


def shared_stack_config(emulator_url: str) -> dict[str, Any]:
    """Extra config merged over the development config for the shared e2e stack.

    A second Bedrock upstream, ``bedrock-badkey``, signs with a secret the emulator does not know:
    requests through it are refused upstream, which is how the tests provoke "the upstream
    rejected our signature". The developers' policy allows only some models, so a disallowed
    model can be asked for; the ``haiku-only`` group may use nothing but haiku.
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
            }
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
        ],
        "limits": {"max_request_body_bytes": BODY_CAP},
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


@pytest.fixture
def unique_user() -> str:
    """A fresh email per test so rows can be told apart."""
    return f"user-{time.monotonic_ns()}@example.com"
