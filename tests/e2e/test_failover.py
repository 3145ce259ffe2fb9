"""Failover through the real Envoy: a request whose first upstream fails before answering (503, 529,
a refused connection) is answered by the policy's next one, signed (and translated) for it, and its
one usage row names it and the attempts; a failure once the answer started is never retried; when
every upstream fails the client gets the last one's error and one row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import Anthropic, AnthropicBedrock

from authz.dev.devstack import Stack
from backends.emulator import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
from tests.e2e.conftest import (
    ALT_ACCESS_KEY_ID,
    ALT_SECRET_ACCESS_KEY,
    VERTEX_GROUP,
    rows_for_user,
    single_row,
    wait_for,
)
from tests.e2e.test_messages import (
    DELTAS,
    MODEL,
    PROMPT,
    TEXT,
    USAGE,
    assert_exact_usage,
    emulator_events,
    sse_events,
)

pytestmark = pytest.mark.e2e

SONNET_PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_ID = "claude-sonnet-4-5@20250929"

_OPEN: list[Anthropic | AnthropicBedrock] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every SDK client a test made, so no connection outlives its test."""
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture
def emulator(emulator_reset: Stack) -> Stack:
    """The emulator answers with known usage and text, and knows the second Bedrock upstream's key."""
    keys = {TEST_ACCESS_KEY_ID: TEST_SECRET_ACCESS_KEY, ALT_ACCESS_KEY_ID: ALT_SECRET_ACCESS_KEY}
    emulator_reset.emulator(
        "POST", "/_emulator/state", {"usage": USAGE, "text": TEXT, "deltas": DELTAS, "aws_keys": keys}
    )
    return emulator_reset


def fail(stack: Stack, status: int, *kinds: str, count: int | None = None) -> None:
    """Make the emulated clouds of ``kinds`` (all when none) fail the next ``count`` requests."""
    stack.emulator(
        "POST", "/_emulator/state", {"fail": {"status": status, "kinds": list(kinds), "count": count}}
    )


def messages_client(stack: Stack, email: str, group: str) -> Anthropic:
    made = Anthropic(
        api_key=None, auth_token=stack.mint(email, (group,)), base_url=stack.envoy_url, max_retries=0
    )
    _OPEN.append(made)
    return made


def bedrock_client(stack: Stack, email: str, group: str) -> AnthropicBedrock:
    made = AnthropicBedrock(
        api_key=stack.mint(email, (group,)), base_url=stack.envoy_url, aws_region="us-east-1", max_retries=0
    )
    _OPEN.append(made)
    return made


def served(stack: Stack) -> list[dict[str, Any]]:
    """The inference requests the emulated clouds received, in order."""
    records = stack.emulator("GET", "/_emulator/requests")
    return [r for r in records if r["route"].startswith(("bedrock.", "vertex.", "anthropic."))]


def _credential(record: dict[str, Any]) -> str:
    """The access key id a Bedrock request was signed with."""
    return str(record["headers"]["authorization"].split("Credential=")[1].split("/")[0])


# --- answered by the next upstream --------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 529])
def test_messages_from_a_failing_bedrock_are_answered_by_vertex(
    emulator: Stack, unique_user: str, status: int
) -> None:
    """Bedrock answering 503 or 529, the developers' Messages stream is served by Vertex, signed with
    Vertex's token; the client gets Vertex's stream unchanged and one exact row names Vertex after
    two attempts."""
    fail(emulator, status, "bedrock")
    headers, events = sse_events(
        messages_client(emulator, unique_user, "developers"), model=MODEL, max_tokens=64, messages=PROMPT
    )
    assert [(name, data) for name, data in events] == [
        (e["type"], e) for e in emulator_events("vertex", VERTEX_ID)
    ]
    assert "x-gateway-answered" not in headers and "x-gateway-attempts" not in headers
    first, second = served(emulator)
    assert (first["route"], first["status"], first["verdict"]) == (
        "bedrock.invoke-with-response-stream",
        status,
        "ok",
    )
    assert (second["route"], second["status"], second["verdict"]) == ("vertex.streamRawPredict", 200, "ok")
    assert second["body_keys"] == ["anthropic_version", "max_tokens", "messages", "stream"]
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["outcome"], row["status"]) == (
        "vertex-dev",
        2,
        "complete",
        200,
    )
    assert row["upstream_model"] == VERTEX_ID
    assert_exact_usage(row)


