"""The Messages-to-Bedrock translator: request rewriting, the event-stream answer as SSE (recorded
streams in any chunking), in-stream exceptions, keep-alives on an injected clock, token counting."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from anthropic._streaming import SSEDecoder

# The oracle: botocore decodes the recorded frames independently of the translator's reader.
from botocore.eventstream import EventStreamBuffer

from authz.identity import Caller as Who
from authz.identity import RequestIdentity
from authz.translate.base import Refused, TranslateOptions
from authz.translate.messages import read_request
from authz.translate.messages_to_bedrock import MessagesToBedrock
from backends.base import Caller, Endpoint, ModelRef, Operation, SignedRequest, Upstream
from backends.bedrock.ids import request_path
from backends.eventstream import chunk_frame, exception_frame
from backends.sse import PING
from backends.usage import Usage

STREAMS = Path(__file__).parent.parent / "fixtures" / "streams"
RECORDED = sorted(p.name for p in STREAMS.glob("bedrock_*.eventstream"))
PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
BODY = (
    b'{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"tags":{"team":"a"},'
    b'"messages":[{"role":"user","content":"hi"}],"future":{"x":[1, 2]}}'
)


class BedrockPaths:
    """The Bedrock upstream's path grammar, without credentials (the translator never signs)."""

    name = "bedrock-us"
    kind = "bedrock"
    endpoint = Endpoint.https("bedrock-runtime.us-east-1.amazonaws.com")

    def model_id(self, model: ModelRef) -> str:
        return model.upstream_id

    def path(self, operation: Operation, model_id: str | None, query: str = "") -> str:
        return request_path(operation, model_id, query)

    async def sign(
        self, *, method: str, path: str, headers: Mapping[str, str], body: bytes, caller: Caller
    ) -> SignedRequest:
        raise AssertionError("translators never sign")

    async def aclose(self) -> None:
        return None


_PROTOCOL_CHECK: Upstream = BedrockPaths()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def identity(operation: str = "stream", model_id: str = PROFILE) -> RequestIdentity:
    return RequestIdentity(
        request_id="req-1",
        started_at=1.0,
        client_format="messages",
        operation=operation,
        streaming=operation == "stream",
        caller=Who(sub="u", email="u@example.com", groups=("eng",), session_id=None),
        policy="eng",
        upstream="bedrock-us",
        upstream_kind="bedrock",
        requested_model="claude-sonnet-4-5",
        model="claude-sonnet-4-5-20250929",
        upstream_model=model_id,
    )


def translator(
    operation: str = "stream", body: bytes = BODY, clock: Clock | None = None, model_id: str = PROFILE
) -> MessagesToBedrock:
    options = TranslateOptions(ping_interval=10.0, clock=clock or Clock())
    request = read_request(body, count_tokens=operation == "count_tokens")
    return MessagesToBedrock(identity(operation, model_id), BedrockPaths(), request, options)


# --- the request --------------------------------------------------------------------------------------


def test_request_is_bedrocks_invoke_body() -> None:
    """model, stream and tags go; anthropic_version and the header's betas (minus request tags) come;
    every other member keeps its exact bytes; the betas header is not sent on."""
    headers = {"anthropic-beta": "a-2030-01-01, request-tags-2026-08-21,b-2031-02-02"}
    request = translator().request(headers, BODY)
    assert request.path == f"/model/{PROFILE.replace(':', '%3A')}/invoke-with-response-stream"
    assert request.body == (
        b'{"max_tokens":64,"messages":[{"role":"user","content":"hi"}],"future":{"x":[1, 2]},'
        b'"anthropic_version":"bedrock-2023-05-31","anthropic_beta":["a-2030-01-01","b-2031-02-02"]}'
    )
    assert ("content-type", "application/json") in request.set_headers
    assert set(request.remove_headers) == {"accept-encoding", "anthropic-beta"}


def test_request_without_betas_adds_none() -> None:
    """No anthropic-beta header: no anthropic_beta field; a non-streaming call goes to /invoke."""
    body = b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}'
    request = translator("invoke", body).request({}, body)
    assert request.path.endswith("/invoke")
    assert json.loads(request.body or b"") == {
        "max_tokens": 5,
        "messages": [],
        "anthropic_version": "bedrock-2023-05-31",
    }


def test_count_tokens_wraps_the_invoke_body_for_the_foundation_model() -> None:
    """count_tokens calls CountTokens on the foundation model (never the profile) with the InvokeModel
    body in base64, max_tokens added since InvokeModel requires it."""
    body = b'{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}'
    request = translator("count_tokens", body).request({}, body)
    assert request.path == "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/count-tokens"
    wrapped = json.loads(request.body or b"")
    inner = json.loads(base64.b64decode(wrapped["input"]["invokeModel"]["body"]))
    assert inner == {
        "messages": [{"role": "user", "content": "hi"}],
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 1,
    }


