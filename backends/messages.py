"""Anthropic Messages API usage: the reader every meter shares.

``StreamAccumulator`` folds decoded Anthropic events into a ``MeterResult``; the event-stream, SSE
and JSON meters differ only in how they frame bytes. (The canned answers the emulator sends live
in ``backends/emulator/canned.py``.)
"""

from __future__ import annotations

from collections.abc import Mapping

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

    __slots__ = ("_complete", "_deltas", "_error_message", "_error_type", "_fields", "_malformed", "_metrics")

    def __init__(self) -> None:
        self._fields: dict[str, int] = {}
        self._metrics: dict[str, int] = {}
        self._complete = False
        self._deltas = 0
        self._error_type: str | None = None
        self._error_message: str | None = None
        self._malformed: str | None = None

    def count_delta(self) -> None:
        """Count one ``content_block_delta`` without decoding it (the output estimate)."""
        self._deltas += 1

    def mark_complete(self) -> None:
        """Record that the terminal event (or a whole body) was seen."""
        self._complete = True

    def set_error(self, error_type: str, message: str | None) -> None:
        """Record an in-stream error (exception frame, ``error`` event); the first one recorded wins."""
        if self._error_type is None:
            self._error_type = error_type
            self._error_message = message

    def set_malformed(self, description: str) -> None:
        """Record upstream data the meter could not understand; the first description wins.

        The description must not quote payload bytes: it ends up in logs and usage rows.
        """
        if self._malformed is None:
            self._malformed = description

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
            malformed=self._malformed,
            estimated_output_tokens=self._deltas,
            bytes_seen=bytes_seen,
        )
