"""AWS event-stream (``application/vnd.amazon.eventstream``) as Bedrock streams it: writer and meter.

Frame layout: 4-byte total length, 4-byte headers length, 4-byte CRC32 of those eight bytes,
headers, payload, 4-byte CRC32 of everything before it. botocore parses frames but has no
encoder, so the writer lives here; decoding always goes through botocore, which checks the CRCs.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

from botocore.eventstream import EventStreamBuffer

from backends.messages import BEDROCK_METRICS_KEY, StreamAccumulator
from backends.usage import MeterResult

_U32 = struct.Struct(">I")
_PRELUDE_LENGTH = 12
_MIN_FRAME_LENGTH = _PRELUDE_LENGTH + 4
# botocore refuses headers over 128 KiB and payloads over 24 MiB; a longer prelude is corruption,
# and failing at once keeps a bad length from making us buffer gigabytes.
_MAX_FRAME_LENGTH = _MIN_FRAME_LENGTH + 128 * 1024 + 24 * 1024 * 1024
_STRING_HEADER = 7


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream frame with string-typed headers, in the order given."""
    encoded = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        if not 0 < len(raw_name) <= 0xFF or len(raw_value) > 0x7FFF:
            raise ValueError(f"event-stream header {name!r} is too long (name <= 255, value <= 32767 bytes)")
        encoded += bytes((len(raw_name),)) + raw_name + bytes((_STRING_HEADER,))
        encoded += len(raw_value).to_bytes(2, "big") + raw_value
    total = _MIN_FRAME_LENGTH + len(encoded) + len(payload)
    prelude = _U32.pack(total) + _U32.pack(len(encoded))
    message = prelude + _U32.pack(zlib.crc32(prelude)) + bytes(encoded) + payload
    return message + _U32.pack(zlib.crc32(message))


def chunk_frame(
    event: Mapping[str, Any],
    *,
    invocation_metrics: Mapping[str, int] | None = None,
    padding: str | None = None,
) -> bytes:
    """A Bedrock ``chunk`` frame carrying one Anthropic event, base64-encoded as Bedrock does it.

    ``invocation_metrics`` go inside the event JSON (Bedrock adds them to ``message_stop``);
    ``padding`` is Bedrock's ``p`` field, which hides the length of the content.
    """
    body = dict(event)
    if invocation_metrics is not None:
        body[BEDROCK_METRICS_KEY] = dict(invocation_metrics)
    payload: dict[str, str] = {"bytes": base64.b64encode(_compact(body)).decode("ascii")}
    if padding is not None:
        payload["p"] = padding
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    return encode_frame(headers, _compact(payload))


def exception_frame(exception_type: str, message: str) -> bytes:
    """A Bedrock exception frame, e.g. ``throttlingException``, as sent in place of further chunks."""
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_frame(headers, _compact({"message": message}))


def _type_prefixes(*names: str) -> tuple[bytes, ...]:
    # Base64 maps each 3 input bytes to 4 characters independently of what follows, so the
    # characters fully fixed by the known JSON prefix (floor(8n/6)) match every event of that type.
    prefixes = []
    for name in names:
        for spacing in ("", " "):
            head = f'{{"type":{spacing}"{name}"'.encode()
            encoded = base64.b64encode(head)[: len(head) * 8 // 6]
            prefixes.append(b'{"bytes":"' + encoded)
    return tuple(prefixes)


# Payload prefixes of chunk frames that carry no usage. Anything else (message_start,
# message_delta, message_stop, error, exceptions, unknown shapes) is decoded in full.
COUNTED_PREFIXES = _type_prefixes("content_block_delta")
SKIPPED_PREFIXES = _type_prefixes("content_block_start", "content_block_stop", "ping")


def _decode_frame(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """Headers and payload of one whole frame, via botocore (raises on a bad CRC or length)."""
    parser = EventStreamBuffer()
    parser.add_data(frame)
    message = next(parser)
    return message.headers, message.payload


class EventStreamMeter:
    """Counts usage in a Bedrock ``invoke-with-response-stream`` body fed in arbitrary chunks.

    Frames are delimited with the total-length prelude alone and classified by the fixed base64
    prefix of their event type, so ``content_block_delta`` frames cost a couple of slice
    comparisons; only frames that can carry usage or errors are decoded (by botocore).
    """

    __slots__ = ("_acc", "_buffer", "_bytes_seen", "_stopped")

    def __init__(self) -> None:
        self._acc = StreamAccumulator()
        self._buffer = bytearray()
        self._bytes_seen = 0
        self._stopped = False

    def feed(self, chunk: bytes) -> None:
        """Consume the next bytes of the body; malformed input is recorded, never raised."""
        self._bytes_seen += len(chunk)
        if self._stopped:
            return
        buffer = self._buffer
        buffer += chunk
        available = len(buffer)
        offset = 0
        while available - offset >= 4:
            (total,) = _U32.unpack_from(buffer, offset)
            if not _MIN_FRAME_LENGTH <= total <= _MAX_FRAME_LENGTH:
                self._fail(f"event-stream frame at byte {self._frame_position(offset)} claims {total} bytes")
                return
            end = offset + total
            if end > available:
                break
            (headers_length,) = _U32.unpack_from(buffer, offset + 4)
            payload_start = offset + _PRELUDE_LENGTH + headers_length
            if payload_start > end - 4:
                position = self._frame_position(offset)
                self._fail(f"event-stream frame at byte {position} has headers longer than the frame")
                return
            if buffer.startswith(COUNTED_PREFIXES, payload_start, end):
                self._acc.count_delta()
            elif not buffer.startswith(SKIPPED_PREFIXES, payload_start, end):
                self._decode(bytes(buffer[offset:end]), self._frame_position(offset))
                if self._stopped:
                    return
            offset = end
        # One compaction per feed: what is left is less than one frame, and CPython's bytearray
        # drops a leading slice without moving the rest.
        if offset:
            del buffer[:offset]

    def result(self) -> MeterResult:
        """What has been learned so far; may be called at any time, including mid-stream."""
        return self._acc.result(self._bytes_seen)

    def _frame_position(self, offset: int) -> int:
        # Position in the whole body, for the operator reading the error.
        return self._bytes_seen - len(self._buffer) + offset

    def _fail(self, message: str) -> None:
        self._acc.set_error("malformed_stream", message)
        self._stopped = True
        self._buffer = bytearray()

    def _decode(self, frame: bytes, position: int) -> None:
        # The meter sits on the relay path: whatever the upstream sends, understanding it may
        # fail but must not raise into the proxy, so every failure becomes "malformed_stream".
        try:
            headers, payload = _decode_frame(frame)
            message_type = headers.get(":message-type")
            if message_type == "event":
                if headers.get(":event-type") == "chunk":
                    envelope = json.loads(payload)
                    self._acc.apply_event(json.loads(base64.b64decode(envelope["bytes"], validate=True)))
            elif message_type == "exception":
                self._acc.set_error(str(headers.get(":exception-type") or "exception"), _error_text(payload))
            elif message_type == "error":
                # Service-level errors put their code and text in headers instead of the payload.
                self._acc.set_error(
                    str(headers.get(":error-code") or "error"), str(headers.get(":error-message") or "")
                )
        except Exception as exc:
            self._fail(f"event-stream frame at byte {position} could not be decoded: {exc!r}")


def _error_text(payload: bytes) -> str:
    try:
        body = json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", "replace")
    if isinstance(body, Mapping):
        for key in ("message", "Message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return payload.decode("utf-8", "replace")