@pytest.mark.parametrize(
    "model_id",
    [
        "us.anthropic.claude-opus-5-5",
        "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abcdef123456",
    ],
)
def test_count_tokens_refuses_what_counttokens_cannot_count(model_id: str) -> None:
    """A profile without a foundation version or an application profile is a 501 not_supported
    with x-should-retry: false, before any upstream call."""
    body = b'{"model":"claude-opus-5-5","messages":[]}'
    with pytest.raises(Refused) as refused:
        translator("count_tokens", body, model_id=model_id).request({}, body)
    reply = refused.value.reply
    assert reply.status == 501
    assert ("x-should-retry", "false") in reply.headers
    assert json.loads(reply.body)["error"]["type"] == "not_supported"


def test_count_tokens_answer_is_the_apis_shape_and_failures_are_501() -> None:
    """Bedrock's {"inputTokens": N} reaches the client as {"input_tokens": N}; any upstream error is a
    501 not_supported the client falls back from."""
    counting = translator("count_tokens", b'{"model":"claude-sonnet-4-5","messages":[]}')
    start = counting.response_headers(200, {"content-type": "application/json", "content-length": "17"})
    assert start.buffer and "content-length" in start.remove_headers
    assert counting.response_chunk(b'{"inputTokens":42}', True) == b'{"input_tokens":42}'
    assert counting.usage().usage.input_tokens == 42
    mapped = counting.error(403, b'{"message":"not authorized for arn:aws:iam::123456789012"}', {})
    assert mapped.reply is not None and mapped.reply.status == 501
    assert b"123456789012" not in mapped.reply.body


# --- the streamed answer ----------------------------------------------------------------------------


def _chunkings(data: bytes) -> list[list[int] | None]:
    """Whole, one byte at a time, and 30 seeded random chunkings."""
    plans: list[list[int] | None] = [None, [1] * len(data)]
    for seed in range(30):
        rng = random.Random(seed)
        sizes: list[int] = []
        while sum(sizes) < len(data):
            sizes.append(rng.choice([0, 1, 2, 3, 7, 12, 13, 64, rng.randint(1, 500)]))
        plans.append(sizes)
    return plans


def _translate(
    data: bytes, plan: list[int] | None, clock: Clock | None = None
) -> tuple[bytes, MessagesToBedrock]:
    t = translator(clock=clock)
    assert t.response_headers(200, {"content-type": "application/vnd.amazon.eventstream"}).duplex
    if plan is None:
        return t.response_chunk(data, True) or b"", t
    out = b""
    start = 0
    for size in plan:
        out += t.response_chunk(data[start : start + size], False) or b""
        start += size
    out += t.response_chunk(data[start:], True) or b""
    return out, t


def _events_by_botocore(data: bytes) -> list[dict[str, Any]]:
    parser = EventStreamBuffer()
    parser.add_data(data)
    events = []
    for message in parser:
        if message.headers[":message-type"] != "event":
            continue
        event = json.loads(base64.b64decode(json.loads(message.payload)["bytes"]))
        event.pop("amazon-bedrock-invocationMetrics", None)
        events.append(event)
    return events


def _decoded(sse: bytes) -> list[tuple[str | None, Any]]:
    return [(e.event, json.loads(e.data)) for e in SSEDecoder().iter_bytes(iter([sse]))]


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_streams_give_byte_identical_sse_in_any_chunking(name: str) -> None:
    """Each recorded Bedrock stream becomes the same SSE bytes whole, one byte at a time and in random
    chunks: every event botocore decodes from it, named by its type, invocation metrics removed."""
    data = (STREAMS / name).read_bytes()
    reference, _ = _translate(data, None)
    decoded = _decoded(reference)
    content = [(n, e) for n, e in decoded if n != "error"]
    assert content == [(event["type"], event) for event in _events_by_botocore(data)]
    assert b"invocationMetrics" not in reference
    for plan in _chunkings(data):
        assert _translate(data, plan)[0] == reference


def test_complete_stream_counts_the_usage_exactly() -> None:
    """The usage of a translated stream is the events' (cache split included), and it is complete."""
    _, t = _translate((STREAMS / "bedrock_cache_split_padding.eventstream").read_bytes(), [5] * 2000)
    result = t.usage()
    assert result.complete and result.error_type is None and result.malformed is None
    assert result.usage == Usage(
        input_tokens=3,
        output_tokens=210,
        cache_creation_input_tokens=1500,
        cache_creation_5m_input_tokens=1000,
        cache_creation_1h_input_tokens=500,
        cache_read_input_tokens=20000,
    )


