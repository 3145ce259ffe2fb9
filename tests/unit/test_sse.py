"""The SSE writer and SseMeter, against recorded Vertex streams and the SSE parsing rules."""

from __future__ import annotations

import dataclasses
import importlib.util
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
_spec = importlib.util.spec_from_file_location("make_streams", STREAMS / "make_streams.py")
assert _spec is not None and _spec.loader is not None
make_streams = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_streams)


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


# --- any serialisation counts the same; the compact form is only the cheap path -----------------

DATA_STYLES = ["compact", "spaced", "type last", "type last, spaced"]


def _json(value: dict[str, Any], style: str) -> str:
    if "type last" in style:
        value = {**{k: v for k, v in value.items() if k != "type"}, "type": value["type"]}
    return json.dumps(value) if "spaced" in style else json.dumps(value, separators=(",", ":"))


def _styled_event(event: dict[str, Any], style: str, *, named: bool, multiline: bool) -> bytes:
    text = _json(event, style)
    # JSON allows a line feed between tokens, so splitting before each key keeps it valid once the
    # data lines are joined again.
    lines = text.replace(',"', ',\n"').split("\n") if multiline else [text]
    head = f"event: {event['type']}\n" if named else ""
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("multiline", [False, True], ids=["one data line", "data split over lines"])
@pytest.mark.parametrize("named", [True, False], ids=["event line", "no event line"])
@pytest.mark.parametrize("style", DATA_STYLES)
def test_any_serialisation_counts_the_same(style: str, named: bool, multiline: bool, newline: str) -> None:
    """Events with or without an event line, spaced or with keys reordered, with data over several
    lines and any line ending give exactly the counts of the compact recording, at any chunking."""
    text = b"".join(
        _styled_event(event, style, named=named, multiline=multiline)
        for event in make_streams._two_block_events()
    )
    data = text.replace(b"\n", newline.encode())
    expected = dataclasses.replace(EXPECTED["vertex_cache.sse"], bytes_seen=len(data))
    assert _same_at_any_chunking(data) == expected


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


# --- malformed upstream data: recorded, and never the end of counting ----------------------------


def _same_at_any_chunking(data: bytes) -> MeterResult:
    """The result of feeding ``data`` whole, after checking that one byte at a time and ten seeded
    random chunkings give exactly it."""
    whole = _meter(data)
    for plan in _chunkings(data)[1:12]:
        assert _meter(data, plan) == whole
    return whole


def _events_56() -> list[dict[str, Any]]:
    return canned_events(model="m", text_chunks=["a", "b", "c", "d"], usage=Usage(5, 56))


BAD_EVENTS = [
    (b"event: message_start\ndata: {not json\n\n", "SSE message_start event", "JSONDecodeError"),
    (b"data: {not json\n\n", "unnamed SSE event", "JSONDecodeError"),
    (b"event: message_delta\ndata: [1, 2]\n\n", "SSE message_delta event", "MalformedEvent"),
    (b"event: error\ndata: \x80abc\n\n", "SSE error event", "UnicodeDecodeError"),
    (b"event: message_delta\ndata: " + b"[" * 100_000 + b"\n\n", "SSE message_delta event", "RecursionError"),
]


@pytest.mark.parametrize(("bad", "name", "exception"), BAD_EVENTS, ids=[e[1] + e[2] for e in BAD_EVENTS])
def test_malformed_event_is_recorded_and_later_events_counted(bad: bytes, name: str, exception: str) -> None:
    """An event whose data is not a JSON object is recorded as malformed (name and exception type,
    no data) and the events after it are still counted, at any chunking."""
    events = [sse_event(event) for event in _events_56()]
    data = b"".join(events[:4]) + bad + b"".join(events[4:])
    result = _same_at_any_chunking(data) if len(bad) < 1000 else _meter(data)
    assert (result.usage, result.complete, result.estimated_output_tokens) == (Usage(5, 56), True, 4)
    assert result.error_type is None
    assert result.malformed == f"{name} could not be decoded ({exception})"


