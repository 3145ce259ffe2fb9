"""The Bedrock event-stream writer and EventStreamMeter, against recorded streams."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import random
import struct
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
    EventStreamReader,
    StreamMessage,
    chunk_event_bytes,
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


# --- malformed upstream data: recorded, and never the end of counting ----------------------------

CHUNK_HEADERS = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
BASIC = (STREAMS / "bedrock_basic.eventstream").read_bytes()
BASIC_RESULT = EXPECTED["bedrock_basic.eventstream"]


def _same_at_any_chunking(data: bytes) -> MeterResult:
    """The result of feeding ``data`` whole, after checking that one byte at a time and ten seeded
    random chunkings give exactly it."""
    whole = _meter(data)
    for plan in _chunkings(data)[1:12]:
        assert _meter(data, plan) == whole
    return whole


def _spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each frame of a well-formed stream."""
    spans, offset = [], 0
    while offset < len(data):
        end = offset + int.from_bytes(data[offset : offset + 4], "big")
        spans.append((offset, end))
        offset = end
    return spans


def _reseal(frame: bytearray) -> bytes:
    """The frame with its message CRC recomputed over whatever it now holds."""
    frame[-4:] = zlib.crc32(bytes(frame[:-4])).to_bytes(4, "big")
    return bytes(frame)


def _corrupt(data: bytes, index: int, kind: str) -> bytes:
    start, end = _spans(data)[index]
    frame = bytearray(data[start:end])
    if kind == "message CRC":
        frame[-1] ^= 0x01
    elif kind == "payload":
        frame[-10] ^= 0x20  # inside the payload: only the message CRC can tell
    else:  # "prelude CRC", with a message CRC that matches, so only the prelude check can tell
        frame[8] ^= 0x01
        frame = bytearray(_reseal(frame))
    return data[:start] + bytes(frame) + data[end:]


# bedrock_basic frames: 0 message_start (decoded), 1 content_block_start (skipped by prefix),
# 2-5 content_block_delta (counted by prefix), 6 content_block_stop, 7 message_delta, 8 message_stop.
@pytest.mark.parametrize("kind", ["message CRC", "payload", "prelude CRC"])
@pytest.mark.parametrize(("index", "deltas"), [(0, 4), (1, 4), (3, 3), (6, 4)])
def test_bad_crc_frame_is_recorded_and_later_frames_counted(kind: str, index: int, deltas: int) -> None:
    """A frame failing its prelude or message CRC, whether decoded, skipped or counted by prefix, is
    recorded as malformed and not counted; every frame after it still is, at any chunking."""
    data = _corrupt(BASIC, index, kind)
    result = _same_at_any_chunking(data)
    assert result.usage == BASIC_RESULT.usage  # message_delta repeats message_start's input count
    assert result.complete
    assert result.error_type is None
    assert result.estimated_output_tokens == deltas
    problem = "prelude CRC" if kind == "prelude CRC" else "message CRC"
    start = _spans(BASIC)[index][0]
    assert result.malformed == f"event-stream frame at byte {start} fails its {problem}"


def _events_56() -> list[bytes]:
    events = canned_events(model="m", text_chunks=["a", "b", "c", "d"], usage=Usage(5, 56))
    return [chunk_frame(event) for event in events]


def _bad_prelude(total: int, headers_length: int = 0) -> bytes:
    prelude = total.to_bytes(4, "big") + headers_length.to_bytes(4, "big")
    return prelude + zlib.crc32(prelude).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("total", "headers_length"),
    [(0x7FFFFFFF, 0), (0xFFFFFFFF, 0), (0, 0), (15, 0), (20, 100), (64, 200 * 1024), (16 + 25 * 2**20, 0)],
)
def test_impossible_length_resynchronises_on_the_next_frame(total: int, headers_length: int) -> None:
    """A prelude with a valid CRC but impossible lengths loses the frame boundary: the meter finds
    the next whole frame and counts on, so the message_delta after it gives 56 output tokens."""
    frames = _events_56()
    data = b"".join(frames[:6]) + _bad_prelude(total, headers_length) + b"".join(frames[6:])
    result = _same_at_any_chunking(data)
    assert result.usage == Usage(5, 56)
    assert result.complete
    assert result.estimated_output_tokens == 4
    position = sum(len(frame) for frame in frames[:6])
    assert result.malformed == (
        f"event-stream frame at byte {position} claims {total} bytes with {headers_length} bytes of headers"
    )


