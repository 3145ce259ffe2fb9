"""Anthropic Messages API data: canned responses to emit, and the usage reader every meter shares.

The builders produce exactly what the Anthropic API sends, so the upstream emulator and the tests
exercise the same shapes the clouds return. ``StreamAccumulator`` folds decoded Anthropic events
into a ``MeterResult``; the event-stream, SSE and JSON meters differ only in how they frame bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backends.usage import MeterResult, Usage

# Bedrock appends these to the event that carries message_stop; they are the cloud's own count.
BEDROCK_METRICS_KEY = "amazon-bedrock-invocationMetrics"

_INT_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_SPLIT_FIELDS = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
_METRIC_FIELDS = (
    "inputTokenCount",
    "outputTokenCount",
    "cacheReadInputTokenCount",
    "cacheWriteInputTokenCount",
)


def _usage_dict(usage: Usage, *, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_creation_5m_input_tokens,
            "ephemeral_1h_input_tokens": usage.cache_creation_1h_input_tokens,
        },
        "output_tokens": output_tokens,
    }


def canned_events(
    *, model: str, text_chunks: Sequence[str], usage: Usage, message_id: str = "msg_emulator"
) -> list[dict[str, Any]]:
    """The event sequence the Messages API streams for a one-block text answer.

    ``message_start`` reports ``output_tokens: 1`` as the real API does; ``message_delta`` carries
    the cumulative final counts, including the input and cache fields.
    """
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _usage_dict(usage, output_tokens=1),
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events.extend(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": chunk}}
        for chunk in text_chunks
    )
    events.append({"type": "content_block_stop", "index": 0})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {
                "input_tokens": usage.input_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens,
                "output_tokens": usage.output_tokens,
            },
        }
    )
    events.append({"type": "message_stop"})
    return events


def canned_message(
    *, model: str, text: str, usage: Usage, message_id: str = "msg_emulator"
) -> dict[str, Any]:
    """The non-streaming Messages API response body for a one-block text answer."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _usage_dict(usage, output_tokens=usage.output_tokens),
    }


def _count(value: object) -> int | None:
    # bool is an int subclass; a JSON true is not a token count. Fields can also be null.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class MalformedEvent(ValueError):
    """A decoded stream event does not have the shape of an Anthropic event."""


class StreamAccumulator:
    """Folds decoded Anthropic events (and Bedrock invocation metrics) into a ``MeterResult``.

    Usage fields are cumulative: each report replaces the previous value of the fields it
    carries and leaves the others alone, so nothing is ever summed across events.
    """

    __slots__ = ("_complete", "_deltas", "_error_message", "_error_type", "_fields", "_metrics")

    def __init__(self) -> None:
        self._fields: dict[str, int] = {}
        self._metrics: dict[str, int] = {}
        self._complete = False
        self._deltas = 0
        self._error_type: str | None = None
        self._error_message: str | None = None

    @property
    def failed(self) -> bool:
        """Whether an error (in-stream or malformed input) has been recorded."""
        return self._error_type is not None

    def count_delta(self) -> None:
        """Count one ``content_block_delta`` without decoding it (the output estimate)."""
        self._deltas += 1

    def mark_complete(self) -> None:
        """Record that the terminal event (or a whole body) was seen."""
        self._complete = True

    def set_error(self, error_type: str, message: str | None) -> None:
        """Record an in-stream error, or malformed input; the first one recorded wins."""
        if self._error_type is None:
            self._error_type = error_type
            self._error_message = message

    def apply_usage(self, usage: object) -> None:
        """Take the latest value of each count present in an Anthropic ``usage`` object."""
        if not isinstance(usage, Mapping):
            return
        fields = self._fields
        for name in _INT_FIELDS:
            value = _count(usage.get(name))
            if value is not None:
                fields[name] = value
        split = usage.get("cache_creation")
        if isinstance(split, Mapping):
            for name in _SPLIT_FIELDS:
                value = _count(split.get(name))
                if value is not None:
                    fields[name] = value

    def apply_bedrock_metrics(self, metrics: object) -> None:
        """Keep Bedrock's invocation metrics, used only for counts the events did not give."""
        if not isinstance(metrics, Mapping):
            return
        for name in _METRIC_FIELDS:
            value = _count(metrics.get(name))
            if value is not None:
                self._metrics[name] = value

    def apply_event(self, event: object) -> None:
        """Fold one decoded Anthropic stream event; raises ``MalformedEvent`` if it is not one."""
        if not isinstance(event, Mapping):
            raise MalformedEvent(f"expected a JSON object event, got {type(event).__name__}")
        kind = event.get("type")
        if kind == "content_block_delta":
            self._deltas += 1
        elif kind == "message_start":
            message = event.get("message")
            if isinstance(message, Mapping):
                self.apply_usage(message.get("usage"))
        elif kind == "message_delta":
            self.apply_usage(event.get("usage"))
        elif kind == "message_stop":
            self._complete = True
        elif kind == "error":
            error = event.get("error")
            if isinstance(error, Mapping):
                error_type, message = error.get("type"), error.get("message")
                self.set_error(
                    error_type if isinstance(error_type, str) else "error",
                    message if isinstance(message, str) else None,
                )
            else:
                self.set_error("error", None)
        metrics = event.get(BEDROCK_METRICS_KEY)
        if metrics is not None:
            self.apply_bedrock_metrics(metrics)

    def usage(self) -> Usage:
        """The usage learned so far: event fields first, Bedrock metrics for the missing ones."""
        fields, metrics = self._fields, self._metrics
        five = fields.get("ephemeral_5m_input_tokens")
        one = fields.get("ephemeral_1h_input_tokens")
        cache_write = fields.get("cache_creation_input_tokens")
        if cache_write is None and (five is not None or one is not None):
            cache_write = (five or 0) + (one or 0)
        if cache_write is None:
            cache_write = metrics.get("cacheWriteInputTokenCount", 0)
        return Usage(
            input_tokens=fields.get("input_tokens", metrics.get("inputTokenCount", 0)),
            output_tokens=fields.get("output_tokens", metrics.get("outputTokenCount", 0)),
            cache_creation_input_tokens=cache_write,
            cache_creation_5m_input_tokens=five or 0,
            cache_creation_1h_input_tokens=one or 0,
            cache_read_input_tokens=fields.get(
                "cache_read_input_tokens", metrics.get("cacheReadInputTokenCount", 0)
            ),
        )

    def result(self, bytes_seen: int) -> MeterResult:
        """Everything learned so far as a ``MeterResult``."""
        return MeterResult(
            usage=self.usage(),
            complete=self._complete,
            error_type=self._error_type,
            error_message=self._error_message,
            estimated_output_tokens=self._deltas,
            bytes_seen=bytes_seen,
        )
