"""Claude Code's Bedrock and Vertex formats through the real Envoy, with the official SDK clients."""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import AnthropicBedrock, AnthropicVertex

from authz.dev.devstack import DEFAULT_PROJECT, Stack
from tests.e2e.conftest import assert_exact_usage, row_for, rows_for_user, single_row, wait_for

pytestmark = pytest.mark.e2e

SONNET_PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
HAIKU_VERTEX = "claude-haiku-4-5@20251001"
USAGE = {
    "input_tokens": 1234,
    "output_tokens": 321,
    "cache_creation_input_tokens": 70,
    "cache_creation_5m_input_tokens": 50,
    "cache_creation_1h_input_tokens": 20,
    "cache_read_input_tokens": 900,
}


_OPEN: list[AnthropicBedrock | AnthropicVertex] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every SDK client a test made, so no connection outlives its test."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def bedrock(stack: Stack, token: str) -> AnthropicBedrock:
    """The SDK client exactly as Claude Code uses it in Bedrock skip-auth mode."""
    client = AnthropicBedrock(api_key=token, base_url=stack.envoy_url, aws_region="us-east-1", max_retries=0)
    _OPEN.append(client)
    return client


def vertex(stack: Stack, token: str) -> AnthropicVertex:
    """The SDK client exactly as Claude Code uses it in Vertex skip-auth mode."""
    client = AnthropicVertex(
        access_token=token,
        base_url=f"{stack.envoy_url}/v1",
        project_id="the-clients-own-project",
        region="europe-west1",
        max_retries=0,
    )
    _OPEN.append(client)
    return client


def assert_usage(row: dict[str, Any]) -> None:
    """The row carries exactly the counts the emulator sent, and a cost."""
    assert_exact_usage(row, USAGE)
    assert row["cost_usd"] > Decimal(0)


@pytest.fixture
def usage(emulator_reset: Stack) -> Stack:
    """The emulator reports the known USAGE figures."""
    emulator_reset.emulator("POST", "/_emulator/state", {"usage": USAGE, "deltas": 7})
    return emulator_reset


