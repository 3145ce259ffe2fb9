"""Header hygiene through the real Envoy: malformed and ambiguous headers are refused before any
upstream, what Envoy's HTTP/1 parser normalises reaches the upstream only in a harmless form, and
the client's forwarding headers never reach a cloud."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from authz.dev.devstack import Stack
from tests.e2e.conftest import fetch_rows, rows_for_user, wait_for

pytestmark = pytest.mark.e2e

PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
BODY = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
    }
).encode()


def raw_request(stack: Stack, header_lines: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request with the given raw header lines; the status and the body."""
    assert stack.ports is not None
    head = f"POST {PATH} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
    head += f"content-length: {len(BODY)}\r\nconnection: close\r\n"
    with socket.create_connection(("127.0.0.1", stack.ports.envoy), timeout=10) as sock:
        sock.sendall(head.encode() + header_lines + b"\r\n" + BODY)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def upstream_requests(stack: Stack) -> list[dict[str, Any]]:
    return list(stack.emulator("GET", "/_emulator/requests"))


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        (b"x-note: \xff\xfe\r\n", 400),  # not UTF-8
        (b"x-note: a\x00b\r\n", 400),  # NUL: Envoy's codec refuses it
        (b"authorization: Bearer TOKEN\r\n", 401),  # the bearer repeated
        (b"authorization: Basic dXNlcjpwYXNz\r\n", 401),  # a second credential of another kind
        (b"x-api-key: some-other-key\r\n", 401),  # two different credentials
    ],
    ids=["invalid-utf8", "nul", "repeated-bearer", "second-authorization", "conflicting-api-key"],
)
def test_malformed_and_ambiguous_headers_are_refused_before_any_upstream(
    emulator_reset: Stack, unique_user: str, lines: bytes, status: int
) -> None:
    """Each case is refused with the Anthropic envelope and nothing reaches the upstream."""
    stack = emulator_reset
    token = stack.mint(unique_user)
    got, body = raw_request(
        stack, f"authorization: Bearer {token}\r\n".encode() + lines.replace(b"TOKEN", token.encode())
    )
    assert got == status, body
    assert json.loads(body)["type"] == "error"
    assert upstream_requests(stack) == []


@pytest.mark.parametrize(
    "lines",
    [
        # obs-fold: Envoy replaces the fold by a space (RFC 9112, section 5.2)
        b"x-note: a\r\n x-gateway-upstream: upstream_bedrock-badkey\r\n",
        # a bare CR inside a value: Envoy drops it
        b"x-note: a\rx-gateway-upstream: upstream_bedrock-badkey\r\n",
        # a bare LF: Envoy reads it as a line end (RFC 9112, section 2.2), so a second header line
        b"x-note: a\nx-gateway-upstream: upstream_bedrock-badkey\r\n",
    ],
    ids=["obs-fold", "bare-cr", "bare-lf"],
)
def test_header_injection_through_line_folding_cannot_choose_the_upstream(
    emulator_reset: Stack, unique_user: str, lines: bytes
) -> None:
    """Envoy's HTTP/1 parser normalises these before any filter runs (its validation policy is fixed
    in its source); whatever they become, the injected routing header never picks the upstream and
    never reaches the cloud, and the request is signed for the policy's upstream."""
    stack = emulator_reset
    token = stack.mint(unique_user)
    status, body = raw_request(stack, f"authorization: Bearer {token}\r\n".encode() + lines)
    assert status == 200, body
    [seen] = upstream_requests(stack)
    assert seen["verdict"] == "ok"  # signed with the good key, not the bad-key upstream's
    assert "x-gateway-upstream" not in seen["headers"]
    assert "\r" not in seen["headers"].get("x-note", "") and "\n" not in seen["headers"].get("x-note", "")


def test_client_forwarding_headers_never_reach_the_cloud(emulator_reset: Stack, unique_user: str) -> None:
    """X-Forwarded-Host, Forwarded, X-Real-IP and X-Forwarded-For/-Proto/-Port are removed before
    the upstream sees the request."""
    stack = emulator_reset
    token = stack.mint(unique_user)
    lines = (
        f"authorization: Bearer {token}\r\n"
        "x-forwarded-host: internal.example.com\r\n"
        "forwarded: for=10.0.0.1;host=internal.example.com\r\n"
        "x-real-ip: 10.0.0.1\r\n"
        "x-forwarded-for: 10.0.0.1\r\n"
        "x-forwarded-proto: https\r\n"
        "x-forwarded-port: 8443\r\n"
    ).encode()
    status, body = raw_request(stack, lines)
    assert status == 200, body
    [seen] = upstream_requests(stack)
    for name in (
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-port",
    ):
        assert name not in seen["headers"], name


def test_anonymous_refusals_write_no_rows(emulator_reset: Stack, unique_user: str) -> None:
    """A flood of requests with bad tokens is refused without writing a row per request."""
    stack = emulator_reset
    for i in range(20):
        status, _ = raw_request(stack, f"authorization: Bearer not-a-token-{i}\r\n".encode())
        assert status == 401
    # A valid request afterwards goes through the same ledger queue: once its row is in, any row
    # the refusals had written would be too.
    status, _ = raw_request(stack, f"authorization: Bearer {stack.mint(unique_user)}\r\n".encode())
    assert status == 200
    wait_for(lambda: rows_for_user(stack.database_url, unique_user))
    assert fetch_rows(stack.database_url, "user_email IS NULL AND reason LIKE 'token_%'") == []


def ext_proc_streams(stack: Stack) -> int:
    """How many streams Envoy has opened to the ext_proc service (its own counter)."""
    assert stack.ports is not None
    stats = httpx.get(f"http://127.0.0.1:{stack.ports.admin}/stats?filter=ext_proc.streams_started").text
    return sum(int(line.rpartition(":")[2]) for line in stats.splitlines() if "streams_started" in line)


def test_refusals_cost_no_ext_proc_stream(emulator_reset: Stack, unique_user: str) -> None:
    """A request ext_authz refuses (a bad token, a model the policy denies) is answered without
    opening a stream to the ext_proc service: a flood of refusals costs one Check each, no more."""
    stack = emulator_reset
    before = ext_proc_streams(stack)
    for i in range(10):
        status, _ = raw_request(stack, f"authorization: Bearer not-a-token-{i}\r\n".encode())
        assert status == 401
    denied = httpx.post(
        f"{stack.envoy_url}/model/us.anthropic.claude-opus-4-6-v1:0/invoke",
        headers={"authorization": f"Bearer {stack.mint(unique_user)}"},
        content=BODY,
    )
    assert denied.status_code == 400
    assert ext_proc_streams(stack) == before
    # The control: an allowed request does open one, and its response is still processed (metered).
    status, _ = raw_request(stack, f"authorization: Bearer {stack.mint(unique_user)}\r\n".encode())
    assert status == 200
    assert ext_proc_streams(stack) == before + 1
    rows = wait_for(lambda: [r for r in rows_for_user(stack.database_url, unique_user) if r["status"] == 200])
    assert rows[0]["output_tokens"] > 0 and rows[0]["output_tokens_estimated"] is False
