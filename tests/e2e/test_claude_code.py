"""The real Claude Code CLI (pinned in tests/claude_code) in print mode through Envoy and the gateway.

Each test gives Claude Code a fresh HOME whose ``~/.claude/settings.json`` names ``authz token`` as
the ``apiKeyHelper`` (reading a token file that holds a token minted for a unique user), an
environment with no cloud credential and no nonessential traffic, and checks what the developer
sees, what reached the emulated cloud, and the usage rows of that user.

What the pinned client sends in print mode: one inference request per prompt (no
title generation or quota probe), carrying ``User-Agent: claude-cli/<version> (external, sdk-cli)``
and ``X-Claude-Code-Session-Id``. In Bedrock mode it first lists inference profiles with the AWS
SDK, unsigned and without the helper's token; the gateway refuses that anonymous call and Claude
Code falls back to its built-in model list. On an HTTP 400 it sends the request once more without
deferred tools (tool search) before giving up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz.client.flow import normalize_gateway
from authz.client.setup import helper_command
from authz.client.tokenfile import StoredToken, default_path, save
from authz.dev.devstack import Stack
from backends.emulator import DEFAULT_PROJECT
from tests.e2e.conftest import rows_for_user, wait_for

pytestmark = pytest.mark.e2e

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "claude_code"
CLAUDE = PACKAGE_DIR / "node_modules" / ".bin" / "claude"
AUTHZ = Path(sys.executable).parent / "authz"
VERSION = json.loads((PACKAGE_DIR / "package.json").read_text())["dependencies"]["@anthropic-ai/claude-code"]
TIMEOUT = 120.0
PROMPT = "Say hello to the gateway."

# Models the shared stack's "developers" policy allows, in each format's own id form.
BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-haiku-4-5@20251001"
MESSAGES_MODEL = "claude-sonnet-4-5"
DENIED_BEDROCK_MODEL = "us.anthropic.claude-opus-4-1-20250805-v1:0"

USAGE = {
    "input_tokens": 1811,
    "output_tokens": 73,
    "cache_creation_5m_input_tokens": 40,
    "cache_creation_1h_input_tokens": 4,
    "cache_read_input_tokens": 9000,
}
# usage_events column -> the Anthropic usage field it records.
ROW_COUNTS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_write_tokens": "cache_creation_input_tokens",
    "cache_write_5m_tokens": "cache_creation_5m_input_tokens",
    "cache_write_1h_tokens": "cache_creation_1h_input_tokens",
    "cache_read_tokens": "cache_read_input_tokens",
}
# Claude Code's switches for everything it would send besides inference.
QUIET = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
}
INFERENCE_ROUTES = ("bedrock.invoke", "vertex.")


@dataclass(frozen=True)
class Developer:
    """A laptop with Claude Code set up for the gateway: its HOME, working directory and token."""

    email: str
    token: str
    home: Path
    workdir: Path
    tmpdir: Path


@dataclass(frozen=True)
class Run:
    """One finished ``claude -p`` run and its ``--output-format json`` result."""

    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any]

    def describe(self) -> str:
        """Everything the CLI printed, for assertion messages."""
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


@pytest.fixture
def developer(stack: Stack, unique_user: str, tmp_path: Path) -> Iterator[Developer]:
    """A fresh HOME whose apiKeyHelper is ``authz token``, signed in as ``unique_user``."""
    if not CLAUDE.exists():
        pytest.fail(f"{CLAUDE} is missing: `make deps-system` installs the pinned Claude Code CLI")
    home = tmp_path / "home"
    gateway = normalize_gateway(stack.envoy_url)
    token = stack.mint(unique_user)
    # What `authz login` leaves behind; an hour of validity means `authz token` never refreshes here.
    stored = StoredToken(gateway, token, time.time() + 3600, refresh_token=None, email=unique_user)
    save(default_path({"HOME": str(home)}), stored)
    settings = {"apiKeyHelper": helper_command((str(AUTHZ),), gateway)}
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    workdir = tmp_path / "project"
    workdir.mkdir()
    # Short on purpose: Claude Code puts a Unix socket under TMPDIR (108-byte path limit).
    tmpdir = Path(tempfile.mkdtemp(prefix="cc-"))
    try:
        yield Developer(unique_user, token, home, workdir, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture
def usage(emulator_reset: Stack, unique_user: str) -> str:
    """The emulator answers with known usage figures and a text unique to this test; returns the text."""
    text = f"Hello {unique_user}, this is the emulated cloud."
    emulator_reset.emulator("POST", "/_emulator/state", {"usage": USAGE, "text": text, "deltas": 4})
    return text


def claude(dev: Developer, mode_env: Mapping[str, str], *args: str) -> Run:
    """Run ``claude -p PROMPT --output-format json ARGS`` as ``dev`` with only ``mode_env`` and QUIET set.

    The environment is built from nothing, so no AWS or Google credential of the machine can leak in.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(dev.home),
        "TMPDIR": str(dev.tmpdir),
        "LANG": "C.UTF-8",
        **QUIET,
        **mode_env,
    }
    argv = [str(CLAUDE), "-p", PROMPT, "--output-format", "json", *args]
    try:
        done = subprocess.run(
            argv, cwd=dev.workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"claude did not finish in {TIMEOUT}s\nstdout: {exc.stdout!r}\nstderr: {exc.stderr!r}")
    try:
        result = json.loads(done.stdout)
    except ValueError:
        result = {}
    run = Run(done.returncode, done.stdout, done.stderr, result)
    assert isinstance(result, dict) and result.get("type") == "result", run.describe()
    return run