@pytest.mark.parametrize("seed", range(10))
def test_garbage_between_frames_is_skipped(seed: int) -> None:
    """Random bytes (frame-start bytes included) after a 0x7fffffff prelude are scanned past and
    every real frame after them is counted."""
    rng = random.Random(seed)
    garbage = bytes(rng.choice([0, 1, rng.randrange(256)]) for _ in range(rng.randint(1, 300)))
    frames = _events_56()
    data = b"".join(frames[:3]) + b"\x7f\xff\xff\xff" + garbage + b"".join(frames[3:])
    result = _same_at_any_chunking(data)
    assert (result.usage, result.complete, result.estimated_output_tokens) == (Usage(5, 56), True, 4)
    assert result.malformed is not None


def test_bytes_lost_inside_a_frame_do_not_hide_the_next_frame() -> None:
    """A frame missing bytes claims more than it holds; the meter does not trust that length and
    finds the frame that really follows, so only the damaged delta goes uncounted."""
    frames = _events_56()
    damaged = frames[3][:40] + frames[3][50:]
    data = b"".join(frames[:3]) + damaged + b"".join(frames[4:])
    result = _same_at_any_chunking(data)
    assert (result.usage, result.complete, result.estimated_output_tokens) == (Usage(5, 56), True, 3)
    assert result.malformed == f"event-stream frame at byte {sum(map(len, frames[:3]))} fails its message CRC"


def test_too_many_lost_boundaries_stop_the_meter() -> None:
    """After more than eight lost frame boundaries the meter stops, which bounds the work a stream
    of corrupt frames can cost; the first malformation is still the one reported."""
    frames = _events_56()
    bad = _corrupt(frames[2], 0, "message CRC")
    data = b"".join(frames[:2]) + bad * 9 + b"".join(frames[2:])
    result = _meter(data)
    assert (
        result.malformed
        == f"event-stream frame at byte {len(frames[0]) + len(frames[1])} fails its message CRC"
    )
    assert result.estimated_output_tokens == 0
    assert result.usage == Usage(5, 1)
    assert not result.complete
    assert result.bytes_seen == len(data)
    assert _meter(b"".join(frames[:2]) + bad * 8 + b"".join(frames[2:])).usage == Usage(5, 56)


SECRET = "arn:aws:iam::123456789012:role/Secret"
BAD_PAYLOADS = [
    ("chunk payload JSON", "JSONDecodeError", f"not json {SECRET}".encode()),
    ("chunk payload JSON", "UnicodeDecodeError", b"\xff\xfe" + SECRET.encode()),
    ("chunk bytes field", "KeyError", json.dumps({SECRET: "x"}).encode()),
    ("chunk bytes field", "Error", json.dumps({"bytes": f"!{SECRET}!"}).encode()),
    (
        "event JSON",
        "JSONDecodeError",
        json.dumps({"bytes": base64.b64encode(SECRET.encode()).decode()}).encode(),
    ),
    (
        "event JSON",
        "UnicodeDecodeError",
        json.dumps({"bytes": base64.b64encode(b"\xff" + SECRET.encode()).decode()}).encode(),
    ),
    ("event", "MalformedEvent", json.dumps({"bytes": base64.b64encode(b'["x"]').decode()}).encode()),
]


@pytest.mark.parametrize(
    ("stage", "exception", "payload"), BAD_PAYLOADS, ids=[p[0] + p[1] for p in BAD_PAYLOADS]
)
def test_bad_chunk_payload_is_recorded_and_later_frames_counted(
    stage: str, exception: str, payload: bytes
) -> None:
    """A frame whose CRCs check but whose payload is not a Bedrock chunk is recorded (stage and
    exception type only, no payload bytes) and the frames after it are counted."""
    frames = _events_56()
    data = b"".join(frames[:4]) + encode_frame(CHUNK_HEADERS, payload) + b"".join(frames[4:])
    result = _same_at_any_chunking(data)
    assert (result.usage, result.complete, result.estimated_output_tokens) == (Usage(5, 56), True, 4)
    position = sum(map(len, frames[:4]))
    assert result.malformed == (
        f"event-stream frame at byte {position}: {stage} could not be decoded ({exception})"
    )
    assert "Secret" not in result.malformed


def test_malformation_is_not_an_in_stream_error() -> None:
    """A malformed frame and an exception frame are reported apart: the first of each is kept."""
    frames = _events_56()
    data = (
        b"".join(frames[:3])
        + _corrupt(frames[3], 0, "message CRC")
        + exception_frame("modelStreamErrorException", "interrupted")
    )
    result = _same_at_any_chunking(data)
    assert result.malformed == f"event-stream frame at byte {sum(map(len, frames[:3]))} fails its message CRC"
    assert (result.error_type, result.error_message) == ("modelStreamErrorException", "interrupted")
    assert not result.complete


