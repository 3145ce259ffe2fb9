"""The Messages API format through the real Envoy, with the official ``anthropic`` SDK, to each kind
of upstream: Bedrock (translated), Vertex (rewritten and relayed) and the Anthropic API (relayed
with the gateway's key)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import Anthropic
from anthropic._streaming import SSEDecoder

from authz.dev.devstack import DEFAULT_PROJECT, Stack
from backends.emulator.anthropic_api import stream_events
from backends.emulator.canned import canned_events
from backends.emulator.state import TEST_ANTHROPIC_API_KEY, EmulatorState
from backends.usage import Usage
from tests.bench_arms import _conversation
from tests.e2e.conftest import ANTHROPIC_GROUP, BODY_CAP, VERTEX_GROUP, single_row
from tests.e2e.conftest import assert_exact_usage as assert_usage_is

pytestmark = pytest.mark.e2e

USAGE = {
    "input_tokens": 1500,
    "output_tokens": 222,
    "cache_creation_input_tokens": 60,
    "cache_creation_5m_input_tokens": 45,
    "cache_creation_1h_input_tokens": 15,
    "cache_read_input_tokens": 7000,
}
TEXT = "Translated faithfully, every byte. "
DELTAS = 6
PROMPT = [{"role": "user", "content": "Say hello."}]
# (case name, the groups whose policy puts that kind of upstream first, upstream, upstream model id)
KINDS = [
    ("bedrock", ("developers",), "bedrock-dev", "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    ("vertex", (VERTEX_GROUP,), "vertex-dev", "claude-sonnet-4-5@20250929"),
    ("anthropic", (ANTHROPIC_GROUP,), "anthropic-dev", "claude-sonnet-4-5"),
]
MODEL = "claude-sonnet-4-5"

_OPEN: list[Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every SDK client a test made, so no connection outlives its test."""
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture
def usage(emulator_reset: Stack) -> Stack:
    """The emulator answers with known usage and text."""
    emulator_reset.emulator("POST", "/_emulator/state", {"usage": USAGE, "text": TEXT, "deltas": DELTAS})
    return emulator_reset


def client(stack: Stack, email: str, groups: tuple[str, ...]) -> Anthropic:
    """The SDK client as Claude Code's gateway mode uses it: a bearer token and the gateway's URL."""
    made = Anthropic(
        api_key=None, auth_token=stack.mint(email, groups), base_url=stack.envoy_url, max_retries=0
    )
    _OPEN.append(made)
    return made


def served(stack: Stack) -> list[dict[str, Any]]:
    """What the emulated clouds were asked, but for the gateway's own credential fetches."""
    records = stack.emulator("GET", "/_emulator/requests")
    return [r for r in records if r["route"].startswith(("bedrock.", "vertex.", "anthropic."))]


def assert_exact_usage(row: dict[str, Any]) -> None:
    """The row carries exactly the counts the emulator reported."""
    assert_usage_is(row, USAGE)


def emulator_events(case: str, model_id: str) -> list[dict[str, Any]]:
    """The events the emulator streams for ``case`` (what the client must get back)."""
    state = EmulatorState(text=TEXT, deltas=DELTAS)
    usage = Usage(**USAGE)
    if case == "anthropic":
        return stream_events(model=model_id, text_chunks=state.text_chunks(), usage=usage, cut_by_error=False)
    return canned_events(model=model_id, text_chunks=state.text_chunks(), usage=usage)


def sse_events(made: Anthropic, **params: Any) -> tuple[httpx.Headers, list[tuple[str | None, Any]]]:
    """The response headers and ``(event, data)`` of a streamed call, framed by the SDK's decoder."""
    with made.messages.with_streaming_response.create(stream=True, **params) as response:
        assert response.status_code == 200, response.read()
        decoded = [
            (sse.event, json.loads(sse.data)) for sse in SSEDecoder().iter_bytes(response.iter_bytes())
        ]
        return response.headers, decoded


@pytest.mark.parametrize(("case", "groups", "upstream", "model_id"), KINDS, ids=[k[0] for k in KINDS])
def test_create_is_answered_and_accounted(
    usage: Stack, unique_user: str, case: str, groups: tuple[str, ...], upstream: str, model_id: str
) -> None:
    """A non-streaming messages.create returns the upstream's message and leaves an exact row."""
    message = client(usage, unique_user, groups).messages.create(model=MODEL, max_tokens=64, messages=PROMPT)
    assert message.content[0].type == "text" and message.content[0].text == TEXT
    assert message.usage.input_tokens == USAGE["input_tokens"]
    row = single_row(usage, unique_user)
    assert_exact_usage(row)
    assert (row["status"], row["outcome"], row["reason"]) == (200, "complete", None)
    assert (row["ingress_format"], row["operation"], row["upstream"]) == ("messages", "invoke", upstream)
    assert (row["requested_model"], row["upstream_model"]) == (MODEL, model_id)
    assert row["cost_usd"] > 0
    [record] = served(usage)
    assert record["verdict"] == "ok" and record["model_id"] == model_id