def test_messages_from_a_failing_vertex_are_translated_from_bedrock(
    emulator: Stack, unique_user: str
) -> None:
    """Vertex overloaded (529), a Messages stream of the Vertex-first policy is served by Bedrock:
    Bedrock's body is signed with SigV4, its event stream reaches the client as the API's SSE,
    metered as Bedrock's, in one row naming Bedrock."""
    fail(emulator, 529, "vertex")
    _, events = sse_events(
        messages_client(emulator, unique_user, VERTEX_GROUP), model=MODEL, max_tokens=64, messages=PROMPT
    )
    content = [(name, data) for name, data in events if name != "ping"]
    assert content == [(e["type"], e) for e in emulator_events("bedrock", SONNET_PROFILE)]
    first, second = served(emulator)
    assert (first["route"], first["status"]) == ("vertex.streamRawPredict", 529)
    assert (second["route"], second["status"], second["verdict"]) == (
        "bedrock.invoke-with-response-stream",
        200,
        "ok",
    )
    assert "anthropic_version" in second["body_keys"] and "model" not in second["body_keys"]
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["upstream_model"]) == ("bedrock-dev", 2, SONNET_PROFILE)
    assert_exact_usage(row)


def test_a_bedrock_stream_is_signed_again_for_the_second_bedrock(emulator: Stack, unique_user: str) -> None:
    """A Bedrock-format stream whose first upstream answers 503 is sent to the second with a new
    SigV4 signature over the same body, made with the second upstream's own key; the emulator
    verifies both, and the row names the second."""
    fail(emulator, 503, count=1)
    client = bedrock_client(emulator, unique_user, "failover-bedrock")
    with client.messages.stream(model=SONNET_PROFILE, max_tokens=64, messages=PROMPT) as stream:
        assert stream.get_final_text() == TEXT
    first, second = served(emulator)
    assert (first["status"], first["verdict"], _credential(first)) == (503, "ok", TEST_ACCESS_KEY_ID)
    assert (second["status"], second["verdict"], _credential(second)) == (200, "ok", ALT_ACCESS_KEY_ID)
    assert first["body_length"] == second["body_length"] and first["raw_path"] == second["raw_path"]
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["ingress_format"]) == ("bedrock-alt", 2, "bedrock")
    assert_exact_usage(row)


def test_a_refused_connection_fails_over(emulator: Stack, unique_user: str) -> None:
    """The policy's first upstream refusing connections, the request is answered by the next, which
    is the only one the emulator saw; the row counts both attempts."""
    message = bedrock_client(emulator, unique_user, "failover-refused").messages.create(
        model=SONNET_PROFILE, max_tokens=64, messages=PROMPT
    )
    assert message.usage.output_tokens == USAGE["output_tokens"]
    (only,) = served(emulator)
    assert (only["route"], only["status"], only["verdict"]) == ("bedrock.invoke", 200, "ok")
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["outcome"]) == ("bedrock-dev", 2, "complete")


# --- never retried ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["cut_midstream", "exception_midstream"])
def test_a_failure_after_the_first_byte_is_not_retried(
    emulator: Stack, unique_user: str, scenario: str
) -> None:
    """Once the answer started, a cut or an in-stream error reaches the client as it is: the
    request is not sent to the next upstream, and the row names the first after one attempt."""
    # Spaced events: the client has the first ones before the failure.
    emulator.emulator("POST", "/_emulator/state", {"scenario": scenario, "deltas": 20, "delay": 0.02})
    token = emulator.mint(unique_user, ("developers",))
    received, cut = b"", False
    with httpx.Client(timeout=30) as client:
        try:
            with client.stream(
                "POST",
                f"{emulator.envoy_url}/v1/messages",
                headers={"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"},
                json={"model": MODEL, "max_tokens": 64, "messages": PROMPT, "stream": True},
            ) as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_bytes():
                    received += chunk
        except httpx.HTTPError:
            cut = True
    assert received.startswith(b"event: message_start\n")
    assert cut or b"event: error\n" in received
    (only,) = served(emulator)
    assert only["route"] == "bedrock.invoke-with-response-stream"
    # Who cut a stream is Envoy's to say: its access-log report completes ext_proc's row.
    by = ("access_log",) if scenario == "cut_midstream" else ("ext_proc", "access_log")
    row = wait_for(
        lambda: [r for r in rows_for_user(emulator.database_url, unique_user) if r["recorded_by"] in by]
    )[0]
    assert (row["upstream"], row["attempts"], row["outcome"]) == ("bedrock-dev", 1, "upstream_error")


