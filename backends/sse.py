"""Server-sent events as the Messages API and Vertex ``:streamRawPredict`` stream them: writer and meter.

Parsing follows the WHATWG HTML "Parsing an event stream" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or CR; a blank line dispatches; ``data`` lines join with LF; lines starting
with a colon are comments; one space after the field's colon is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from backends.messages import StreamAccumulator
from backends.usage import MeterResult

# A single line this long is not an Anthropic event; stop rather than buffer without bound.
_MAX_LINE = 16 * 1024 * 1024

_DECODED_EVENTS = frozenset({b"message_start", b"message_delta", b"message_stop", b"error"})


def _type_prefixes(*names: str) -> tuple[bytes, ...]:
    return tuple(f'{{"type":{spacing}"{name}"'.encode() for name in names for spacing in ("", " "))


# For events without an ``event:`` field, the data's leading ``"type"`` decides the same way.
COUNTED_PREFIXES = _type_prefixes("content_block_delta")
SKIPPED_PREFIXES = _type_prefixes("content_block_start", "content_block_stop", "ping")


def sse_event(event: Mapping[str, Any]) -> bytes:
    """One SSE event named after the Anthropic event's ``type``, with compact JSON data."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _decode_json(data: bytes) -> Any:
    """Parse one event's data; a module-level seam so tests can count the decodes."""
    return json.loads(data)


class SseMeter:
    """Counts usage in a ``text/event-stream`` body of Anthropic events fed in arbitrary chunks.

    Only ``message_start``, ``message_delta``, ``message_stop`` and ``error`` events are parsed
    as JSON; ``content_block_delta`` events are counted from their name alone.
    """

    __slots__ = ("_acc", "_bytes_seen", "_data", "_event", "_partial", "_skip_lf", "_stopped")

    def __init__(self) -> None:
        self._acc = StreamAccumulator()
        self._bytes_seen = 0
        self._stopped = False
        self._partial = bytearray()  # the current unterminated line
        self._skip_lf = False  # the last line ended in CR: an LF next completes a CRLF
        self._data: list[bytes] = []
        self._event: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        """Consume the next bytes of the body; malformed input is recorded, never raised."""
        self._bytes_seen += len(chunk)
        if self._stopped or not chunk:
            return
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        # Only the new bytes are searched: the partial line is known to hold no terminator,
        # so a body fed one byte at a time stays linear.
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            self._partial += chunk
            if len(self._partial) > _MAX_LINE:
                self._fail(f"an SSE line exceeds {_MAX_LINE} bytes")
            return
        block = bytes(self._partial) + chunk[: end + 1] if self._partial else chunk[: end + 1]
        self._partial = bytearray(chunk[end + 1 :])
        self._skip_lf = chunk[end] == 0x0D
        # bytes.splitlines splits on exactly LF, CR and CRLF, the SSE line terminators.
        for line in block.splitlines():
            if not line:
                self._dispatch()
                if self._stopped:
                    return
                continue
            colon = line.find(b":")
            if colon == 0:
                continue  # comment
            if colon < 0:
                name, value = line, b""
            else:
                name, value = line[:colon], line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
            # "id", "retry" and unknown fields do not affect usage.

    def result(self) -> MeterResult:
        """What has been learned so far; may be called at any time, including mid-stream."""
        return self._acc.result(self._bytes_seen)

    def _fail(self, message: str) -> None:
        self._acc.set_error("malformed_stream", message)
        self._stopped = True
        self._partial = bytearray()
        self._data = []

    def _dispatch(self) -> None:
        data, event = self._data, self._event
        self._data, self._event = [], None
        if not data:
            return  # the spec dispatches nothing for an event without data
        if event is not None:
            if event == b"content_block_delta":
                self._acc.count_delta()
                return
            if event not in _DECODED_EVENTS:
                return  # ping, content_block_start/stop and future events carry no usage
        else:
            first = data[0]
            if first.startswith(COUNTED_PREFIXES):
                self._acc.count_delta()
                return
            if first.startswith(SKIPPED_PREFIXES):
                return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        # The meter sits on the relay path: a body it cannot understand is recorded as
        # "malformed_stream" and must never raise into the proxy.
        try:
            self._acc.apply_event(_decode_json(payload))
        except Exception as exc:
            self._fail(f"SSE event {event!r} could not be decoded: {exc!r}")