@pytest.mark.parametrize(("case", "groups", "upstream", "model_id"), KINDS, ids=[k[0] for k in KINDS])
def test_stream_events_equal_the_upstreams(
    usage: Stack, unique_user: str, case: str, groups: tuple[str, ...], upstream: str, model_id: str
) -> None:
    """A streamed answer reaches the client as the Messages API's SSE: the same events the upstream
    produced (Bedrock's invocation metrics removed), parsed by the SDK's own decoder, and the row
    has the exact counts."""
    made = client(usage, unique_user, groups)
    headers, events = sse_events(made, model=MODEL, max_tokens=64, messages=PROMPT)
    assert headers["content-type"].startswith("text/event-stream")
    # Keep-alives may come at any silence; the content is everything else.
    content = [(name, data) for name, data in events if name != "ping" or case == "anthropic"]
    expected = emulator_events(case, model_id)
    assert content == [(event["type"], event) for event in expected]
    assert "amazon-bedrock-invocationMetrics" not in json.dumps(events)
    row = single_row(usage, unique_user)
    assert_exact_usage(row)
    assert (row["outcome"], row["operation"], row["upstream"]) == ("complete", "stream", upstream)
    assert row["upstream_model"] == model_id


@pytest.mark.parametrize(("case", "groups", "upstream", "model_id"), KINDS, ids=[k[0] for k in KINDS])
def test_sdk_stream_helper_reads_the_answer(
    usage: Stack, unique_user: str, case: str, groups: tuple[str, ...], upstream: str, model_id: str
) -> None:
    """The SDK's messages.stream helper assembles the text and the final usage."""
    made = client(usage, unique_user, groups)
    with made.messages.stream(model=MODEL, max_tokens=64, messages=PROMPT) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens == USAGE["output_tokens"]
    assert final.usage.cache_read_input_tokens == USAGE["cache_read_input_tokens"]


@pytest.mark.parametrize(("case", "groups", "upstream", "model_id"), KINDS, ids=[k[0] for k in KINDS])
def test_count_tokens(
    usage: Stack, unique_user: str, case: str, groups: tuple[str, ...], upstream: str, model_id: str
) -> None:
    """messages.count_tokens answers with the upstream's count, in the API's shape, free."""
    counted = client(usage, unique_user, groups).messages.count_tokens(model=MODEL, messages=PROMPT)
    total = USAGE["input_tokens"] + USAGE["cache_creation_input_tokens"] + USAGE["cache_read_input_tokens"]
    assert counted.input_tokens == total
    row = single_row(usage, unique_user)
    assert (row["operation"], row["outcome"], row["upstream"]) == ("count_tokens", "complete", upstream)
    assert row["cost_usd"] == 0
    [record] = served(usage)
    assert record["verdict"] == "ok"
    if case == "bedrock":
        # CountTokens takes the foundation model, never the inference profile.
        assert record["model_id"] == "anthropic.claude-sonnet-4-5-20250929-v1:0"
        assert record["raw_path"].endswith("/count-tokens")


@pytest.mark.parametrize(("case", "groups", "upstream", "model_id"), KINDS, ids=[k[0] for k in KINDS])
def test_models_list_is_the_policys_models(
    usage: Stack, unique_user: str, case: str, groups: tuple[str, ...], upstream: str, model_id: str
) -> None:
    """models.list answers without an upstream call: the models the user's policy allows, by
    Anthropic-style ids, in the API's list shape."""
    page = client(usage, unique_user, groups).models.list()
    ids = [model.id for model in page.data]
    if case == "bedrock":
        # The developers may use Sonnet, Haiku and Opus 5.5, not Opus 5 or Opus 4.x.
        assert ids == [
            "claude-opus-5-5",
            "claude-sonnet-5",
            "claude-sonnet-4-6",
            "claude-haiku-4-5",
            "claude-sonnet-4-5",
        ]
    else:
        assert ids == ["claude-sonnet-5", "claude-sonnet-4-6", "claude-haiku-4-5", "claude-sonnet-4-5"]
    assert all(model.type == "model" and model.display_name.startswith("Claude ") for model in page.data)
    assert served(usage) == []
    row = single_row(usage, unique_user)
    assert (row["operation"], row["status"], row["outcome"]) == ("list_models", 200, "complete")


