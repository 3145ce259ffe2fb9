"""The real upstream backends against the emulator's strict STS, SigV4 and Google token checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from backends.base import Caller
from backends.bedrock.upstream import AssumeRole, BedrockSettings, BedrockUpstream, StaticKeys
from backends.emulator import start_emulator
from backends.emulator.google import generate_service_account_key
from backends.emulator.state import (
    DEFAULT_PROJECT,
    DEFAULT_ROLE_ARN,
    TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY,
    EmulatorState,
)
from backends.vertex.upstream import ServiceAccountFile, VertexSettings, VertexUpstream

pytestmark = pytest.mark.integration

ALICE = Caller(sub="00u-alice", email="alice@example.com", groups=("developers",))
BODY = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
    }
).encode()


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[str, EmulatorState]]:
    """The emulator in-process with signature and token checks on."""
    state = EmulatorState()
    runner, url = await start_emulator(state=state)
    try:
        yield url, state
    finally:
        await runner.cleanup()


async def send(
    upstream: BedrockUpstream | VertexUpstream, path: str, body: bytes, caller: Caller
) -> httpx.Response:
    """Sign ``path`` for ``caller`` and send it exactly as Envoy would."""
    signed = await upstream.sign(
        method="POST", path=path, headers={"content-type": "application/json"}, body=body, caller=caller
    )
    headers = {"content-type": "application/json", "host": signed.authority, **signed.headers}
    async with httpx.AsyncClient() as client:
        return await client.post(f"http://{signed.authority}{signed.path}", headers=headers, content=body)


async def test_assume_role_per_user_signs_accepted_requests(emulator: tuple[str, EmulatorState]) -> None:
    """AssumeRole through the emulator's STS records the user as SourceIdentity and tag, and its
    temporary credentials sign a Bedrock call the emulator accepts."""
    url, state = emulator
    upstream = BedrockUpstream(
        BedrockSettings(
            name="bedrock",
            region="us-east-1",
            base_url=url,
            credentials=AssumeRole(
                role_arn=DEFAULT_ROLE_ARN,
                source_credentials=StaticKeys(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY),
                sts_endpoint_url=url,
                sts_region="us-east-1",
            ),
        )
    )
    try:
        path = upstream.path("invoke", "us.anthropic.claude-sonnet-4-5-20250929-v1:0")
        first = await send(upstream, path, BODY, ALICE)
        assert first.status_code == 200, first.text
        second = await send(upstream, path, BODY, ALICE)
        assert second.status_code == 200
        calls = state.assume_role_calls
        assert len(calls) == 1  # cached for the user
        call = calls[0].to_json()
        assert call["source_identity"] == "alice@example.com"
        assert call["tags"]["gateway-user"] == "alice@example.com"
        assert state.requests[-1].headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=ASIA")
        assert state.requests[-1].verdict == "ok"
    finally:
        await upstream.aclose()


async def test_unknown_role_fails_cleanly(emulator: tuple[str, EmulatorState]) -> None:
    """An AssumeRole the emulator's STS refuses surfaces as a BackendError, not a crash."""
    from backends.base import BackendError

    url, _ = emulator
    upstream = BedrockUpstream(
        BedrockSettings(
            name="bedrock",
            region="us-east-1",
            base_url=url,
            credentials=AssumeRole(
                role_arn="arn:aws:iam::123456789012:role/NotAllowed",
                source_credentials=StaticKeys(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY),
                sts_endpoint_url=url,
            ),
        )
    )
    try:
        with pytest.raises(BackendError):
            await upstream.sign(method="POST", path="/model/x/invoke", headers={}, body=BODY, caller=ALICE)
    finally:
        await upstream.aclose()


async def test_vertex_service_account_token_accepted(
    emulator: tuple[str, EmulatorState], tmp_path: Path
) -> None:
    """A google-auth token from a service-account key file is accepted by the emulator's Vertex routes,
    and the path uses the configured project and region."""
    url, state = emulator
    key = tmp_path / "sa.json"
    generate_service_account_key(key, token_uri=f"{url}/token", project_id=DEFAULT_PROJECT)
    state.register_service_account_file(key)
    upstream = VertexUpstream(
        VertexSettings(
            name="vertex",
            project=DEFAULT_PROJECT,
            region="us-east5",
            base_url=url,
            credentials=ServiceAccountFile(str(key)),
        )
    )
    try:
        path = upstream.path("invoke", "claude-haiku-4-5@20251001")
        assert path.startswith(f"/v1/projects/{DEFAULT_PROJECT}/locations/us-east5/")
        body = json.dumps(
            {
                "anthropic_version": "vertex-2023-10-16",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            }
        ).encode()
        resp = await send(upstream, path, body, ALICE)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["input_tokens"] == state.usage.input_tokens
    finally:
        await upstream.aclose()
