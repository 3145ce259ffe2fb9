"""A request that reached an upstream always ends as a usage row with honest counts: when the
client leaves early, when the upstream cuts the stream, when the worker serving it stalls or dies,
and when Envoy answers a request itself."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from authz.dev.devstack import Stack
from tests.e2e.conftest import fetch_rows, row_for, rows_for_user, wait_for

pytestmark = pytest.mark.e2e

MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
STREAM_PATH = f"/model/{MODEL}/invoke-with-response-stream"
INVOKE_PATH = f"/model/{MODEL}/invoke"


def body(size: int = 0) -> dict[str, Any]:
    """A Bedrock-format body, padded to about ``size`` bytes of prompt."""
    return {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "x" * max(1, size)}],
    }


@pytest.fixture
def stack(pg_dsn: str, tmp_path: Path) -> Iterator[Stack]:
    """Two workers and a short ext_proc message timeout, so a stalled worker is given up on fast."""
    s = Stack(root=tmp_path / "stack", database_url=pg_dsn, workers=2)
    s.extra_config = {"limits": {"ext_proc_timeout": 2.0, "max_request_body_bytes": 1024 * 1024}}
    s.start()
    try:
        yield s
    finally:
        s.stop()


def workers(stack: Stack) -> list[psutil.Process]:
    """The worker processes of ``authz serve``: with several workers, its spawned children (not
    multiprocessing's resource tracker)."""
    parent = psutil.Process(stack.procs["gateway"].popen.pid)
    spawned = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
    return spawned or [parent]


def access_log_rows(stack: Stack, email: str) -> list[dict[str, Any]]:
    """The user's rows that Envoy's access log wrote or completed."""
    return [r for r in rows_for_user(stack.database_url, email) if r["recorded_by"] == "access_log"]


def open_stream(stack: Stack, token: str) -> socket.socket:
    """Send a streaming request on a raw socket and read until the response headers arrived."""
    payload = httpx.Request(
        "POST",
        f"{stack.envoy_url}{STREAM_PATH}",
        headers={"authorization": f"Bearer {token}"},
        json=body(),
    )
    assert stack.ports is not None
    sock = socket.create_connection(("127.0.0.1", stack.ports.envoy), timeout=20)
    head = f"POST {STREAM_PATH} HTTP/1.1\r\nhost: gateway\r\n"
    for name, value in payload.headers.items():
        if name.lower() != "host":
            head += f"{name}: {value}\r\n"
    sock.sendall(head.encode() + b"\r\n" + payload.read())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def test_upstream_cut_is_an_upstream_error(stack: Stack, unique_user: str) -> None:
    """An upstream that drops the connection mid-stream is recorded as upstream_error with the
    tokens seen so far, not as the client's abort."""
    stack.emulator("POST", "/_emulator/state", {"scenario": "cut_midstream", "deltas": 40, "delay": 0.02})
    token = stack.mint(unique_user)
    with httpx.Client(timeout=30) as client:
        with pytest.raises(httpx.HTTPError):
            with client.stream(
                "POST",
                f"{stack.envoy_url}{STREAM_PATH}",
                headers={"authorization": f"Bearer {token}"},
                json=body(),
            ) as resp:
                assert resp.status_code == 200
                for _ in resp.iter_bytes():
                    pass
    [row] = wait_for(lambda: access_log_rows(stack, unique_user))
    assert row["outcome"] == "upstream_error", row
    assert "upstream" in row["reason"]
    # The message_start before the cut reported the prompt's input tokens exactly.
    assert row["input_tokens"] == 25 and not row["input_tokens_estimated"]
    assert row["output_tokens"] > 0


def test_client_gone_before_the_first_byte_estimates_the_prompt(stack: Stack, unique_user: str) -> None:
    """A client that sends a 400 KB prompt and leaves before the upstream's first byte leaves a row
    whose input is estimated from the body the upstream received, not a $0 row."""
    stack.emulator("POST", "/_emulator/state", {"first_byte_delay": 3.0})
    token = stack.mint(unique_user)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{stack.envoy_url}{INVOKE_PATH}",
            headers={"authorization": f"Bearer {token}"},
            json=body(400_000),
            timeout=1.0,
        )
    [row] = wait_for(lambda: rows_for_user(stack.database_url, unique_user), timeout=15)
    assert row["outcome"] == "client_aborted"
    assert row["input_tokens_estimated"] is True
    assert 90_000 <= row["input_tokens"] <= 110_000  # about 400 KB / 4 bytes per token
    assert row["cost_usd"] > 0
    # The upstream really received the prompt.
    [seen] = [r for r in stack.emulator("GET", "/_emulator/requests") if r["body_length"] > 400_000]
    assert seen["route"].startswith("bedrock")


