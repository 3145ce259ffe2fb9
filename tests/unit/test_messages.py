"""Canned Messages API data and the StreamAccumulator usage semantics."""

from __future__ import annotations

from backends.emulator.canned import canned_events, canned_message
from backends.messages import StreamAccumulator
from backends.usage import MeterResult, Usage

USAGE = Usage(
    input_tokens=11,
    output_tokens=42,
    cache_creation_input_tokens=300,
    cache_creation_5m_input_tokens=100,
    cache_creation_1h_input_tokens=200,
    cache_read_input_tokens=5000,
)


def test_canned_events_sequence() -> None:
    """canned_events streams start, block start, one delta per chunk, block stop, delta and stop."""
    events = canned_events(model="claude-x", text_chunks=["Hel", "lo"], usage=USAGE)
    assert [event["type"] for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(next(iter(event)) == "type" for event in events)
    assert (
        "".join(event["delta"]["text"] for event in events if event["type"] == "content_block_delta")
        == "Hello"
    )


def test_canned_events_usage() -> None:
    """message_start carries input and cache counts with output 1; message_delta carries the final totals."""
    events = canned_events(model="claude-x", text_chunks=[], usage=USAGE, message_id="msg_1")
    message = events[0]["message"]
    assert (message["id"], message["model"], message["content"]) == ("msg_1", "claude-x", [])
    assert message["usage"] == {
        "input_tokens": 11,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 5000,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 1,
    }
    delta = events[-2]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"] == {
        "input_tokens": 11,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 5000,
        "output_tokens": 42,
    }


def test_canned_events_fold_back_to_usage() -> None:
    """Folding canned_events through StreamAccumulator returns the usage they were built from."""
    acc = StreamAccumulator()
    for event in canned_events(model="m", text_chunks=["a", "b", "c"], usage=USAGE):
        acc.apply_event(event)
    assert acc.result(bytes_seen=0) == MeterResult(usage=USAGE, complete=True, estimated_output_tokens=3)


def test_canned_message() -> None:
    """canned_message is a complete non-streaming Messages response with the full usage."""
    body = canned_message(model="claude-x", text="Hello", usage=USAGE)
    assert body["type"] == "message"
    assert body["id"] == "msg_emulator"
    assert body["content"] == [{"type": "text", "text": "Hello"}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["output_tokens"] == 42
    assert body["usage"]["cache_creation"] == {
        "ephemeral_5m_input_tokens": 100,
        "ephemeral_1h_input_tokens": 200,
    }


def test_accumulator_ignores_non_counts() -> None:
    """Nulls, booleans, negatives and strings in usage objects leave earlier values in place."""
    acc = StreamAccumulator()
    acc.apply_usage({"input_tokens": 7, "output_tokens": 3})
    acc.apply_usage({"input_tokens": None, "output_tokens": True, "cache_read_input_tokens": -1})
    acc.apply_usage({"cache_creation_input_tokens": "9"})
    acc.apply_usage(None)
    assert acc.usage() == Usage(input_tokens=7, output_tokens=3)


def test_first_error_wins() -> None:
    """Once an error is recorded, later ones do not overwrite it."""
    acc = StreamAccumulator()
    acc.apply_event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    acc.set_error("api_error", "later")
    result = acc.result(bytes_seen=1)
    assert (result.error_type, result.error_message) == ("overloaded_error", "Overloaded")


def test_malformed_is_kept_apart_from_errors() -> None:
    """A malformation is recorded beside (not instead of) an in-stream error, the first of each kept."""
    acc = StreamAccumulator()
    acc.set_malformed("first")
    acc.apply_event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    acc.set_malformed("second")
    result = acc.result(bytes_seen=1)
    assert (result.malformed, result.error_type, result.error_message) == (
        "first",
        "overloaded_error",
        "Overloaded",
    )


def test_message_delta_usage_is_cumulative() -> None:
    """Each message_delta field replaces the last value of that field, fields it omits stand, and
    nothing is summed; total input is input plus cache writes plus cache reads."""
    acc = StreamAccumulator()
    acc.apply_event(
        {
            "type": "message_start",
            "message": {
                "usage": {
                    "input_tokens": 10,
                    "cache_creation_input_tokens": 300,
                    "cache_read_input_tokens": 4000,
                    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
                    "output_tokens": 1,
                }
            },
        }
    )
    acc.apply_event({"type": "message_delta", "usage": {"output_tokens": 30}})
    acc.apply_event({"type": "message_delta", "usage": {"output_tokens": 45, "input_tokens": 10}})
    acc.apply_event(
        {
            "type": "message_delta",
            "usage": {"output_tokens": 56, "cache_read_input_tokens": 4000, "input_tokens": None},
        }
    )
    usage = acc.usage()
    assert usage == Usage(
        input_tokens=10,
        output_tokens=56,
        cache_creation_input_tokens=300,
        cache_creation_5m_input_tokens=100,
        cache_creation_1h_input_tokens=200,
        cache_read_input_tokens=4000,
    )
    assert usage.total_input_tokens == 10 + 300 + 4000
