"""The Bedrock event-stream writer and EventStreamMeter, against recorded streams."""

from __future__ import annotations

import base64
import importlib.util
import json
import random
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# The test checks our encoder against the reference parser, which only backends/ may use at runtime.
from botocore.eventstream import EventStreamBuffer

from backends import eventstream
from backends.emulator.canned import canned_events
from backends.eventstream import (
    COUNTED_PREFIXES,
    SKIPPED_PREFIXES,
    EventStreamMeter,
    chunk_frame,
    encode_frame,
    exception_frame,
)
from backends.usage import MeterResult, Usage

STREAMS = Path(__file__).parent.parent / "fixtures" / "streams"


def _load_make_streams() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_streams", STREAMS / "make_streams.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meter(data: bytes, chunks: list[int] | None = None) -> MeterResult:
    meter = EventStreamMeter()
    if chunks is None:
        meter.feed(data)
    else:
        start = 0
        for size in chunks:
            meter.feed(data[start : start + size])
            start += size
        meter.feed(data[start:])
    return meter.result()


def _chunkings(data: bytes) -> list[list[int] | None]:
    """Whole, one byte at a time, and 50 seeded random chunkings (sizes 1-64, some empty)."""
    plans: list[list[int] | None] = [None, [1] * len(data)]
    for seed in range(50):
        rng = random.Random(seed)
        sizes: list[int] = []
        while sum(sizes) < len(data):
            sizes.append(rng.choice([0, 1, 2, 3, 5, 11, 12, 13, 64, rng.randint(1, 400)]))
        plans.append(sizes)
    return plans