def test_a_stalled_meter_stalls_the_stream_never_the_count(stack: Stack, unique_user: str) -> None:
    """While the worker metering a stream is stopped, no byte of the stream reaches the client (the
    ext_proc filter is blocking); once it resumes the stream completes and the row holds exactly
    the upstream's counts: a meter that falls behind delays the stream instead of undercounting."""
    stack.emulator("POST", "/_emulator/state", {"deltas": 60, "delay": 0.05})
    token = stack.mint(unique_user)
    sock = open_stream(stack, token)
    time.sleep(0.3)
    stopped = workers(stack)
    for proc in stopped:
        proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)  # whatever was already on its way arrives
        sock.settimeout(0.2)
        before = drain(sock)
        time.sleep(2.0)
        assert drain(sock) == b"", "bytes reached the client while the meter was stopped"
    finally:
        for proc in stopped:
            proc.send_signal(signal.SIGCONT)
    sock.settimeout(20)
    rest = b""
    while not (before + rest).endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "the stream did not complete after the meter resumed"
        rest += chunk
    sock.close()
    [row] = wait_for(lambda: rows_for_user(stack.database_url, unique_user), timeout=20)
    served = next(r for r in stack.emulator("GET", "/_emulator/requests") if r["usage"])["usage"]
    assert (row["outcome"], row["recorded_by"]) == ("complete", "ext_proc")
    assert (row["input_tokens"], row["output_tokens"]) == (served["input_tokens"], served["output_tokens"])
    assert not row["output_tokens_estimated"]


def drain(sock: socket.socket) -> bytes:
    """Whatever the socket holds now (empty when nothing arrives within its timeout)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    return out


def test_killed_worker_leaves_a_row_for_each_of_its_requests(stack: Stack, unique_user: str) -> None:
    """Killing a worker mid-stream still ends with one row for every request it was serving."""
    stack.emulator("POST", "/_emulator/state", {"deltas": 100, "delay": 0.05})
    token = stack.mint(unique_user)
    socks = [open_stream(stack, token) for _ in range(8)]
    time.sleep(0.5)
    victim = workers(stack)[0]
    victim.send_signal(signal.SIGKILL)
    for sock in socks:
        sock.settimeout(20)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()
    rows = wait_for(
        lambda: (
            (found := rows_for_user(stack.database_url, unique_user)) and len(found) >= len(socks) and found
        ),
        timeout=30,
    )
    # One row per request, each request once.
    assert len(rows) == len({r["request_id"] for r in rows}) == len(socks)
    # The requests the dead worker held were reported by Envoy's access log.
    assert any(r["outcome"] == "unmetered" and r["recorded_by"] == "access_log" for r in rows), rows


def test_requests_envoy_answers_itself_are_rows_when_the_caller_is_known(
    stack: Stack, unique_user: str
) -> None:
    """A 413 and a 404 that Envoy answers without any service are rows naming the caller when the
    token is valid; the same requests without a token are only counted."""
    token = stack.mint(unique_user)
    resp = httpx.post(
        f"{stack.envoy_url}{INVOKE_PATH}",
        headers={"authorization": f"Bearer {token}"},
        content=b"x" * (1024 * 1024 + 10),
        timeout=30,
    )
    assert resp.status_code == 413
    too_big = resp.headers["x-request-id"]
    resp = httpx.get(f"{stack.envoy_url}/nowhere", headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 404
    unknown = resp.headers["x-request-id"]
    resp = httpx.get(f"{stack.envoy_url}/nowhere")
    assert resp.status_code == 404
    anonymous = resp.headers["x-request-id"]
    for request_id, status in ((too_big, 413), (unknown, 404)):
        row = row_for(stack.database_url, request_id, timeout=15)
        assert (row["status"], row["outcome"], row["user_email"]) == (status, "denied", unique_user)
        assert row["reason"].startswith("envoy: ")
    time.sleep(2.5)  # past the access log's flush interval
    assert fetch_rows(stack.database_url, "request_id = $1", anonymous) == []


def test_no_access_log_rows_for_recorded_requests(stack: Stack, unique_user: str) -> None:
    """A request whose exchange wrote its row is not reported again by the access log."""
    token = stack.mint(unique_user)
    for _ in range(3):
        assert (
            httpx.post(
                f"{stack.envoy_url}{INVOKE_PATH}",
                headers={"authorization": f"Bearer {token}"},
                json=body(),
                timeout=30,
            ).status_code
            == 200
        )
    rows = wait_for(lambda: (r := rows_for_user(stack.database_url, unique_user)) and len(r) == 3 and r)
    time.sleep(2.5)
    rows = rows_for_user(stack.database_url, unique_user)
    assert [r["recorded_by"] for r in rows] == ["ext_proc"] * 3
    assert all(r["outcome"] == "complete" for r in rows)
