"""The emulator's Anthropic API against the official ``anthropic`` SDK: Messages (streamed and
not), count_tokens, the models list, and the API key check."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import pytest

from backends.emulator import TEST_ANTHROPIC_API_KEY, EmulatorState, start_emulator
from backends.emulator.anthropic_api import MODELS
from backends.usage import Usage

pytestmark = pytest.mark.integration

MODEL = "claude-haiku-4-5-20251001"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
USAGE = Usage(
    input_tokens=12,
    output_tokens=34,
    cache_creation_input_tokens=5,
    cache_creation_5m_input_tokens=2,
    cache_creation_1h_input_tokens=3,
    cache_read_input_tokens=6,
)


@dataclass
class Emulator:
    url: str
    state: EmulatorState
    http: aiohttp.ClientSession

    def client(self, api_key: str = TEST_ANTHROPIC_API_KEY) -> anthropic.AsyncAnthropic:
        """The SDK pointed at the emulator; no retries, so each call is one request."""
        return anthropic.AsyncAnthropic(api_key=api_key, base_url=self.url, max_retries=0)

    async def post(self, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
        """POST raw JSON with exactly ``headers``; the status and the JSON answer."""
        async with self.http.post(self.url + path, data=json.dumps(body), headers=headers) as response:
            return response.status, await response.json()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    state = EmulatorState()
    state.usage = USAGE
    runner, url = await start_emulator("127.0.0.1", 0, state)
    async with aiohttp.ClientSession() as http:
        yield Emulator(url, state, http)
    await runner.cleanup()


def _usage_of(reported: Any) -> tuple[int, int, int, int]:
    return (
        reported.input_tokens,
        reported.output_tokens,
        reported.cache_creation_input_tokens,
        reported.cache_read_input_tokens,
    )


EXPECTED = (
    USAGE.input_tokens,
    USAGE.output_tokens,
    USAGE.cache_creation_input_tokens,
    USAGE.cache_read_input_tokens,
)


async def test_sdk_creates_a_message(emulator: Emulator) -> None:
    """messages.create gets the canned text and usage; the request is recorded with its key checked."""
    async with emulator.client() as client:
        message = await client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert message.model == MODEL
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(emulator.state.text_chunks())
    assert _usage_of(message.usage) == EXPECTED
    record = emulator.state.requests[-1]
    assert (record.route, record.verdict, record.status, record.model_id) == (
        "anthropic.messages",
        "ok",
        200,
        MODEL,
    )
    # The SDK sends api_key as a bearer token; the gateway sends x-api-key (tested below).
    assert record.headers["authorization"] == f"Bearer {TEST_ANTHROPIC_API_KEY}"
    assert record.usage == USAGE


async def test_sdk_streams_a_message(emulator: Emulator) -> None:
    """messages.stream parses the emulator's SSE (ping included) into the canned text and final usage."""
    async with (
        emulator.client() as client,
        client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream,
    ):
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(emulator.state.text_chunks())
    assert _usage_of(final.usage) == EXPECTED
    assert "message_stop" in kinds
    assert emulator.state.requests[-1].usage == USAGE


async def test_sdk_counts_tokens_and_lists_models(emulator: Emulator) -> None:
    """count_tokens answers the total input; models.list pages through every model one at a time."""
    async with emulator.client() as client:
        counted = await client.messages.count_tokens(model=MODEL, messages=MESSAGES)
        ids = [model.id async for model in client.models.list(limit=1)]
    assert counted.input_tokens == USAGE.total_input_tokens
    assert ids == [model["id"] for model in MODELS]
    routes = [r.route for r in emulator.state.requests]
    assert routes == ["anthropic.count_tokens"] + ["anthropic.models"] * len(MODELS)
    assert all(r.verdict == "ok" for r in emulator.state.requests)


async def test_models_list_pages_backwards(emulator: Emulator) -> None:
    """before_id returns the page just before the cursor, and a bad limit is a 400."""
    headers = {"x-api-key": TEST_ANTHROPIC_API_KEY, "anthropic-version": "2023-06-01"}
    last = MODELS[-1]["id"]
    async with emulator.http.get(f"{emulator.url}/v1/models?before_id={last}&limit=1", headers=headers) as r:
        page = await r.json()
    assert [m["id"] for m in page["data"]] == [MODELS[-2]["id"]]
    assert page["has_more"] is True
    async with emulator.http.get(f"{emulator.url}/v1/models?limit=0", headers=headers) as r:
        assert r.status == 400