def _frames(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    parser = EventStreamBuffer()
    parser.add_data(data)
    return [(message.headers, message.payload) for message in parser]


def _chunk_event(payload: bytes) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(base64.b64decode(json.loads(payload)["bytes"]))
    return event


EXPECTED = {
    "bedrock_basic.eventstream": MeterResult(
        usage=Usage(input_tokens=25, output_tokens=12),
        complete=True,
        estimated_output_tokens=4,
        bytes_seen=(STREAMS / "bedrock_basic.eventstream").stat().st_size,
    ),
    "bedrock_cache_split_padding.eventstream": MeterResult(
        usage=Usage(
            input_tokens=3,
            output_tokens=210,
            cache_creation_input_tokens=1500,
            cache_creation_5m_input_tokens=1000,
            cache_creation_1h_input_tokens=500,
            cache_read_input_tokens=20000,
        ),
        complete=True,
        estimated_output_tokens=6,
        bytes_seen=(STREAMS / "bedrock_cache_split_padding.eventstream").stat().st_size,
    ),
    "bedrock_exception_midstream.eventstream": MeterResult(
        usage=Usage(input_tokens=40, output_tokens=1),
        complete=False,
        error_type="modelStreamErrorException",
        error_message="The model stream was interrupted.",
        estimated_output_tokens=3,
        bytes_seen=(STREAMS / "bedrock_exception_midstream.eventstream").stat().st_size,
    ),
}


def test_fixtures_match_generator() -> None:
    """The committed recorded streams are exactly what make_streams.py generates."""
    for name, data in _load_make_streams().build_streams().items():
        assert (STREAMS / name).read_bytes() == data, f"regenerate {name} with make_streams.py"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_stream_any_chunking(name: str) -> None:
    """Each recorded stream gives the same exact result whole, byte by byte and in random chunks."""
    data = (STREAMS / name).read_bytes()
    for plan in _chunkings(data):
        assert _meter(data, plan) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_botocore_decodes_every_recorded_frame(name: str) -> None:
    """botocore parses every frame of every recorded stream, CRCs included, with nothing left over."""
    data = (STREAMS / name).read_bytes()
    frames = _frames(data)
    assert sum(len(encode_frame(h, p)) for h, p in frames) == len(data)
    for headers, payload in frames:
        assert headers[":content-type"] == "application/json"
        if headers[":message-type"] == "event":
            assert headers[":event-type"] == "chunk"
            assert "type" in _chunk_event(payload)


def test_encode_frame_round_trips_through_botocore() -> None:
    """Frames written by encode_frame decode in botocore to the same headers and payload."""
    cases = [
        ({}, b""),
        ({":message-type": "event"}, b"{}"),
        ({"a": "", "ünï": "välüe", ":event-type": "chunk"}, bytes(range(256)) * 3),
        ({"x" * 255: "y" * 32767}, b"payload"),
    ]
    stream = b"".join(encode_frame(headers, payload) for headers, payload in cases)
    assert _frames(stream) == [(dict(headers), payload) for headers, payload in cases]


def test_encode_frame_rejects_oversized_header() -> None:
    """A header value longer than the 2-byte length field allows is refused, not truncated."""
    with pytest.raises(ValueError, match="too long"):
        encode_frame({"name": "v" * 32768}, b"")


def test_chunk_frame_layout() -> None:
    """chunk_frame base64-encodes compact event JSON, adds padding, and nests metrics in the event."""
    event = {"type": "message_stop"}
    metrics = {"inputTokenCount": 5, "outputTokenCount": 7}
    ((headers, payload),) = _frames(chunk_frame(event, invocation_metrics=metrics, padding="abc"))
    assert headers == {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    envelope = json.loads(payload)
    assert envelope["p"] == "abc"
    assert base64.b64decode(envelope["bytes"]) == (
        b'{"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":5,"outputTokenCount":7}}'
    )
    ((_, bare),) = _frames(chunk_frame(event))
    assert json.loads(bare).keys() == {"bytes"}


def test_exception_frame_layout() -> None:
    """exception_frame carries the exception type in a header and the text in a JSON payload."""
    ((headers, payload),) = _frames(exception_frame("throttlingException", "Too many requests"))
    assert headers[":message-type"] == "exception"
    assert headers[":exception-type"] == "throttlingException"
    assert json.loads(payload) == {"message": "Too many requests"}


def test_message_delta_is_cumulative_not_summed() -> None:
    """Repeated message_delta usage replaces earlier values field by field; nothing is added up."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}},
        {"type": "message_delta", "usage": {"output_tokens": 30}},
        {"type": "message_delta", "usage": {"output_tokens": 45, "cache_read_input_tokens": 8}},
        {"type": "message_delta", "usage": {"output_tokens": 50}},
        {"type": "message_stop"},
    ]
    result = _meter(b"".join(chunk_frame(event) for event in events))
    assert result.usage == Usage(input_tokens=10, output_tokens=50, cache_read_input_tokens=8)
    assert result.complete


def test_truncated_mid_frame_keeps_message_start_usage() -> None:
    """A stream cut inside a frame reports message_start usage, incomplete, with the delta count."""
    events = canned_events(
        model="m", text_chunks=["a", "b", "c"], usage=Usage(input_tokens=9, output_tokens=40)
    )
    frames = [chunk_frame(event) for event in events]
    # message_start, content_block_start, three deltas, then half of content_block_stop.
    data = b"".join(frames[:5]) + frames[5][: len(frames[5]) // 2]
    for plan in _chunkings(data):
        assert _meter(data, plan) == MeterResult(
            usage=Usage(input_tokens=9, output_tokens=1),
            complete=False,
            estimated_output_tokens=3,
            bytes_seen=len(data),
        )


def test_truncated_inside_prelude_is_not_an_error() -> None:
    """Fewer than four bytes of a next frame are simply waited for."""
    data = chunk_frame({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}) + b"\x00\x00"
    result = _meter(data)
    assert result.usage.input_tokens == 3
    assert result.error_type is None


def test_corrupted_crc_is_malformed_not_raised() -> None:
    """A bad message CRC on a decoded frame records malformed_stream and stops parsing."""
    good = (STREAMS / "bedrock_basic.eventstream").read_bytes()
    first = _frames(good)[0]
    first_length = len(encode_frame(*first))
    broken = bytearray(good)
    broken[first_length - 1] ^= 0xFF  # last byte of message_start's CRC
    for plan in _chunkings(bytes(broken))[:10]:
        result = _meter(bytes(broken), plan)
        assert result.error_type == "malformed_stream"
        assert result.error_message is not None and "byte 0" in result.error_message
        assert result.usage == Usage()
        assert not result.complete
        assert result.estimated_output_tokens == 0
        assert result.bytes_seen == len(good)


@pytest.mark.parametrize("total", [0, 15, 0xFFFFFFFF])
def test_absurd_frame_length_is_malformed(total: int) -> None:
    """A prelude claiming an impossible length fails at once instead of buffering."""
    meter = EventStreamMeter()
    meter.feed(chunk_frame({"type": "ping"}))
    meter.feed(total.to_bytes(4, "big"))
    result = meter.result()
    assert result.error_type == "malformed_stream"
    meter.feed(b"more bytes after the failure")
    assert meter.result().bytes_seen == result.bytes_seen + 28


def test_headers_longer_than_frame_is_malformed() -> None:
    """A headers length pointing past the end of the frame is malformed, not an exception."""
    prelude = (20).to_bytes(4, "big") + (100).to_bytes(4, "big")
    frame = prelude + zlib.crc32(prelude).to_bytes(4, "big") + b"\x00" * 8
    assert _meter(frame).error_type == "malformed_stream"


def test_bad_base64_is_malformed() -> None:
    """A chunk whose bytes field is not base64 records malformed_stream."""
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    frame = encode_frame(headers, b'{"bytes":"!!!not base64!!!"}')
    assert _meter(frame).error_type == "malformed_stream"


def test_bad_inner_json_is_malformed() -> None:
    """A chunk whose decoded bytes are not JSON records malformed_stream."""
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    payload = json.dumps({"bytes": base64.b64encode(b'{"type":"message_delta",').decode()}).encode()
    assert _meter(encode_frame(headers, payload)).error_type == "malformed_stream"


def test_content_block_delta_frames_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only usage-bearing frames reach botocore; deltas, pings and block start/stop go by prefix."""
    decoded: list[bytes] = []
    real = eventstream._decode_frame

    def counting(frame: bytes) -> tuple[dict[str, Any], bytes]:
        decoded.append(frame)
        return real(frame)

    monkeypatch.setattr(eventstream, "_decode_frame", counting)
    data = (STREAMS / "bedrock_cache_split_padding.eventstream").read_bytes()
    assert _meter(data) == EXPECTED["bedrock_cache_split_padding.eventstream"]
    kinds = [_chunk_event(_frames(frame)[0][1])["type"] for frame in decoded]
    assert kinds == ["message_start", "message_delta", "message_stop"]


def test_spaced_type_json_is_classified_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event serialised with a space after the colon is still counted from its prefix."""
    decoded: list[bytes] = []

    def recording(frame: bytes) -> tuple[dict[str, Any], bytes]:
        decoded.append(frame)
        return {}, b""

    monkeypatch.setattr(eventstream, "_decode_frame", recording)
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    inner = json.dumps(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}
    )
    assert inner.startswith('{"type": "content_block_delta"')
    frame = encode_frame(headers, b'{"bytes":"' + base64.b64encode(inner.encode()) + b'"}')
    assert _meter(frame * 3).estimated_output_tokens == 3
    assert decoded == []


def test_unrecognised_prefix_is_decoded_and_counted_right() -> None:
    """A frame whose prefix is unknown is decoded, so a delta with reordered keys still counts."""
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    inner = b'{"index":0,"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}}'
    frame = encode_frame(headers, b'{"p":"abc","bytes":"' + base64.b64encode(inner) + b'"}')
    future = chunk_frame({"type": "some_future_event", "usage": {"input_tokens": 1}})
    result = _meter(frame + future)
    assert result.estimated_output_tokens == 1
    assert result.usage == Usage()
    assert result.error_type is None


def test_prefixes_do_not_shadow_usage_events() -> None:
    """No counted or skipped prefix matches a chunk of an event type that carries usage."""
    for kind in ["message_start", "message_delta", "message_stop", "error"]:
        for spacing in ["", " "]:
            inner = f'{{"type":{spacing}"{kind}","usage":{{}}}}'.encode()
            payload = b'{"bytes":"' + base64.b64encode(inner) + b'"}'
            assert not payload.startswith(COUNTED_PREFIXES + SKIPPED_PREFIXES), inner


def test_invocation_metrics_fill_only_missing_fields() -> None:
    """Bedrock invocation metrics supply counts the events lacked; event counts win where both exist."""
    metrics = {
        "inputTokenCount": 999,
        "outputTokenCount": 77,
        "cacheReadInputTokenCount": 5,
        "cacheWriteInputTokenCount": 6,
    }
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 12}}},
        {"type": "message_delta", "usage": {}},
    ]
    data = b"".join(chunk_frame(event) for event in events)
    data += chunk_frame({"type": "message_stop"}, invocation_metrics=metrics)
    assert _meter(data).usage == Usage(
        input_tokens=12, output_tokens=77, cache_creation_input_tokens=6, cache_read_input_tokens=5
    )


def test_cache_creation_total_from_split() -> None:
    """Without cache_creation_input_tokens, the cache write total is the sum of the 5m and 1h split."""
    usage = {
        "input_tokens": 1,
        "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 6},
    }
    result = _meter(chunk_frame({"type": "message_start", "message": {"usage": usage}}))
    assert result.usage == Usage(
        input_tokens=1,
        cache_creation_input_tokens=10,
        cache_creation_5m_input_tokens=4,
        cache_creation_1h_input_tokens=6,
    )


def test_service_error_frame_sets_error() -> None:
    """A ':message-type: error' frame takes its type and text from the error headers."""
    frame = encode_frame(
        {":message-type": "error", ":error-code": "InternalFailure", ":error-message": "oops"}, b""
    )
    result = _meter(frame)
    assert (result.error_type, result.error_message) == ("InternalFailure", "oops")


def test_bytes_seen_counts_every_byte() -> None:
    """bytes_seen counts all bytes fed, including a trailing partial frame."""
    data = (STREAMS / "bedrock_basic.eventstream").read_bytes() + b"\x00\x00\x00"
    assert _meter(data).bytes_seen == len(data)