def bedrock_env(stack: Stack) -> dict[str, str]:
    """Claude Code's Bedrock mode against the gateway, cloud authentication skipped."""
    return {
        "CLAUDE_CODE_USE_BEDROCK": "1",
        "ANTHROPIC_BEDROCK_BASE_URL": stack.envoy_url,
        "CLAUDE_CODE_SKIP_BEDROCK_AUTH": "1",
        "AWS_REGION": "us-east-1",
    }


def vertex_env(stack: Stack) -> dict[str, str]:
    """Claude Code's Vertex mode against the gateway, cloud authentication skipped."""
    return {
        "CLAUDE_CODE_USE_VERTEX": "1",
        "ANTHROPIC_VERTEX_BASE_URL": f"{stack.envoy_url}/v1",
        "CLAUDE_CODE_SKIP_VERTEX_AUTH": "1",
        # The client's own project id: the gateway sends its configured project instead.
        "ANTHROPIC_VERTEX_PROJECT_ID": "the-developers-own-project",
        "CLOUD_ML_REGION": "us-east5",
    }


def served_inference(stack: Stack) -> list[dict[str, Any]]:
    """The inference requests the emulated clouds received (not the gateway's own token fetches)."""
    records = stack.emulator("GET", "/_emulator/requests")
    return [r for r in records if r["route"].startswith(INFERENCE_ROUTES)]


def assert_answered(run: Run, text: str) -> None:
    """Claude Code succeeded and printed the emulator's text with the usage the emulator reported."""
    assert run.returncode == 0, run.describe()
    assert run.result["is_error"] is False, run.describe()
    assert run.result["result"].strip() == text, run.describe()
    assert run.result["usage"]["input_tokens"] == USAGE["input_tokens"], run.describe()
    assert run.result["usage"]["output_tokens"] == USAGE["output_tokens"], run.describe()


def assert_accounted(stack: Stack, dev: Developer, run: Run, model: str) -> list[dict[str, Any]]:
    """Every request reached the cloud signed by the gateway and left one exact row; returns the rows.

    Rows are matched to what the emulator served through Envoy's ``x-request-id``, which the gateway
    keeps as the row's ``request_id``.
    """
    served = served_inference(stack)
    assert served, "the emulator served no inference request"
    for record in served:
        assert record["status"] == 200 and record["verdict"] == "ok", record
        assert record["usage"] is not None, record
        # The gateway token never travels past the gateway.
        assert dev.token not in json.dumps(record["headers"]), record["headers"]
    wait_for(lambda: len(rows_for_user(stack.database_url, dev.email)) >= len(served))
    rows = rows_for_user(stack.database_url, dev.email)
    by_request_id = {record["headers"]["x-request-id"]: record for record in served}
    assert sorted(row["request_id"] for row in rows) == sorted(by_request_id), (rows, served)
    for row in rows:
        record = by_request_id[row["request_id"]]
        assert {column: row[column] for column in ROW_COUNTS} == {
            column: record["usage"][field] for column, field in ROW_COUNTS.items()
        }, row
        assert row["output_tokens_estimated"] is False
        assert (row["status"], row["outcome"], row["reason"]) == (200, "complete", None)
        assert row["requested_model"] == model
        assert row["groups"] == ["developers"]
        assert row["cc_session_id"] == run.result["session_id"]
        assert row["user_agent"].startswith(f"claude-cli/{VERSION} ("), row["user_agent"]
    return rows


