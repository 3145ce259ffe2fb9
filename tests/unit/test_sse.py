"""The SSE writer and SseMeter, against recorded Vertex streams and the SSE parsing rules."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from backends import sse
from backends.emulator.canned import canned_events
from backends.sse import SseMeter, sse_event
from backends.usage import MeterResult, Usage

STREAMS = Path(__file__).parent.parent / "fixtures" / "streams"


def _meter(data: bytes, chunks: list[int] | None = None) -> MeterResult:
    meter = SseMeter()
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
            sizes.append(rng.choice([0, 1, 2, 3, 5, 7, 64, rng.randint(1, 400)]))
        plans.append(sizes)
    return plans


def _all_chunkings_give(data: bytes, expected: MeterResult) -> None:
    for plan in _chunkings(data):
        assert _meter(data, plan) == expected


EXPECTED = {
    "vertex_basic.sse": MeterResult(
        usage=Usage(input_tokens=25, output_tokens=12),
        complete=True,
        estimated_output_tokens=4,
        bytes_seen=(STREAMS / "vertex_basic.sse").stat().st_size,
    ),
    "vertex_cache.sse": MeterResult(
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
        bytes_seen=(STREAMS / "vertex_cache.sse").stat().st_size,
    ),
    "vertex_error.sse": MeterResult(
        usage=Usage(input_tokens=17, output_tokens=1, cache_read_input_tokens=4096),
        complete=False,
        error_type="overloaded_error",
        error_message="Overloaded",
        estimated_output_tokens=2,
        bytes_seen=(STREAMS / "vertex_error.sse").stat().st_size,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_stream_any_chunking(name: str) -> None:
    """Each recorded stream gives the same exact result whole, byte by byte and in random chunks."""
    _all_chunkings_give((STREAMS / name).read_bytes(), EXPECTED[name])


def test_vertex_basic_uses_crlf() -> None:
    """The basic recording really exercises CRLF endings (and no bare LF)."""
    data = (STREAMS / "vertex_basic.sse").read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n") > 0


def test_sse_event_format() -> None:
    """sse_event writes the event name, compact JSON data and a blank line."""
    assert sse_event({"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert sse_event({"type": "x", "t": "é"}) == 'event: x\ndata: {"type":"x","t":"é"}\n\n'.encode()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(newline: bytes) -> None:
    """LF, CRLF and bare CR line endings all parse to the same result at any chunking."""
    events = canned_events(model="m", text_chunks=["a", "b"], usage=Usage(input_tokens=5, output_tokens=9))
    data = b"".join(sse_event(event) for event in events).replace(b"\n", newline)
    _all_chunkings_give(
        data,
        MeterResult(
            usage=Usage(input_tokens=5, output_tokens=9),
            complete=True,
            estimated_output_tokens=2,
            bytes_seen=len(data),
        ),
    )


def test_cr_then_lf_across_chunks_is_one_line_end() -> None:
    """A CR ending one chunk and an LF starting the next make one CRLF, not an extra blank line."""
    meter = SseMeter()
    meter.feed(
        b'event: message_start\r\ndata: {"type":"message_start","message":{"usage":{"input_tokens":4}}}\r'
    )
    meter.feed(b"\n\r")
    meter.feed(b"\n")
    assert meter.result().usage.input_tokens == 4


def test_multiline_data_joined_with_lf() -> None:
    """Several data lines form one payload joined with LF, per the SSE spec."""
    data = (
        b"event: message_delta\n"
        b'data: {"type":"message_delta",\n'
        b'data: "usage":\n'
        b'data:{"output_tokens":33}}\n'
        b"\n"
    )
    _all_chunkings_give(data, MeterResult(usage=Usage(output_tokens=33), bytes_seen=len(data)))


def test_comments_and_unknown_fields_are_ignored() -> None:
    """Comment lines, id/retry and unknown fields do not disturb parsing."""
    data = (
        b": keep-alive\n\n"
        b"id: 7\nretry: 1000\n: comment inside an event\nevent: message_start\nweird\n"
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":2,"output_tokens":1}}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    _all_chunkings_give(
        data, MeterResult(usage=Usage(input_tokens=2, output_tokens=1), complete=True, bytes_seen=len(data))
    )


def test_events_without_event_field_use_data_type() -> None:
    """Without an event: field the data's type decides; deltas are counted, usage events decoded."""
    data = (
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":6,"output_tokens":1}}}\n\n'
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}\n\n'
        b'data: {"type": "content_block_delta", "index": 0}\n\n'
        b'data: {"type":"ping"}\n\n'
        b'data: {"index":0,"type":"content_block_delta"}\n\n'
        b'data: {"type":"message_delta","usage":{"output_tokens":20}}\n\n'
        b'data: {"type":"message_stop"}\n\n'
    )
    _all_chunkings_give(
        data,
        MeterResult(
            usage=Usage(input_tokens=6, output_tokens=20),
            complete=True,
            estimated_output_tokens=3,
            bytes_seen=len(data),
        ),
    )