def test_exception_midstream_is_one_error_event() -> None:
    """A modelStreamErrorException after some events gives exactly one event: error (api_error), last;
    the usage seen so far and the exception are what the row will say."""
    data = (STREAMS / "bedrock_exception_midstream.eventstream").read_bytes()
    for plan in (None, [1] * len(data)):
        out, t = _translate(data, plan)
        decoded = _decoded(out)
        assert [n for n, _ in decoded].count("error") == 1
        assert decoded[-1] == (
            "error",
            {
                "type": "error",
                "error": {"type": "api_error", "message": "The upstream failed while streaming the answer."},
            },
        )
        result = t.usage()
        assert result.error_type == "modelStreamErrorException" and not result.complete
        assert result.usage.input_tokens == 40 and result.estimated_output_tokens == 3


@pytest.mark.parametrize(
    ("exception", "message", "error_type", "client_message"),
    [
        (
            "throttlingException",
            "Too many requests, account 123456789012",
            "rate_limit_error",
            "rate limiting",
        ),
        ("serviceUnavailableException", "Service unavailable", "overloaded_error", "overloaded"),
        ("validationException", "Input is too long.", "invalid_request_error", "prompt is too long"),
        (
            "validationException",
            "bad field for arn:aws:iam::123456789012:role/x",
            "invalid_request_error",
            "rejected",
        ),
        ("modelStreamErrorException", "stream broke", "api_error", "failed"),
        ("internalServerException", "oops", "api_error", "failed"),
    ],
)
def test_exceptions_map_to_anthropic_error_types(
    exception: str, message: str, error_type: str, client_message: str
) -> None:
    """Each Bedrock exception becomes its Anthropic error type; the upstream's wording is hidden but
    for "Input is too long.", which becomes the API's "prompt is too long"."""
    data = chunk_frame({"type": "ping"}) + exception_frame(exception, message)
    out, _ = _translate(data, None)
    [error] = [e for n, e in _decoded(out) if n == "error"]
    assert error["error"]["type"] == error_type
    assert client_message in error["error"]["message"]
    assert "123456789012" not in out.decode()


def test_corrupt_stream_ends_with_one_error_event() -> None:
    """A frame failing its CRC ends the translation with one api_error event; nothing after it is
    written, and the usage says the upstream data was malformed."""
    frames = [
        chunk_frame({"type": "ping"}),
        bytearray(chunk_frame({"type": "ping"})),
        chunk_frame({"type": "ping"}),
    ]
    frames[1][-1] ^= 0x01
    out, t = _translate(b"".join(bytes(f) for f in frames), [3] * 100)
    assert [n for n, _ in _decoded(out)] == ["ping", "error"]
    assert t.usage().malformed is not None


def test_stream_ending_early_gets_an_error_event() -> None:
    """An answer that stops before message_stop without an exception is not passed off as whole."""
    data = (STREAMS / "bedrock_basic.eventstream").read_bytes()
    cut = data[: len(data) // 2]
    out, t = _translate(cut, None)
    assert _decoded(out)[-1][0] == "error"
    assert not t.usage().complete


# --- keep-alives -------------------------------------------------------------------------------------


def test_pings_fill_silence_on_the_injected_clock() -> None:
    """No keep-alive before the body starts; then ping_interval after the last write one is due, and
    each write (or ping) pushes the next; none once the answer ended."""
    clock = Clock()
    t = translator(clock=clock)
    t.response_headers(200, {})
    assert t.next_ping() is None and t.ping() is None
    frames = [
        chunk_frame(e)
        for e in ({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}, {"type": "ping"})
    ]
    t.response_chunk(frames[0], False)
    assert t.next_ping() == 1010.0
    clock.now = 1009.999
    assert t.ping() is None
    clock.now = 1010.0
    assert t.ping() == PING
    assert t.next_ping() == 1020.0
    clock.now = 1015.0
    assert t.response_chunk(frames[1][:5], False) == b""  # nothing written: the deadline stands
    assert t.next_ping() == 1020.0
    assert t.response_chunk(frames[1][5:], False)  # the event is written
    assert t.next_ping() == 1025.0
    t.response_chunk(b"", True)
    assert t.next_ping() is None and t.ping() is None


def test_without_keep_alives_each_chunk_is_replaced_by_its_sse() -> None:
    """With ping_interval 0 the stream is not duplex: each chunk's SSE replaces it, the same bytes."""
    data = (STREAMS / "bedrock_cache_split_padding.eventstream").read_bytes()
    t = MessagesToBedrock(
        identity(), BedrockPaths(), read_request(BODY), TranslateOptions(ping_interval=0, clock=Clock())
    )
    start = t.response_headers(200, {})
    assert not start.duplex and not start.buffer
    out = b"".join(t.response_chunk(data[i : i + 100], False) or b"" for i in range(0, len(data), 100))
    out += t.response_chunk(b"", True) or b""
    assert out == _translate(data, None)[0]
    assert t.next_ping() is None and t.ping() is None