def test_bedrock_stream_reaches_client_and_is_accounted(usage: Stack, unique_user: str) -> None:
    """A Bedrock-format stream arrives intact through Envoy and its row has the emulator's counts."""
    client = bedrock(usage, usage.mint(unique_user))
    with client.messages.stream(
        model=SONNET_PROFILE, max_tokens=200, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert text.startswith("Hello from the upstream emulator.")
    assert final.usage.output_tokens == USAGE["output_tokens"]
    row = single_row(usage, unique_user)
    assert_usage(row)
    assert row["outcome"] == "complete" and row["status"] == 200
    assert row["ingress_format"] == "bedrock" and row["operation"] == "stream"
    assert row["upstream"] == "bedrock-dev"
    assert row["requested_model"] == SONNET_PROFILE
    assert row["groups"] == ["developers"]
    assert row["ttfb_ms"] is not None and row["latency_ms"] >= row["ttfb_ms"]
    # The emulator verified a real SigV4 signature from the gateway's credential.
    recorded = usage.emulator("GET", "/_emulator/requests")
    assert recorded[-1]["verdict"] == "ok"


def test_bedrock_invoke_non_streaming(usage: Stack, unique_user: str) -> None:
    """A non-streaming Bedrock call returns the JSON message and records its usage."""
    client = bedrock(usage, usage.mint(unique_user))
    message = client.messages.create(
        model=SONNET_PROFILE, max_tokens=200, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    row = single_row(usage, unique_user)
    assert_usage(row)
    assert row["operation"] == "invoke"


def test_vertex_stream_uses_configured_project(usage: Stack, unique_user: str) -> None:
    """A Vertex-format stream is served from the configured project, not the client's, and accounted."""
    client = vertex(usage, usage.mint(unique_user))
    with client.messages.stream(
        model=HAIKU_VERTEX, max_tokens=200, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = stream.get_final_text()
    assert text.startswith("Hello from the upstream emulator.")
    row = single_row(usage, unique_user)
    assert_usage(row)
    assert row["ingress_format"] == "vertex" and row["upstream"] == "vertex-dev"
    recorded = usage.emulator("GET", "/_emulator/requests")[-1]
    assert f"/projects/{DEFAULT_PROJECT}/locations/us-east5/" in recorded["raw_path"]
    assert "the-clients-own-project" not in recorded["raw_path"]


def test_vertex_raw_predict_non_streaming(usage: Stack, unique_user: str) -> None:
    """A non-streaming Vertex call returns the JSON message and records its usage."""
    client = vertex(usage, usage.mint(unique_user))
    message = client.messages.create(
        model=HAIKU_VERTEX, max_tokens=50, messages=[{"role": "user", "content": "x"}]
    )
    assert message.usage.input_tokens == USAGE["input_tokens"]
    assert_usage(single_row(usage, unique_user))


def test_count_tokens_both_formats(usage: Stack, unique_user: str) -> None:
    """count-tokens works in both formats and costs nothing."""
    token = usage.mint(unique_user)
    counted = vertex(usage, token).messages.count_tokens(
        model=HAIKU_VERTEX, messages=[{"role": "user", "content": "x"}]
    )
    assert counted.input_tokens > 0
    resp = httpx.post(
        f"{usage.envoy_url}/model/{SONNET_PROFILE}/count-tokens",
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        json={
            "input": {
                "invokeModel": {
                    "body": base64.b64encode(json.dumps({"messages": [], "max_tokens": 1}).encode()).decode()
                }
            }
        },
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["inputTokens"] > 0
    rows = wait_for(
        lambda: (
            [r for r in rows_for_user(usage.database_url, unique_user)]
            if len(rows_for_user(usage.database_url, unique_user)) == 2
            else None
        )
    )
    assert {r["operation"] for r in rows} == {"count_tokens"}
    assert all(r["cost_usd"] == 0 for r in rows)


def test_inference_profile_arn_with_encoded_slash(usage: Stack, unique_user: str) -> None:
    """An inference-profile ARN model id, sent with `/` as %2F, is served and canonicalised."""
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5"
    client = bedrock(usage, usage.mint(unique_user))
    message = client.messages.create(model=arn, max_tokens=20, messages=[{"role": "user", "content": "x"}])
    assert message.content
    recorded = usage.emulator("GET", "/_emulator/requests")[-1]
    assert "%2F" in recorded["raw_path"]
    assert recorded["verdict"] == "ok"
    row = single_row(usage, unique_user)
    assert row["requested_model"] == arn


def test_list_inference_profiles(usage: Stack, unique_user: str) -> None:
    """Claude Code's start-up call GET /inference-profiles is answered through the gateway."""
    resp = httpx.get(
        f"{usage.envoy_url}/inference-profiles?type=SYSTEM_DEFINED",
        headers={"authorization": f"Bearer {usage.mint(unique_user)}"},
    )
    assert resp.status_code == 200, resp.text
    assert "inferenceProfileSummaries" in resp.json()


def test_disallowed_model_is_400_with_row(usage: Stack, unique_user: str) -> None:
    """A model outside the user's policy gets a 400 invalid_request_error and a denied row."""
    client = bedrock(usage, usage.mint(unique_user))
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="us.anthropic.claude-opus-4-6-v1:0",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
        )
    body = info.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert usage.emulator("GET", "/_emulator/requests") == []
    row = single_row(usage, unique_user)
    assert row["outcome"] == "denied" and row["status"] == 400 and "not allowed" in row["reason"]


def test_client_credentials_never_reach_upstream(usage: Stack, unique_user: str) -> None:
    """Client Authorization, x-api-key, x-amz-*, x-goog-* and internal headers are stripped."""
    token = usage.mint(unique_user)
    resp = httpx.post(
        f"{usage.envoy_url}/model/{urllib.parse.quote(SONNET_PROFILE, safe=':')}/invoke",
        headers={
            "authorization": f"Bearer {token}",
            # Claude Code's native mode sends the same token in both headers.
            "x-api-key": token,
            "x-amz-security-token": "client-session-token",
            "x-amz-date": "20200101T000000Z",
            "x-goog-user-project": "client-project",
            "x-goog-api-key": "client-google-key",
            "x-gateway-upstream": "upstream_bedrock-badkey",
            "x-envoy-original-path": "/evil",
            "cookie": "session=abc",
            "content-type": "application/json",
            "anthropic-beta": "some-beta-2025-01-01",
        },
        json={
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert resp.status_code == 200, resp.text
    received = usage.emulator("GET", "/_emulator/requests")[-1]
    headers = received["headers"]
    assert token not in json.dumps(headers)
    for name in (
        "x-api-key",
        "x-goog-user-project",
        "x-goog-api-key",
        "x-gateway-upstream",
        "cookie",
        "x-envoy-original-path",
    ):
        assert name not in headers, name
    assert headers.get("x-amz-security-token") != "client-session-token"
    assert headers["x-amz-date"] != "20200101T000000Z"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
    assert headers["anthropic-beta"] == "some-beta-2025-01-01"
    # The client could not pick the bad-key upstream by sending the internal header.
    assert received["verdict"] == "ok"


def test_upstream_signature_rejection_is_clean_502(emulator_reset: Stack, unique_user: str) -> None:
    """When the upstream refuses the gateway's signature the client gets a generic 502, no account ids."""
    client = bedrock(emulator_reset, emulator_reset.mint(unique_user, groups=("badkey",)))
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(
            model=SONNET_PROFILE, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == 502
    text = json.dumps(info.value.body)
    assert "123456789012" not in text and "arn:aws" not in text
    assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    row = single_row(emulator_reset, unique_user)
    assert row["outcome"] == "upstream_error" and row["status"] == 502


def test_prompt_too_long_passes_through_verbatim(emulator_reset: Stack, unique_user: str) -> None:
    """Bedrock's exact 'Input is too long.' reaches the client unchanged, for its recovery logic."""
    emulator_reset.emulator("POST", "/_emulator/state", {"scenario": "too_long"})
    client = bedrock(emulator_reset, emulator_reset.mint(unique_user))
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=SONNET_PROFILE, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert "Input is too long." in str(info.value)


def test_body_over_cap_is_413(emulator_reset: Stack, unique_user: str) -> None:
    """A body above the configured cap is refused with 413 request_too_large, with or without a length."""
    token = emulator_reset.mint(unique_user)
    big = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}],
    }
    url = f"{emulator_reset.envoy_url}/model/{SONNET_PROFILE}/invoke"
    resp = httpx.post(url, headers={"authorization": f"Bearer {token}"}, json=big)
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "request_too_large"

    def chunks() -> Any:
        data = json.dumps(big).encode()
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    resp = httpx.post(url, headers={"authorization": f"Bearer {token}"}, content=chunks())
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "request_too_large"
    assert emulator_reset.emulator("GET", "/_emulator/requests") == []


def test_stream_cut_by_client_records_aborted_row(emulator_reset: Stack, unique_user: str) -> None:
    """A client that hangs up mid-stream leaves a client_aborted row with input and estimated output."""
    emulator_reset.emulator("POST", "/_emulator/state", {"usage": USAGE, "deltas": 50, "delay": 0.05})
    client = bedrock(emulator_reset, emulator_reset.mint(unique_user))
    seen = 0
    with client.messages.stream(
        model=SONNET_PROFILE, max_tokens=200, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                seen += 1
                if seen == 5:
                    break
    row = single_row(emulator_reset, unique_user)
    assert row["outcome"] == "client_aborted"
    assert row["input_tokens"] == USAGE["input_tokens"]
    assert row["output_tokens"] >= 5 and row["output_tokens_estimated"] is True
    assert row["cost_usd"] > 0


def test_midstream_exception_is_recorded(emulator_reset: Stack, unique_user: str) -> None:
    """A Bedrock exception frame mid-stream reaches the client and is recorded as an upstream error."""
    emulator_reset.emulator("POST", "/_emulator/state", {"scenario": "exception_midstream"})
    client = bedrock(emulator_reset, emulator_reset.mint(unique_user))
    with (
        pytest.raises(anthropic.APIError),
        client.messages.stream(
            model=SONNET_PROFILE, max_tokens=200, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        stream.get_final_text()
    row = single_row(emulator_reset, unique_user)
    assert row["outcome"] == "upstream_error"


def test_row_has_claude_code_headers(usage: Stack, unique_user: str) -> None:
    """Claude Code's session, agent and user-agent headers land in the row."""
    client = bedrock(usage, usage.mint(unique_user))
    client.messages.create(
        model=SONNET_PROFILE,
        max_tokens=5,
        messages=[{"role": "user", "content": "x"}],
        extra_headers={
            "X-Claude-Code-Session-Id": "cc-session-1",
            "x-claude-code-agent-id": "agent-2",
            "x-claude-code-parent-agent-id": "agent-1",
            "User-Agent": "claude-cli/2.1.0 (external, cli)",
        },
    )
    row = single_row(usage, unique_user)
    assert row["cc_session_id"] == "cc-session-1"
    assert row["agent_id"] == "agent-2" and row["parent_agent_id"] == "agent-1"
    assert row["user_agent"] == "claude-cli/2.1.0 (external, cli)"


def test_unknown_route_is_404_envelope(stack: Stack) -> None:
    """A path that is no inference route gets a 404 in the Anthropic envelope."""
    resp = httpx.get(f"{stack.envoy_url}/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["type"] == "error"


def test_request_row_request_id_matches(usage: Stack, unique_user: str) -> None:
    """Every row has a request id, unique per request."""
    client = bedrock(usage, usage.mint(unique_user))
    for _ in range(3):
        client.messages.create(
            model=SONNET_PROFILE, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    rows = wait_for(lambda: (r := rows_for_user(usage.database_url, unique_user)) and len(r) == 3 and r)
    assert len({r["request_id"] for r in rows}) == 3
    assert row_for(usage.database_url, rows[0]["request_id"])["user_email"] == unique_user