def test_large_body_and_unknown_fields_pass_through(usage: Stack, unique_user: str) -> None:
    """A 60 KB Claude Code-sized body is translated for Bedrock; unknown body fields, unknown betas
    and unknown headers reach the upstream untouched (betas in the body, for Bedrock), and tags and
    the request-tags beta, which Bedrock refuses, do not."""
    system, messages = _conversation(60_000)
    made = client(usage, unique_user, ("developers",))
    message = made.messages.create(
        model=MODEL,
        max_tokens=64,
        system=system,
        messages=messages,
        extra_body={"future_field": {"keep": [1, 2]}, "tags": {"team": "x"}},
        extra_headers={
            "anthropic-beta": ",".join(
                ["some-future-beta-2031-01-01", "request-tags-2026-08-21", "interleaved-thinking-2025-05-14"]
            ),
            "x-unknown-header": "kept",
        },
    )
    assert message.content[0].text == TEXT
    [record] = served(usage)
    assert record["body_length"] > 60_000
    assert "future_field" in record["body_keys"] and "system" in record["body_keys"]
    assert "tags" not in record["body_keys"] and "model" not in record["body_keys"]
    assert record["body_betas"] == ["some-future-beta-2031-01-01", "interleaved-thinking-2025-05-14"]
    assert record["headers"]["x-unknown-header"] == "kept"
    assert_exact_usage(single_row(usage, unique_user))


def test_vertex_keeps_betas_in_the_header(usage: Stack, unique_user: str) -> None:
    """For Vertex the betas stay a header (without the request-tags beta) and the request goes to
    the configured project; unknown fields pass, tags do not."""
    made = client(usage, unique_user, (VERTEX_GROUP,))
    made.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=PROMPT,
        extra_body={"future_field": True, "tags": {"team": "x"}},
        extra_headers={"anthropic-beta": "request-tags-2026-08-21,some-future-beta-2031-01-01"},
    )
    [record] = served(usage)
    assert record["headers"]["anthropic-beta"] == "some-future-beta-2031-01-01"
    assert f"/projects/{DEFAULT_PROJECT}/locations/us-east5/" in record["raw_path"]
    assert "future_field" in record["body_keys"] and "tags" not in record["body_keys"]


def test_anthropic_gets_the_gateway_key_only(usage: Stack, unique_user: str) -> None:
    """The Anthropic API sees the configured key, never the client's credential; tags and betas pass."""
    token = usage.mint(unique_user, (ANTHROPIC_GROUP,))
    made = Anthropic(api_key=token, base_url=usage.envoy_url, max_retries=0)
    _OPEN.append(made)
    made.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=PROMPT,
        extra_body={"tags": {"team": "x"}},
        extra_headers={"anthropic-beta": "request-tags-2026-08-21"},
    )
    [record] = served(usage)
    assert record["headers"]["x-api-key"] == TEST_ANTHROPIC_API_KEY
    assert "authorization" not in record["headers"]
    assert token not in json.dumps(record["headers"])
    assert "tags" in record["body_keys"]
    assert record["headers"]["anthropic-beta"] == "request-tags-2026-08-21"


def _post(stack: Stack, token: str, body: bytes, path: str = "/v1/messages?beta=true") -> httpx.Response:
    headers = {
        "authorization": f"Bearer {token}",
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
    }
    return httpx.post(f"{stack.envoy_url}{path}", headers=headers, content=body, timeout=30)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [', "not valid JSON"),
        (b'{"max_tokens": 5, "messages": []}', "model: Field required"),
        (b'{"model": 45, "max_tokens": 5, "messages": []}', "model: Input should be a valid string"),
        (
            b'{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [], "model": "claude-opus-4-1"}',
            "appears twice",
        ),
        (b'{"model": "claude-opus-4-1", "max_tokens": 5, "messages": []}', "is not allowed for your groups"),
        (b'{"model": "claude-sonnet-4", "max_tokens": 5, "messages": []}', "model_map.claude-sonnet-4"),
        (b'["claude-sonnet-4-5"]', "must be a JSON object"),
    ],
    ids=[
        "invalid-json",
        "missing-model",
        "non-string-model",
        "model-twice",
        "denied",
        "unmapped",
        "not-object",
    ],
)
def test_bad_requests_are_400_before_any_upstream(
    emulator_reset: Stack, unique_user: str, body: bytes, problem: str
) -> None:
    """A body the gateway cannot judge, or a model the policy refuses or no upstream id maps, is a
    400 invalid_request_error; nothing reaches the upstream and a denied row names the policy."""
    resp = _post(emulator_reset, emulator_reset.mint(unique_user), body)
    assert resp.status_code == 400, resp.text
    error = resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert problem in error["error"]["message"]
    assert served(emulator_reset) == []
    row = single_row(emulator_reset, unique_user)
    assert (row["status"], row["outcome"], row["policy"]) == (400, "denied", "developers")
    assert row["ingress_format"] == "messages"


