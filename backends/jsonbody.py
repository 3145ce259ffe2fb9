"""Meter for non-streaming JSON bodies: Messages responses, count-tokens answers and error bodies.

Covers the Messages API and Vertex ``:rawPredict`` (a Messages response or an Anthropic error
envelope), Bedrock ``/invoke`` (the same body, or ``{"message": ...}`` on error) and the count-tokens
endpoints (``{"input_tokens": N}``; Bedrock's ``{"inputTokens": N}``). Bedrock also repeats the
counts in ``X-Amzn-Bedrock-*`` response headers; the body is authoritative, so those are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from backends.messages import StreamAccumulator
from backends.usage import MeterResult

# Far above any usage-bearing response; a larger body is relayed but not metered.
MAX_BODY_BYTES = 8 * 1024 * 1024


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class JsonMeter:
    """Buffers a whole JSON body (up to ``MAX_BODY_BYTES``) and reads usage from it on ``result()``.

    Until the body parses, the result is ``complete=False`` and ``malformed`` says the bytes so far
    are not JSON: the meter cannot tell a body still arriving from one that will never parse, so
    callers read the result once the whole body is in.
    """

    __slots__ = ("_body", "_bytes_seen", "_cached", "_max_bytes", "_overflowed")

    def __init__(self, max_bytes: int = MAX_BODY_BYTES) -> None:
        self._body = bytearray()
        self._bytes_seen = 0
        self._max_bytes = max_bytes
        self._overflowed = False
        self._cached: MeterResult | None = None

    def feed(self, chunk: bytes) -> None:
        """Buffer the next bytes of the body; past the cap, stop buffering (never raises)."""
        self._bytes_seen += len(chunk)
        self._cached = None
        if self._overflowed:
            return
        if len(self._body) + len(chunk) > self._max_bytes:
            self._overflowed = True
            self._body = bytearray()
            return
        self._body += chunk

    def result(self) -> MeterResult:
        """Parse what has been buffered; may be called at any time, including mid-body."""
        if self._cached is None:
            self._cached = self._parse()
        return self._cached

    def _parse(self) -> MeterResult:
        acc = StreamAccumulator()
        if self._overflowed:
            acc.set_error("too_large", f"response body over {self._max_bytes} bytes was not metered")
            return acc.result(self._bytes_seen)
        try:
            body = json.loads(self._body)
        except (ValueError, RecursionError) as exc:
            # Only the exception's type: its message can quote the body.
            acc.set_malformed(f"response body is not JSON ({type(exc).__name__})")
            return acc.result(self._bytes_seen)
        acc.mark_complete()
        if isinstance(body, list) and len(body) == 1:
            body = body[0]  # Google APIs sometimes wrap an error in a one-element array
        if not isinstance(body, Mapping):
            return acc.result(self._bytes_seen)
        error = body.get("error")
        if isinstance(error, Mapping):
            # Anthropic envelope {"type":"error","error":{"type","message"}}; Google's
            # {"error":{"code","message","status"}} names its kind in "status".
            kind = error.get("type") or error.get("status")
            message = error.get("message")
            acc.set_error(
                kind if isinstance(kind, str) else "upstream_error",
                message if isinstance(message, str) else None,
            )
        elif isinstance(body.get("usage"), Mapping):
            acc.apply_usage(body["usage"])
        elif (tokens := _count(body.get("input_tokens", body.get("inputTokens")))) is not None:
            acc.apply_usage({"input_tokens": tokens})
        else:
            message = body.get("message", body.get("Message"))
            if isinstance(message, str):
                acc.set_error("upstream_error", message)
        return acc.result(self._bytes_seen)