MUTATIONS = ["flip", "insert", "delete", "duplicate", "length"]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few random corruptions of the kinds a broken relay or upstream produces."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(MUTATIONS)
        at = rng.randrange(len(out))
        if kind == "flip":
            out[at] ^= 1 << rng.randrange(8)
        elif kind == "insert":
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        elif kind == "delete":
            del out[at : at + rng.randint(1, 40)]
        elif kind == "duplicate":
            out[at:at] = out[at : at + rng.randint(1, 300)]
        else:
            out[at : at + 4] = rng.choice([0, 15, 0x7FFFFFFF, rng.randrange(2**32)]).to_bytes(4, "big")
    return bytes(out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corrupted_streams_never_raise_and_ignore_chunking(name: str) -> None:
    """Randomly corrupted recordings never make the meter raise, and every chunking of the same
    corrupt bytes gives the same result."""
    data = (STREAMS / name).read_bytes()
    for seed in range(25):
        broken = _mutate(data, random.Random(seed))
        whole = _meter(broken)
        assert whole.bytes_seen == len(broken)
        for plan in [[1] * len(broken), *_chunkings(broken)[2:8]]:
            assert _meter(broken, plan) == whole, seed


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


# --- any serialisation counts the same; the compact form is only the cheap path -----------------

INNER_STYLES = ["compact", "spaced", "type last", "type last, spaced"]
OUTER_STYLES = ["compact", "spaced", "padding first", "padding last", "padding first, spaced"]


def _json(value: Any, style: str) -> str:
    if "type last" in style and isinstance(value, dict) and "type" in value:
        value = {**{k: v for k, v in value.items() if k != "type"}, "type": value["type"]}
    return json.dumps(value) if "spaced" in style else json.dumps(value, separators=(",", ":"))


def _styled_frame(event: dict[str, Any], inner: str, outer: str) -> bytes:
    encoded = base64.b64encode(_json(event, inner).encode()).decode()
    envelope = {"bytes": encoded}
    if outer.startswith("padding first"):
        envelope = {"p": "abcdef", "bytes": encoded}
    elif outer == "padding last":
        envelope = {"bytes": encoded, "p": "abcdef"}
    return encode_frame(CHUNK_HEADERS, _json(envelope, outer).encode())


def _cache_stream_events() -> list[dict[str, Any]]:
    """The events of bedrock_cache_split_padding, invocation metrics folded into message_stop."""
    events: list[dict[str, Any]] = _load_make_streams()._two_block_events()
    metrics = {"inputTokenCount": 3, "outputTokenCount": 210, "cacheReadInputTokenCount": 20000}
    events[-1] = {**events[-1], "amazon-bedrock-invocationMetrics": metrics}
    return events


@pytest.mark.parametrize("outer", OUTER_STYLES)
@pytest.mark.parametrize("inner", INNER_STYLES)
def test_any_json_spacing_or_key_order_counts_the_same(inner: str, outer: str) -> None:
    """Events and chunk payloads spaced or ordered unlike Bedrock's compact form give exactly the
    counts of the compact recording, at any chunking."""
    data = b"".join(_styled_frame(event, inner, outer) for event in _cache_stream_events())
    expected = dataclasses.replace(EXPECTED["bedrock_cache_split_padding.eventstream"], bytes_seen=len(data))
    assert _same_at_any_chunking(data) == expected


@pytest.mark.parametrize("seed", range(5))
def test_mixed_serialisations_in_one_stream_count_the_same(seed: int) -> None:
    """A stream whose frames each use a random serialisation gives the compact counts."""
    rng = random.Random(seed)
    events = canned_events(model="m", text_chunks=[str(i) for i in range(30)], usage=Usage(7, 56))
    frames = [_styled_frame(event, rng.choice(INNER_STYLES), rng.choice(OUTER_STYLES)) for event in events]
    data = b"".join(frames)
    expected = MeterResult(
        usage=Usage(7, 56), complete=True, estimated_output_tokens=30, bytes_seen=len(data)
    )
    assert _same_at_any_chunking(data) == expected


def test_compact_deltas_cost_no_decode_whatever_else_is_spaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only frames outside the compact (or colon-spaced) delta and block forms reach botocore."""
    decoded: list[str] = []
    real = eventstream._decode_frame

    def recording(frame: bytes) -> tuple[dict[str, Any], bytes]:
        headers, payload = real(frame)
        decoded.append(_chunk_event(payload)["type"])
        return headers, payload

    monkeypatch.setattr(eventstream, "_decode_frame", recording)
    events = _cache_stream_events()
    data = b"".join(_styled_frame(event, "compact", "padding last") for event in events)
    data += _styled_frame(events[3], "type last", "compact")
    data += _styled_frame(events[3], "compact", "spaced")
    result = _meter(data)
    assert result.estimated_output_tokens == 8
    assert decoded == [
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_delta",
        "content_block_delta",
    ]


def test_prefixes_do_not_shadow_usage_events() -> None:
    """No counted or skipped prefix matches a chunk of an event type that carries usage."""
    for kind in ["message_start", "message_delta", "message_stop", "error"]:
        for spacing in ["", " "]:
            inner = f'{{"type":{spacing}"{kind}","usage":{{}}}}'.encode()
            payload = b'{"bytes":"' + base64.b64encode(inner) + b'"}'
            assert not payload.startswith(COUNTED_PREFIXES + SKIPPED_PREFIXES), inner
    for kind in ["content_block_delta_v2", "content_block_delta-x", "pings", "content_block_stop2"]:
        inner = f'{{"type":"{kind}","usage":{{}}}}'.encode()
        assert not (b'{"bytes":"' + base64.b64encode(inner)).startswith(COUNTED_PREFIXES + SKIPPED_PREFIXES)


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


# --- the reader (translation) ---------------------------------------------------------------------


def _read(data: bytes, plan: list[int] | None) -> tuple[list[bytes | StreamMessage], str | None]:
    reader = EventStreamReader()
    if plan is None:
        return reader.feed(data), reader.malformed
    items: list[bytes | StreamMessage] = []
    start = 0
    for size in plan:
        items += reader.feed(data[start : start + size])
        start += size
    items += reader.feed(data[start:])
    return items, reader.malformed


def _botocore_items(data: bytes) -> list[bytes | StreamMessage]:
    """What the reader must give, by botocore: chunk events' decoded events, other messages whole."""
    out: list[bytes | StreamMessage] = []
    for headers, payload in _frames(data):
        kind = headers[":message-type"]
        if kind == "event" and headers[":event-type"] == "chunk":
            out.append(base64.b64decode(json.loads(payload)["bytes"]))
        else:
            out.append(StreamMessage(kind, headers[":exception-type"], payload))
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_splits_recorded_streams_like_botocore(name: str) -> None:
    """The reader yields exactly botocore's events and messages for every recorded stream, whole, byte
    by byte and in random chunks."""
    data = (STREAMS / name).read_bytes()
    expected = _botocore_items(data)
    for plan in _chunkings(data):
        assert _read(data, plan) == (expected, None)


def test_reader_gives_other_shapes_whole() -> None:
    """A chunk frame whose headers come in another order is decoded by botocore, and a chunk payload
    not in Bedrock's usual shape is given whole: neither is sliced."""
    payload = json.dumps({"bytes": base64.b64encode(b'{"type":"ping"}').decode()}).encode()
    reordered = encode_frame(
        {":message-type": "event", ":event-type": "chunk", ":content-type": "application/json"}, payload
    )
    assert not reordered[12:].startswith(eventstream.CHUNK_HEADER_BLOCK)
    assert _read(reordered, [1] * len(reordered)) == ([StreamMessage("event", "chunk", payload)], None)
    padded_first = b'{"p":"abc","bytes":"eyJ0eXBlIjoicGluZyJ9"}'
    frame = encode_frame(eventstream._CHUNK_HEADERS, padded_first)
    assert _read(frame, None) == ([StreamMessage("event", "chunk", padded_first)], None)
    assert chunk_event_bytes(padded_first) == b'{"type":"ping"}'


def test_reader_stops_at_the_first_untrustworthy_frame() -> None:
    """A frame failing its CRC ends the reading: the frames before it come out, nothing after, and
    malformed says where, without payload bytes."""
    good = chunk_frame({"type": "ping"})
    bad = bytearray(chunk_frame({"type": "content_block_stop", "index": 0}))
    bad[-6] ^= 0xFF
    data = good + bytes(bad) + good
    items, malformed = _read(data, [7] * (len(data) // 7 + 1))
    assert items == [b'{"type":"ping"}']
    assert malformed == f"event-stream frame at byte {len(good)} fails its message CRC"


def test_reader_refuses_an_impossible_length() -> None:
    """A prelude claiming more than botocore accepts is malformed at once, not buffered for."""
    data = struct.pack(">II", 2**31, 10) + b"\x00" * 20
    items, malformed = _read(data, None)
    assert items == [] and malformed is not None and "claims" in malformed


def test_chunk_event_bytes_reads_the_json_envelope() -> None:
    """A chunk payload's event is its base64 "bytes" field, whatever the key order or JSON escaping;
    a payload that is not a chunk raises."""
    event = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"???>>>"}}'
    encoded = base64.b64encode(event).decode()
    assert "/" in encoded
    for payload in (
        json.dumps({"bytes": encoded, "p": "abc"}, separators=(",", ":")).encode(),
        json.dumps({"p": "abc", "bytes": encoded}).encode(),
        ('{"bytes":"' + encoded.replace("/", "\\/") + '"}').encode(),  # JSON's escaped solidus
    ):
        assert chunk_event_bytes(payload) == event
    for bad in (b'{"p":"x"}', b"not json", b'{"bytes":"@@@"}'):
        with pytest.raises((ValueError, KeyError)):
            chunk_event_bytes(bad)