def test_denied_model_through_the_sdk(emulator_reset: Stack, unique_user: str) -> None:
    """The SDK raises BadRequestError with the gateway's reason for a model the policy refuses."""
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(emulator_reset, unique_user, ("developers",)).messages.create(
            model="claude-opus-5", max_tokens=5, messages=PROMPT
        )
    assert "not allowed" in str(caught.value)
    assert single_row(emulator_reset, unique_user)["requested_model"] == "claude-opus-5"


def test_body_over_the_cap_is_413(emulator_reset: Stack, unique_user: str) -> None:
    """A body over limits.max_request_body_bytes is refused with 413 request_too_large."""
    filler = "x" * (BODY_CAP + 10)
    body = json.dumps({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": filler}]})
    resp = _post(emulator_reset, emulator_reset.mint(unique_user), body.encode())
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "request_too_large"
    assert served(emulator_reset) == []


def test_bedrock_exception_midstream_is_an_error_event(usage: Stack, unique_user: str) -> None:
    """An exception frame in Bedrock's stream reaches the client as one SSE error event of the
    Anthropic type; the row is upstream_error with the tokens seen before it."""
    usage.emulator("POST", "/_emulator/state", {"scenario": "exception_midstream"})
    _, events = sse_events(
        client(usage, unique_user, ("developers",)), model=MODEL, max_tokens=64, messages=PROMPT
    )
    errors = [data for name, data in events if name == "error"]
    assert errors == [
        {
            "type": "error",
            "error": {"type": "api_error", "message": "The upstream failed while streaming the answer."},
        }
    ]
    assert events[-1][0] == "error"
    row = single_row(usage, unique_user)
    assert row["outcome"] == "upstream_error" and "internalServerException" in row["reason"]
    assert row["input_tokens"] == USAGE["input_tokens"]


def test_bedrock_too_long_is_the_apis_recovery_message(emulator_reset: Stack, unique_user: str) -> None:
    """Bedrock's `Input is too long.` reaches a Messages client as the API's "prompt is too long"."""
    emulator_reset.emulator("POST", "/_emulator/state", {"scenario": "too_long"})
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(emulator_reset, unique_user, ("developers",)).messages.create(
            model=MODEL, max_tokens=5, messages=PROMPT
        )
    assert caught.value.body["error"]["message"].startswith("prompt is too long")  # type: ignore[index]


def test_upstream_error_text_is_hidden(emulator_reset: Stack, unique_user: str) -> None:
    """An upstream 500 naming accounts becomes a generic api_error envelope."""
    emulator_reset.emulator("POST", "/_emulator/state", {"scenario": "server_error"})
    with pytest.raises(anthropic.APIStatusError) as caught:
        client(emulator_reset, unique_user, ("developers",)).messages.create(
            model=MODEL, max_tokens=5, messages=PROMPT
        )
    assert caught.value.status_code == 502
    assert "123456789012" not in caught.value.response.text
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_pings_fill_upstream_silence(usage: Stack, unique_user: str) -> None:
    """While Bedrock is silent for longer than translate.ping_interval the client gets event: ping
    (the stream is written in FULL_DUPLEX_STREAMED mode), and the content is unchanged."""
    usage.emulator("POST", "/_emulator/state", {"delay": 1.0, "deltas": 2})
    _, events = sse_events(
        client(usage, unique_user, ("developers",)), model=MODEL, max_tokens=64, messages=PROMPT
    )
    names = [name for name, _ in events]
    assert "ping" in names
    assert all(data == {"type": "ping"} for name, data in events if name == "ping")
    assert [n for n in names if n != "ping"][-1] == "message_stop"
    assert_exact_usage(single_row(usage, unique_user))