def test_malformation_is_not_an_in_stream_error() -> None:
    """A malformed event and an error event are reported apart: the first of each is kept."""
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    data = b"event: message_delta\ndata: {\n\n" + sse_event(error)
    result = _same_at_any_chunking(data)
    assert result.malformed == "SSE message_delta event could not be decoded (JSONDecodeError)"
    assert (result.error_type, result.error_message) == ("overloaded_error", "Overloaded")


@pytest.mark.parametrize("where", ["data", "comment", "event name", "own event"])
def test_overlong_line_is_dropped_with_its_event(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A line over the cap is recorded and dropped with the event it belongs to (never buffered);
    the events after it are counted, whatever the chunking."""
    monkeypatch.setattr(sse, "_MAX_LINE", 1000)
    long = b"x" * 1001
    lines = {
        "data": b'event: ping\ndata: {"type":"ping","pad":"' + long + b'"}\n\n',
        "comment": b": " + long + b'\nevent: ping\ndata: {"type":"ping"}\n\n',
        "event name": b"event: " + long + b'\ndata: {"type":"ping"}\n\n',
        "own event": b"data: " + long + b"\r\n\r\n",
    }
    events = [sse_event(event) for event in _events_56()]
    data = b"".join(events[:3]) + lines[where] + b"".join(events[3:])
    result = _same_at_any_chunking(data)
    assert (result.usage, result.complete, result.estimated_output_tokens) == (Usage(5, 56), True, 4)
    assert result.malformed == "an SSE line exceeds 1000 bytes"


def test_overlong_line_drops_the_usage_event_it_belongs_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A usage event with an overlong line is dropped, not half-read: the usage before it stands."""
    monkeypatch.setattr(sse, "_MAX_LINE", 1000)
    events = _events_56()
    delta = sse_event({**events[-2], "pad": "x" * 1000})
    data = b"".join(sse_event(event) for event in events[:-2]) + delta + sse_event(events[-1])
    result = _same_at_any_chunking(data)
    assert (result.usage, result.complete, result.malformed) == (
        Usage(5, 1),
        True,
        "an SSE line exceeds 1000 bytes",
    )


def test_overlong_line_at_the_real_cap_is_not_buffered() -> None:
    """A line growing past 16 MiB without a terminator is recorded and its bytes are not kept."""
    meter = SseMeter()
    meter.feed(b"data: ")
    meter.feed(b"x" * (16 * 1024 * 1024 + 1))
    assert meter.result().malformed == f"an SSE line exceeds {16 * 1024 * 1024} bytes"
    assert meter._partial == bytearray()
    meter.feed(b"x\n\n" + b"".join(sse_event(event) for event in _events_56()))
    assert meter.result().usage == Usage(5, 56)


def test_cr_followed_by_more_text_is_not_half_of_a_crlf() -> None:
    """A CR line end with more text after it in the same chunk does not swallow an LF that starts
    the next chunk: that LF ends the next line."""
    data = b'data: {"type":"message_stop"}\rid: 1\n\n'
    split = data.index(b"\n")
    assert _meter(data, [split]) == _meter(data) == MeterResult(complete=True, bytes_seen=len(data))


MUTATIONS = ["flip", "insert", "delete", "duplicate", "newline"]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few random corruptions, line ends among them."""
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
            out[at:at] = rng.choice([b"\r", b"\n", b"\r\n", b"\n\n", b"\r\r"])
    return bytes(out)


@pytest.mark.parametrize("cap", [400, 16 * 1024 * 1024])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corrupted_streams_never_raise_and_ignore_chunking(
    name: str, cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Randomly corrupted recordings never make the meter raise, and every chunking of the same
    corrupt bytes gives the same result (also with a line cap just above the longest real line,
    so corruption makes overlong lines too)."""
    monkeypatch.setattr(sse, "_MAX_LINE", cap)
    data = (STREAMS / name).read_bytes()
    for seed in range(25):
        broken = _mutate(data, random.Random(seed))
        whole = _meter(broken)
        assert whole.bytes_seen == len(broken)
        for plan in [[1] * len(broken), *_chunkings(broken)[2:8]]:
            assert _meter(broken, plan) == whole, seed


def test_error_event_without_details() -> None:
    """An error event lacking the error object still records an error."""
    result = _meter(b'event: error\ndata: {"type":"error"}\n\n')
    assert (result.error_type, result.error_message) == ("error", None)
