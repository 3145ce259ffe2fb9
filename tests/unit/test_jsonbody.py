"""JsonMeter on non-streaming bodies: Messages responses, count-tokens answers and errors."""

from __future__ import annotations

import json

import pytest

from backends.emulator.canned import canned_message
from backends.jsonbody import JsonMeter
from backends.usage import MeterResult, Usage


def _meter(body: bytes, chunk: int | None = None) -> MeterResult:
    meter = JsonMeter()
    step = chunk or max(len(body), 1)
    for start in range(0, len(body), step):
        meter.feed(body[start : start + step])
    return meter.result()


CACHE_USAGE = Usage(
    input_tokens=3,
    output_tokens=88,
    cache_creation_input_tokens=700,
    cache_creation_5m_input_tokens=200,
    cache_creation_1h_input_tokens=500,
    cache_read_input_tokens=9000,
)


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_messages_response(chunk: int | None) -> None:
    """A Messages response body yields its usage, split included, at any chunking."""
    body = json.dumps(canned_message(model="m", text="hi", usage=CACHE_USAGE)).encode()
    assert _meter(body, chunk) == MeterResult(usage=CACHE_USAGE, complete=True, bytes_seen=len(body))


@pytest.mark.parametrize("body", [b'{"input_tokens": 1234}', b'{"inputTokens":1234}'])
def test_count_tokens_responses(body: bytes) -> None:
    """Anthropic and Bedrock count-tokens answers both set input_tokens."""
    assert _meter(body) == MeterResult(usage=Usage(input_tokens=1234), complete=True, bytes_seen=len(body))


def test_anthropic_error_envelope() -> None:
    """An Anthropic error envelope sets error_type and error_message from the error object."""
    body = b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long"}}'
    result = _meter(body)
    assert (result.error_type, result.error_message) == ("invalid_request_error", "prompt is too long")
    assert result.usage == Usage()


def test_google_error() -> None:
    """A Google API error (also wrapped in a one-element list) takes its kind from status."""
    body = b'[{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}]'
    result = _meter(body)
    assert (result.error_type, result.error_message) == ("RESOURCE_EXHAUSTED", "Quota exceeded")


def test_bedrock_error() -> None:
    """Bedrock's {"message": ...} error body becomes an upstream_error with the text kept."""
    result = _meter(b'{"message":"Input is too long."}')
    assert (result.error_type, result.error_message) == ("upstream_error", "Input is too long.")


def test_body_not_yet_json_is_malformed_until_it_parses() -> None:
    """Mid-body the result says the bytes so far are not JSON (no error); once whole, it counts."""
    meter = JsonMeter()
    meter.feed(b'{"usage":{"input_tokens":')
    assert meter.result() == MeterResult(
        malformed="response body is not JSON (JSONDecodeError)", bytes_seen=25
    )
    meter.feed(b'5,"output_tokens":6}}')
    assert meter.result() == MeterResult(
        usage=Usage(input_tokens=5, output_tokens=6), complete=True, bytes_seen=46
    )


@pytest.mark.parametrize(
    ("body", "exception"),
    [
        (b"<html>Bad Gateway: arn:aws:iam::123456789012:role/Secret</html>", "JSONDecodeError"),
        (b"\xff\x80 Secret", "UnicodeDecodeError"),
        (b"[" * 100_000, "RecursionError"),
        (b"", "JSONDecodeError"),
    ],
)
def test_body_that_is_not_json_is_malformed_not_raised(body: bytes, exception: str) -> None:
    """A body that never parses is recorded as malformed (exception type only, no body bytes),
    incomplete and without usage, and reading the result never raises."""
    result = _meter(body)
    assert result == MeterResult(malformed=f"response body is not JSON ({exception})", bytes_seen=len(body))


def test_spacing_and_key_order_do_not_matter() -> None:
    """A Messages response spaced or with its keys in another order gives the same usage."""
    message = canned_message(model="m", text="hi", usage=CACHE_USAGE)
    reordered = dict(reversed(list(message.items())))
    reordered["usage"] = dict(reversed(list(message["usage"].items())))
    for body in (
        json.dumps(message, indent=2),
        json.dumps(reordered),
        json.dumps(message, separators=(",", ":")),
    ):
        assert _meter(body.encode()).usage == CACHE_USAGE


def test_too_large_body_gives_up() -> None:
    """Past the buffer cap the meter drops the body and reports too_large, still counting bytes."""
    meter = JsonMeter(max_bytes=10)
    meter.feed(b'{"input_')
    meter.feed(b'tokens": 5}')
    meter.feed(b"   ")
    result = meter.result()
    assert result.error_type == "too_large"
    assert result.bytes_seen == 22
    assert not result.complete


def test_unrecognised_json_is_complete_without_usage() -> None:
    """A JSON body of another shape is complete with zero usage and no error."""
    assert _meter(b'{"models":[]}') == MeterResult(complete=True, bytes_seen=13)
    assert _meter(b"42") == MeterResult(complete=True, bytes_seen=2)
