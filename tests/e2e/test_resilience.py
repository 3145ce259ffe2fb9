"""Failures around the gateway: services down (fail closed) and PostgreSQL down (nothing lost)."""

from __future__ import annotations

import copy
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from authz.dev.devstack import Ports, Stack
from authz.dev.ports import free_port, free_ports
from authz.envoy.binary import envoy_binary
from authz.envoy.render import render
from authz.store.embedded import EmbeddedPostgres
from authz.supervisor import Proc, wait_http_ok
from tests.e2e.conftest import fetch_rows, rows_for_user, wait_for

pytestmark = pytest.mark.e2e

PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
STREAM_PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke-with-response-stream"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "x"}],
}


def call(url: str, token: str, path: str = PATH) -> httpx.Response:
    """One Bedrock-format call with the gateway token."""
    return httpx.post(f"{url}{path}", headers={"authorization": f"Bearer {token}"}, json=BODY, timeout=30)


@pytest.fixture
def own_stack(pg_dsn: str, tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own, for tests that stop parts of it."""
    s = Stack(root=tmp_path / "stack", database_url=pg_dsn)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_gateway_services_down_fails_closed(own_stack: Stack, unique_user: str) -> None:
    """With the services unreachable, Envoy refuses with a 5xx envelope and sends nothing upstream."""
    token = own_stack.mint(unique_user)
    assert call(own_stack.envoy_url, token).status_code == 200
    own_stack.emulator("DELETE", "/_emulator/requests")
    own_stack.stop_gateway()
    resp = call(own_stack.envoy_url, token)
    assert 500 <= resp.status_code < 600
    assert resp.json()["type"] == "error"
    assert own_stack.emulator("GET", "/_emulator/requests") == []
    own_stack.start_gateway()
    assert wait_for(lambda: call(own_stack.envoy_url, token).status_code == 200, timeout=15)


def test_ext_proc_down_fails_closed(own_stack: Stack, unique_user: str, tmp_path: Path) -> None:
    """With ext_authz up but ext_proc unreachable, the request is refused and never reaches the upstream."""
    assert own_stack.config is not None
    bootstrap: dict[str, Any] = copy.deepcopy(render(own_stack.config))
    envoy_port, admin_port = free_ports(2)
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = bootstrap["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = envoy_port
    # Point only the ext_proc filters at a cluster with nobody listening.
    dead = copy.deepcopy(
        next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "gateway_grpc")
    )
    dead["name"] = "dead_grpc"
    endpoint = dead["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = free_port()
    dead["load_assignment"]["endpoints"][0]["lb_endpoints"] = dead["load_assignment"]["endpoints"][0][
        "lb_endpoints"
    ][:1]
    bootstrap["static_resources"]["clusters"].append(dead)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        if f["name"] == "gateway.ext_proc":
            f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "dead_grpc"
    path = tmp_path / "envoy-dead-ext-proc.yaml"
    path.write_text(yaml.safe_dump(bootstrap), encoding="utf-8")
    proc = Proc(
        "envoy-dead-ext-proc",
        [envoy_binary(), "-c", str(path), "--base-id", str(admin_port), "--log-level", "warning"],
        tmp_path / "envoy.log",
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{admin_port}/ready", proc)
        own_stack.emulator("DELETE", "/_emulator/requests")
        resp = call(f"http://127.0.0.1:{envoy_port}", own_stack.mint(unique_user))
        assert 500 <= resp.status_code < 600, resp.text
        assert resp.json()["type"] == "error"
        assert own_stack.emulator("GET", "/_emulator/requests") == []
    finally:
        proc.stop()


def test_postgres_down_rows_spooled_then_replayed(tmp_path: Path, unique_user: str) -> None:
    """Requests keep flowing while PostgreSQL is down; their rows are spooled and replayed: none lost."""
    pg = EmbeddedPostgres()
    # Not under tmp_path: the server runs as an unprivileged user that must keep access to it.
    dsn = pg.start(Path(tempfile.mkdtemp(prefix="authz-pg-")) / "data")
    stack = Stack(
        root=tmp_path / "stack",
        database_url=dsn,
        extra_config={"store": {"replay_interval": 0.5, "connect_timeout": 1.0}},
    )
    stack.ports = Ports.pick(1)
    try:
        stack.start()
        token = stack.mint(unique_user)
        sent = 0
        for _ in range(5):
            assert call(stack.envoy_url, token).status_code == 200
            sent += 1
        wait_for(lambda: len(rows_for_user(dsn, unique_user)) == sent)
        pg.stop_server()
        statuses = []
        for i in range(10):
            path = STREAM_PATH if i % 2 else PATH
            statuses.append(call(stack.envoy_url, token, path).status_code)
            sent += 1
        assert statuses == [200] * 10
        spool = stack.root / "spool"
        wait_for(lambda: any(p.is_file() and p.stat().st_size for p in spool.rglob("*")), timeout=20)
        pg.start_again()
        rows = wait_for(lambda: (r := rows_for_user(dsn, unique_user)) and len(r) == sent and r, timeout=30)
        assert len({r["request_id"] for r in rows}) == sent
        assert all(r["outcome"] == "complete" for r in rows)
    finally:
        stack.stop()
        pg.stop()


def test_sigterm_lets_inflight_stream_finish(own_stack: Stack, unique_user: str) -> None:
    """On SIGTERM the services drain: a stream in flight completes and its usage row is written."""
    own_stack.emulator("POST", "/_emulator/state", {"deltas": 30, "delay": 0.05})
    token = own_stack.mint(unique_user)
    result: dict[str, Any] = {}

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{own_stack.envoy_url}{STREAM_PATH}",
            headers={"authorization": f"Bearer {token}"},
            json=BODY,
            timeout=30,
        ) as resp:
            result["status"] = resp.status_code
            result["body"] = resp.read()

    thread = threading.Thread(target=stream)
    thread.start()
    wait_for(lambda: own_stack.emulator("GET", "/_emulator/requests"), timeout=10, interval=0.02)
    own_stack.stop_gateway()
    thread.join(30)
    assert result["status"] == 200
    rows = fetch_rows(own_stack.database_url, "user_email = $1", unique_user)
    assert len(rows) == 1 and rows[0]["outcome"] == "complete"
    assert rows[0]["output_tokens"] == 40