async def test_wrong_key_is_an_authentication_error(emulator: Emulator) -> None:
    """A key the emulator does not hold gets the API's 401 authentication_error through the SDK."""
    async with emulator.client("sk-ant-not-the-key") as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid bearer token"},
    }
    assert emulator.state.requests[-1].verdict == "authentication_error: invalid bearer token"


async def test_the_gateway_form_of_the_key_is_accepted(emulator: Emulator) -> None:
    """The key in x-api-key alone (how the gateway sends it) is served on every route."""
    headers = {"x-api-key": TEST_ANTHROPIC_API_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "messages": MESSAGES}
    status, answer = await emulator.post("/v1/messages/count_tokens", body, headers)
    assert (status, answer) == (200, {"input_tokens": USAGE.total_input_tokens})
    assert "authorization" not in emulator.state.requests[-1].headers


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "x-api-key header is required"),
        ({"authorization": "Basic dXNlcjpwdw=="}, "x-api-key header is required"),
        ({"authorization": "Bearer gateway-access-token"}, "invalid bearer token"),
        ({"x-api-key": "gateway-access-token"}, "invalid x-api-key"),
        (
            {"x-api-key": TEST_ANTHROPIC_API_KEY, "authorization": "Bearer gateway-access-token"},
            "invalid bearer token",
        ),
    ],
)
async def test_every_credential_sent_must_be_a_held_key(
    emulator: Emulator, headers: dict[str, str], message: str
) -> None:
    """A missing key, a foreign key or a foreign token beside the right key is a 401."""
    body = {"model": MODEL, "max_tokens": 8, "messages": MESSAGES}
    status, answer = await emulator.post("/v1/messages", body, {"anthropic-version": "2023-06-01", **headers})
    assert status == 401
    assert answer == {"type": "error", "error": {"type": "authentication_error", "message": message}}


OK_BODY = {"model": MODEL, "max_tokens": 8, "messages": MESSAGES}


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({}, OK_BODY, 400, "anthropic-version: header is required"),
        ({"anthropic-version": "v1"}, OK_BODY, 400, "not a valid version"),
        (None, {"model": MODEL, "messages": MESSAGES}, 400, "max_tokens: Field required"),
        (
            None,
            {**OK_BODY, "anthropic_version": "bedrock-2023-05-31"},
            400,
            "anthropic_version: Extra inputs are not permitted",
        ),
        (None, {**OK_BODY, "model": "us.anthropic.claude-opus-5-5"}, 404, "model:"),
    ],
)
async def test_version_header_and_body_are_checked(
    emulator: Emulator, headers: dict[str, str] | None, body: dict[str, Any], status: int, message: str
) -> None:
    """The version header, required fields, the cloud formats' extra fields and the model id are checked."""
    sent = {"x-api-key": TEST_ANTHROPIC_API_KEY}
    sent.update({"anthropic-version": "2023-06-01"} if headers is None else headers)
    got, answer = await emulator.post("/v1/messages", body, sent)
    assert got == status
    assert answer["type"] == "error"
    assert message in answer["error"]["message"]


async def test_scenarios(emulator: Emulator) -> None:
    """too_long is a 'prompt is too long' 400; exception_midstream ends a stream with an error event."""
    emulator.state.apply_patch({"scenario": "too_long"})
    async with emulator.client() as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
        assert "prompt is too long" in str(info.value)
        emulator.state.apply_patch({"scenario": "exception_midstream"})
        with pytest.raises(anthropic.APIStatusError) as streamed:
            async with client.messages.stream(model=MODEL, max_tokens=8, messages=MESSAGES) as stream:
                async for _ in stream:
                    pass
    assert "overloaded_error" in str(streamed.value)
    assert emulator.state.requests[-1].usage is None


async def test_no_verify_skips_the_key_and_state_hides_keys(emulator: Emulator) -> None:
    """With verify off any key is served; the state document counts the keys without showing them."""
    emulator.state.verify = False
    async with emulator.client("sk-ant-anything") as client:
        await client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    assert emulator.state.requests[-1].verdict == "skipped"
    async with emulator.http.get(f"{emulator.url}/_emulator/state") as response:
        text = await response.text()
    assert json.loads(text)["anthropic_api_keys"] == 1
    assert TEST_ANTHROPIC_API_KEY not in text