def test_content_block_delta_events_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only message_start, message_delta, message_stop and error events are parsed as JSON."""
    decoded: list[bytes] = []
    real = sse._decode_json

    def counting(data: bytes) -> Any:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(sse, "_decode_json", counting)
    assert _meter((STREAMS / "vertex_cache.sse").read_bytes()) == EXPECTED["vertex_cache.sse"]
    assert [json.loads(data)["type"] for data in decoded] == [
        "message_start",
        "message_delta",
        "message_stop",
    ]


def test_message_delta_is_cumulative_not_summed() -> None:
    """Repeated message_delta usage replaces earlier values field by field; nothing is added up."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}},
        {"type": "message_delta", "usage": {"output_tokens": 30}},
        {"type": "message_delta", "usage": {"output_tokens": 45, "input_tokens": 11}},
        {"type": "message_delta", "usage": {"output_tokens": 50, "cache_read_input_tokens": None}},
    ]
    data = b"".join(sse_event(event) for event in events)
    assert _meter(data).usage == Usage(input_tokens=11, output_tokens=50)


def test_truncated_stream_keeps_message_start_usage() -> None:
    """A stream cut mid-event reports message_start usage, incomplete, with the delta count."""
    full = (STREAMS / "vertex_basic.sse").read_bytes()
    data = full[: full.index(b"event: message_delta") + 30]
    _all_chunkings_give(
        data,
        MeterResult(
            usage=Usage(input_tokens=25, output_tokens=1),
            complete=False,
            estimated_output_tokens=4,
            bytes_seen=len(data),
        ),
    )


def test_unterminated_last_event_is_not_dispatched() -> None:
    """An event with no closing blank line is discarded, as the SSE spec says for an ended stream."""
    data = b'event: message_stop\ndata: {"type":"message_stop"}\n'
    assert not _meter(data).complete


def test_malformed_json_is_recorded_not_raised() -> None:
    """Invalid JSON in a usage event records malformed_stream and stops parsing."""
    data = b"event: message_start\ndata: {not json\n\n" + sse_event({"type": "message_stop"})
    result = _meter(data)
    assert result.error_type == "malformed_stream"
    assert not result.complete
    assert result.bytes_seen == len(data)


def test_non_object_event_is_malformed() -> None:
    """A usage event whose data is JSON but not an object records malformed_stream."""
    assert _meter(b"event: message_delta\ndata: [1, 2]\n\n").error_type == "malformed_stream"


def test_error_event_without_details() -> None:
    """An error event lacking the error object still records an error."""
    result = _meter(b'event: error\ndata: {"type":"error"}\n\n')
    assert (result.error_type, result.error_message) == ("error", None)


def test_overlong_line_is_malformed() -> None:
    """A line growing past the cap without a terminator stops the meter instead of buffering forever."""
    meter = SseMeter()
    meter.feed(b"data: ")
    meter.feed(b"x" * (16 * 1024 * 1024 + 1))
    assert meter.result().error_type == "malformed_stream"