def test_a_lone_upstream_is_not_retried(emulator: Stack, unique_user: str) -> None:
    """A request only one upstream serves (the developers' Bedrock format) takes no failover route:
    its 503 is the answer after one attempt."""
    fail(emulator, 503, count=1)
    with pytest.raises(anthropic.APIStatusError) as caught:
        bedrock_client(emulator, unique_user, "developers").messages.create(
            model=SONNET_PROFILE, max_tokens=64, messages=PROMPT
        )
    assert caught.value.status_code == 529  # Bedrock's 503 is the API's overloaded_error
    assert len(served(emulator)) == 1
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["outcome"]) == ("bedrock-dev", 1, "upstream_error")


# --- every upstream failed -----------------------------------------------------------------------------


def test_when_every_upstream_fails_the_last_error_is_the_answer(emulator: Stack, unique_user: str) -> None:
    """Bedrock rate-limited (429) and Vertex failing (500): the client gets Vertex's error in the
    Messages envelope, not Bedrock's, and one row names Vertex after two attempts."""
    fail(emulator, 429, "bedrock")
    emulator.emulator("POST", "/_emulator/state", {"scenario": "server_error"})
    with pytest.raises(anthropic.APIStatusError) as caught:
        messages_client(emulator, unique_user, "developers").messages.create(
            model=MODEL, max_tokens=64, messages=PROMPT
        )
    assert caught.value.status_code == 502
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The upstream failed to answer."},
    }
    assert [(r["route"].split(".")[0], r["status"]) for r in served(emulator)] == [
        ("bedrock", 429),
        ("vertex", 500),
    ]
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["outcome"], row["status"]) == (
        "vertex-dev",
        2,
        "upstream_error",
        502,
    )


def test_when_no_upstream_accepts_a_connection_the_client_gets_one_error(
    emulator: Stack, unique_user: str
) -> None:
    """Both upstreams refusing connections: one envelope in the client's format and one row naming
    the last upstream tried after two attempts; nothing reached the emulator."""
    resp = httpx.post(
        f"{emulator.envoy_url}/model/{SONNET_PROFILE}/invoke",
        headers={"authorization": f"Bearer {emulator.mint(unique_user, ('failover-dead',))}"},
        content=json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": PROMPT}),
    )
    assert resp.status_code >= 500
    assert resp.json()["type"] == "error"
    assert "x-gateway-answered" not in resp.headers
    assert served(emulator) == []
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["outcome"]) == ("bedrock-down-too", 2, "upstream_error")


def test_an_attempt_that_cannot_be_signed_is_answered_not_failed_over(
    emulator: Stack, unique_user: str
) -> None:
    """When the gateway cannot obtain the first upstream's credential (its role cannot be assumed),
    the client gets the gateway's own 502, nothing reaches a cloud, and the row says why and names
    that upstream."""
    with pytest.raises(anthropic.APIStatusError) as caught:
        bedrock_client(emulator, unique_user, "failover-unsignable").messages.create(
            model=SONNET_PROFILE, max_tokens=64, messages=PROMPT
        )
    assert caught.value.status_code == 502
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The gateway could not prepare the upstream request."},
    }
    assert served(emulator) == []
    row = single_row(emulator, unique_user)
    assert (row["upstream"], row["attempts"], row["outcome"], row["status"]) == (
        "bedrock-norole",
        1,
        "error",
        502,
    )
    assert row["reason"].startswith("upstream preparation:")
