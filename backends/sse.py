"""Server-sent events as the Messages API and Vertex ``:streamRawPredict`` stream them: writer and meter.

Parsing follows the WHATWG HTML "Parsing an event stream" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or CR; a blank line dispatches; ``data`` lines join with LF; lines starting
with a colon are comments; one space after the field's colon is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from backends.messages import StreamAccumulator
from backends.usage import MeterResult

# A single line this long is not an Anthropic event: it is dropped (and recorded) rather than
# buffered without bound. Read at run time, so tests can lower it.
_MAX_LINE = 16 * 1024 * 1024

_DECODED_EVENTS = frozenset({b"message_start", b"message_delta", b"message_stop", b"error"})
_LINE_END = re.compile(rb"[\r\n]")


def _type_prefixes(*names: str) -> tuple[bytes, ...]:
    # Up to the separator after the closing quote, so "content_block_delta_v2" is not a delta.
    return tuple(
        f'{{"type":{spacing}"{name}"{after}'.encode()
        for name in names
        for spacing in ("", " ")
        for after in (",", "}")
    )


# For events without an ``event:`` field, the data's leading ``"type"`` decides the same way; data
# in another shape (keys in another order, other spacing) is decoded, never guessed at.
COUNTED_PREFIXES = _type_prefixes("content_block_delta")
SKIPPED_PREFIXES = _type_prefixes("content_block_start", "content_block_stop", "ping")


def sse_event(event: Mapping[str, Any]) -> bytes:
    """One SSE event named after the Anthropic event's ``type``, with compact JSON data."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def sse_frame(name: bytes, data: bytes) -> bytes:
    """One SSE event from its name and its data, both already bytes; ``data`` must hold no line
    break (compact JSON never does: JSON escapes them inside strings)."""
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


PING = sse_event({"type": "ping"})
"""The keep-alive event the Messages API writes into streams (``event: ping``)."""


def _decode_json(data: bytes) -> Any:
    """Parse one event's data; a module-level seam so tests can count the decodes."""
    return json.loads(data)


class SseMeter:
    """Counts usage in a ``text/event-stream`` body of Anthropic events fed in arbitrary chunks.

    Only ``message_start``, ``message_delta``, ``message_stop`` and ``error`` events (and events
    whose data is not in the compact form) are parsed as JSON; ``content_block_delta`` events are
    counted from their name alone. SSE framing cannot be lost (an event ends at a blank line), so
    malformed data never stops the count: an event that is not valid JSON, or a line over
    ``_MAX_LINE`` bytes (dropped with the event it belongs to), is recorded in
    ``MeterResult.malformed`` and the events after it are counted as usual.
    """

    __slots__ = (
        "_acc",
        "_bytes_seen",
        "_data",
        "_discard_line",
        "_event",
        "_partial",
        "_poisoned",
        "_skip_lf",
    )

    def __init__(self) -> None:
        self._acc = StreamAccumulator()
        self._bytes_seen = 0
        self._partial = bytearray()  # the current unterminated line
        self._skip_lf = False  # the last line ended in CR: an LF next completes a CRLF
        self._discard_line = False  # inside an overlong line: drop bytes up to its end
        self._poisoned = False  # the current event lost a line: drop it when it is dispatched
        self._data: list[bytes] = []
        self._event: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        """Consume the next bytes of the body; malformed input is recorded, never raised."""
        self._bytes_seen += len(chunk)
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if self._discard_line and chunk:
            chunk = self._drop_overlong_tail(chunk)
        if not chunk:
            return
        # Only the new bytes are searched: the partial line is known to hold no terminator,
        # so a body fed one byte at a time stays linear.
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            self._partial += chunk
            self._check_partial()
            return
        block = bytes(self._partial) + chunk[: end + 1] if self._partial else chunk[: end + 1]
        self._partial = bytearray(chunk[end + 1 :])
        # Only a CR that ends the chunk can pair with an LF at the start of the next one.
        self._skip_lf = end == len(chunk) - 1 and chunk[end] == 0x0D
        # No line can be longer than the block: check lengths only when the block is that long.
        check_length = len(block) > _MAX_LINE
        # bytes.splitlines splits on exactly LF, CR and CRLF, the SSE line terminators.
        for line in block.splitlines():
            if not line:
                self._dispatch()
                continue
            if check_length and len(line) > _MAX_LINE:
                self._overlong()
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
        self._check_partial()

    def result(self) -> MeterResult:
        """What has been learned so far; may be called at any time, including mid-stream."""
        return self._acc.result(self._bytes_seen)

    def _check_partial(self) -> None:
        # Checked on every feed, whatever the chunking, so the same bytes give the same result.
        if len(self._partial) > _MAX_LINE:
            self._overlong()
            self._partial = bytearray()
            self._discard_line = True

    def _overlong(self) -> None:
        self._acc.set_malformed(f"an SSE line exceeds {_MAX_LINE} bytes")
        self._poisoned = True

    def _drop_overlong_tail(self, chunk: bytes) -> bytes:
        """Drop the rest of an overlong line; what follows its terminator is parsed as usual."""
        found = _LINE_END.search(chunk)
        if found is None:
            return b""
        self._discard_line = False
        cut = found.start() + 1
        if chunk[cut - 1] == 0x0D:
            if cut == len(chunk):
                self._skip_lf = True
            elif chunk[cut] == 0x0A:
                cut += 1
        return chunk[cut:]

    def _dispatch(self) -> None:
        data, event = self._data, self._event
        self._data, self._event = [], None
        if self._poisoned:
            self._poisoned = False
            return  # a line of this event was dropped (and recorded): what is left proves nothing
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
        # The meter sits on the relay path: an event it cannot understand is recorded and skipped,
        # and must never raise into the proxy. The description names the event (one of the few
        # decoded names, or none) and the exception type, never the data.
        try:
            self._acc.apply_event(_decode_json(payload))
        except Exception as exc:
            name = "unnamed SSE event" if event is None else f"SSE {event.decode()} event"
            self._acc.set_malformed(f"{name} could not be decoded ({type(exc).__name__})")
