"""The developer CLI against the real Envoy: ``authz login`` (device flow, finished in Chromium),
``authz token`` as Claude Code's apiKeyHelper for the Bedrock and Vertex SDK clients, and
``authz logout``."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from anthropic import AnthropicBedrock, AnthropicVertex
from playwright.sync_api import Browser

from authz.dev.devstack import VERTEX_REGION
from backends.emulator.state import DEFAULT_PROJECT
from tests.e2e.signin.conftest import SignInEnv, password
from tests.e2e.signin.flows import (
    SONNET_PROFILE,
    decide,
    idp_login,
    is_callback,
    open_verification,
    session_row,
    sid_of,
    wait_refused,
)

pytestmark = pytest.mark.e2e

HAIKU_VERTEX = "claude-haiku-4-5@20251001"
COMPLETE_URL = re.compile(r"\(or open (\S+) and check that it shows ([A-Z]{4}-[A-Z]{4})\)")


def authz(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``authz`` CLI to completion."""
    return subprocess.run(
        [sys.executable, "-m", "authz.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def lines_of(stream: IO[str]) -> queue.Queue[str | None]:
    """The lines of ``stream`` as they are printed (None at the end), read on a thread."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment whose token file lives under ``tmp_path`` and that has no display."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    yield env


def test_login_token_logout(signin: SignInEnv, browser: Browser, cli_env: dict[str, str]) -> None:
    """``authz login`` finished in the browser, then ``authz token`` feeds working Bedrock and Vertex
    SDK calls, and after ``authz logout`` the same token is refused within 2 seconds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz.cli", "login", "--gateway", signin.url, "--no-browser"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = lines_of(proc.stdout)
        printed: list[str] = []
        match = None
        while match is None:
            line = lines.get(timeout=30)
            assert line is not None, f"authz login ended early: {printed}"
            printed.append(line)
            match = COMPLETE_URL.search(line)
        url, user_code = match.groups()
        assert url == f"{signin.url}/device?user_code={user_code}"
        assert f"open {signin.url}/device and enter the code {user_code}" in printed[0]

        with browser.new_context() as context:
            page = open_verification(context, url)
            assert page.input_value("#user_code") == user_code
            with page.expect_response(lambda r: is_callback(signin.url)(r.url)) as callback:
                page.click('form[action="/device"] button[type="submit"]')
                idp_login(page, signin.issuer, "erin", password("erin"))
            assert callback.value.status == 200
            assert decide(page, "approve").status == 200
        assert proc.wait(timeout=30) == 0
        rest = []
        while (line := lines.get(timeout=5)) is not None:
            rest.append(line)
        assert "Signed in as erin@example.com\n" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    token_file = Path(cli_env["XDG_CONFIG_HOME"]) / "claude-gateway" / "token.json"
    assert token_file.stat().st_mode & 0o777 == 0o600

    printed_token = authz(cli_env, "token", "--gateway", signin.url)
    assert printed_token.returncode == 0, printed_token.stderr
    token = printed_token.stdout.strip()
    assert session_row(signin.dsn, sid_of(token))["surface"] == "cli"

    with AnthropicBedrock(
        api_key=token, base_url=signin.url, aws_region="us-east-1", max_retries=0
    ) as bedrock:
        reply = bedrock.messages.create(
            model=SONNET_PROFILE, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.content
    with AnthropicVertex(
        access_token=token,
        base_url=f"{signin.url}/v1",
        project_id=DEFAULT_PROJECT,
        region=VERTEX_REGION,
        max_retries=0,
    ) as vertex:
        reply = vertex.messages.create(
            model=HAIKU_VERTEX, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.content

    logout = authz(cli_env, "logout")
    assert logout.returncode == 0, logout.stderr
    assert wait_refused(signin.url, token, since=time.monotonic()) < 2.0
    assert not token_file.exists()
    assert session_row(signin.dsn, sid_of(token))["revoked_reason"] == "rfc7009"
    after = authz(cli_env, "token", "--gateway", signin.url)
    assert after.returncode == 1 and "not signed in" in after.stderr