def test_bedrock_mode(stack: Stack, usage: str, developer: Developer) -> None:
    """Claude Code in Bedrock mode gets the cloud's answer and every request leaves its exact usage row."""
    run = claude(developer, bedrock_env(stack), "--model", BEDROCK_MODEL)
    assert_answered(run, usage)
    rows = assert_accounted(stack, developer, run, BEDROCK_MODEL)
    assert {(row["ingress_format"], row["upstream"]) for row in rows} == {("bedrock", "bedrock-dev")}
    served = served_inference(stack)
    assert {record["model_id"] for record in served} == {BEDROCK_MODEL}
    assert all(r["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 ") for r in served)
    # Claude Code's start-up profile listing carries no token: the gateway refuses it, so the
    # gateway's cloud credential never serves an anonymous caller.
    requests = stack.emulator("GET", "/_emulator/requests")
    assert not [r for r in requests if r["route"] == "bedrock.list_inference_profiles"]


def test_vertex_mode(stack: Stack, usage: str, developer: Developer) -> None:
    """Claude Code in Vertex mode gets the cloud's answer and every request leaves its exact usage row."""
    run = claude(developer, vertex_env(stack), "--model", VERTEX_MODEL)
    assert_answered(run, usage)
    rows = assert_accounted(stack, developer, run, VERTEX_MODEL)
    assert {(row["ingress_format"], row["upstream"]) for row in rows} == {("vertex", "vertex-dev")}
    for record in served_inference(stack):
        assert record["model_id"] == VERTEX_MODEL
        # The gateway's configured project, whatever project id the client put in its URL.
        assert f"/projects/{DEFAULT_PROJECT}/" in record["raw_path"], record["raw_path"]


@pytest.mark.parametrize(
    ("fmt", "model"), [("bedrock", BEDROCK_MODEL), ("vertex", VERTEX_MODEL), ("messages", MESSAGES_MODEL)]
)
def test_settings_from_authz_setup(
    stack: Stack, usage: str, developer: Developer, fmt: str, model: str
) -> None:
    """What ``authz setup claude-code --write`` puts in settings.json is all Claude Code needs."""
    settings = developer.home / ".claude" / "settings.json"
    settings.unlink()
    setup = [str(AUTHZ), "setup", "claude-code", "--gateway", stack.envoy_url, "--format", fmt, "--write"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(developer.home)}
    done = subprocess.run(setup, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    written = json.loads(settings.read_text())["env"]
    if fmt == "messages":
        # The native mode: the gateway is the API's base URL, no cloud mode variable at all.
        assert written["ANTHROPIC_BASE_URL"] == stack.envoy_url
        assert not any(name.startswith("CLAUDE_CODE_USE_") for name in written)
    else:
        assert any(name.startswith("CLAUDE_CODE_SKIP_") for name in written)
    # No mode variable in the environment: they all come from the settings file's "env".
    run = claude(developer, {}, "--model", model)
    assert_answered(run, usage)
    rows = assert_accounted(stack, developer, run, model)
    assert {row["ingress_format"] for row in rows} == {fmt}


def test_native_gateway_mode(stack: Stack, usage: str, developer: Developer) -> None:
    """Claude Code's own gateway mode (Messages API at ANTHROPIC_BASE_URL) is answered through the
    Bedrock upstream the policy names first, and accounted."""
    run = claude(developer, {"ANTHROPIC_BASE_URL": stack.envoy_url}, "--model", MESSAGES_MODEL)
    assert_answered(run, usage)
    rows = assert_accounted(stack, developer, run, MESSAGES_MODEL)
    assert {(row["ingress_format"], row["upstream"]) for row in rows} == {("messages", "bedrock-dev")}
    assert {row["upstream_model"] for row in rows} == {"us.anthropic.claude-sonnet-4-5-20250929-v1:0"}
    for record in served_inference(stack):
        assert record["route"] == "bedrock.invoke-with-response-stream", record
        assert record["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 ")


def test_denied_model_reaches_the_developer(
    stack: Stack, emulator_reset: Stack, developer: Developer
) -> None:
    """A model the policy refuses fails Claude Code with the gateway's reason, and no cloud is called."""
    run = claude(developer, bedrock_env(stack), "--model", DENIED_BEDROCK_MODEL)
    assert run.returncode != 0, run.describe()
    assert run.result["is_error"] is True and run.result["api_error_status"] == 400, run.describe()
    assert "not allowed" in run.result["result"], run.describe()
    assert served_inference(stack) == []
    rows = wait_for(lambda: rows_for_user(stack.database_url, developer.email))
    for row in rows:
        assert (row["status"], row["outcome"]) == (400, "denied"), row
        assert "not allowed" in row["reason"], row
        assert row["requested_model"] == DENIED_BEDROCK_MODEL
        assert row["cc_session_id"] == run.result["session_id"]
        assert row["user_agent"].startswith(f"claude-cli/{VERSION} ("), row["user_agent"]
