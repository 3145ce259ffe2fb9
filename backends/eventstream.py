"""AWS event-stream (``application/vnd.amazon.eventstream``) as Bedrock streams it: writer, reader
and meter.

Frame layout: 4-byte total length, 4-byte headers length, 4-byte CRC32 of those eight bytes,
headers, payload, 4-byte CRC32 of everything before it. botocore parses frames but has no
encoder, so the writer lives here. The meter and the reader check both CRCs of every frame
themselves (zlib over views of the buffer); headers are decoded by botocore, except the one header
block every Bedrock ``chunk`` frame carries, which is recognised as bytes (see
:class:`EventStreamReader`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.eventstream import EventStreamBuffer

from backends.messages import BEDROCK_METRICS_KEY, StreamAccumulator
from backends.usage import MeterResult

_U32 = struct.Struct(">I")
_PRELUDE = struct.Struct(">III")  # total length, headers length, prelude CRC
_PRELUDE_LENGTH = 12
_MIN_FRAME_LENGTH = _PRELUDE_LENGTH + 4
# botocore refuses headers over 128 KiB and payloads over 24 MiB; a prelude claiming more is
# corruption, and refusing it at once keeps a bad length from making us buffer gigabytes.
_MAX_HEADERS_LENGTH = 128 * 1024
_MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024
# A byte that can begin a frame: sane total lengths are below 2**25 (big-endian, first byte 0 or 1).
_FRAME_START = re.compile(rb"[\x00\x01]")
# Lost frame boundaries tolerated in one stream before the meter stops (see EventStreamMeter).
_MAX_FRAMING_ERRORS = 8
_STRING_HEADER = 7


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _encode_headers(headers: Mapping[str, str]) -> bytes:
    encoded = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        if not 0 < len(raw_name) <= 0xFF or len(raw_value) > 0x7FFF:
            raise ValueError(f"event-stream header {name!r} is too long (name <= 255, value <= 32767 bytes)")
        encoded += bytes((len(raw_name),)) + raw_name + bytes((_STRING_HEADER,))
        encoded += len(raw_value).to_bytes(2, "big") + raw_value
    return bytes(encoded)


# The headers of a Bedrock chunk frame, in the order Bedrock writes them.
_CHUNK_HEADERS = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}


def encode_frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream frame with string-typed headers, in the order given."""
    encoded = _encode_headers(headers)
    total = _MIN_FRAME_LENGTH + len(encoded) + len(payload)
    prelude = _U32.pack(total) + _U32.pack(len(encoded))
    message = prelude + _U32.pack(zlib.crc32(prelude)) + encoded + payload
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
    return encode_frame(_CHUNK_HEADERS, _compact(payload))


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
    # The prefix runs past the type's closing quote, so a longer type name that merely starts with
    # a known one ("content_block_delta_v2") is decoded, never counted as the known one.
    prefixes = []
    for name in names:
        for spacing in ("", " "):
            for after in (",", "}"):
                head = f'{{"type":{spacing}"{name}"{after}'.encode()
                encoded = base64.b64encode(head)[: len(head) * 8 // 6]
                prefixes.append(b'{"bytes":"' + encoded)
    return tuple(prefixes)


# Payload prefixes of chunk frames that carry no usage, in Bedrock's compact form (and with a space
# after the colon). Anything else (message_start, message_delta, message_stop, error, exceptions,
# other spacing or key orders, unknown shapes) is decoded in full, so the prefixes only decide how
# cheaply a frame is counted, never whether it is.
COUNTED_PREFIXES = _type_prefixes("content_block_delta")
SKIPPED_PREFIXES = _type_prefixes("content_block_start", "content_block_stop", "ping")


def _decode_frame(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """Headers and payload of one whole frame, via botocore (raises on a bad CRC or length)."""
    parser = EventStreamBuffer()
    parser.add_data(frame)
    message = next(parser)
    return message.headers, message.payload


def _sane_prelude(total: int, headers_length: int) -> bool:
    """Whether a prelude's lengths are within what botocore accepts (headers, then payload)."""
    return headers_length <= _MAX_HEADERS_LENGTH and 0 <= total - headers_length - _MIN_FRAME_LENGTH <= (
        _MAX_PAYLOAD_LENGTH
    )


class EventStreamMeter:
    """Counts usage in a Bedrock ``invoke-with-response-stream`` body fed in arbitrary chunks.

    Every frame's prelude CRC and message CRC are checked (zlib over views of the buffer, no copy).
    Frames are then classified by the fixed base64 prefix of their event type, so a compact
    ``content_block_delta`` costs two CRCs and a prefix comparison; only frames that can carry
    usage or errors, or that are not in the compact form, are decoded (by botocore).

    Malformed data is recorded in ``MeterResult.malformed`` and counting goes on. A frame whose CRCs
    check but whose payload is not a Bedrock chunk is skipped. A frame that fails a CRC or claims an
    impossible length means the frame boundary is lost: the meter scans forward for the next offset
    holding a whole frame whose prelude CRC and message CRC both check (64 bits of evidence, so
    resynchronising on a false boundary is vanishingly unlikely) and counts on from there. After
    ``_MAX_FRAMING_ERRORS`` lost boundaries in one stream it stops, which bounds the CRC work a
    corrupt stream can cause.
    """

    __slots__ = ("_acc", "_buffer", "_bytes_seen", "_framing_errors", "_resyncing", "_stopped")

    def __init__(self) -> None:
        self._acc = StreamAccumulator()
        self._buffer = bytearray()
        self._bytes_seen = 0
        self._framing_errors = 0
        self._resyncing = False
        self._stopped = False

    def feed(self, chunk: bytes) -> None:
        """Consume the next bytes of the body; malformed input is recorded, never raised."""
        self._bytes_seen += len(chunk)
        if self._stopped:
            return
        buffer = self._buffer
        buffer += chunk
        with memoryview(buffer) as view:
            offset = self._consume(buffer, view)
        # One compaction per feed: what is left is less than one frame, and CPython's bytearray
        # drops a leading slice without moving the rest.
        if offset and not self._stopped:
            del buffer[:offset]

    def result(self) -> MeterResult:
        """What has been learned so far; may be called at any time, including mid-stream."""
        return self._acc.result(self._bytes_seen)

    def _consume(self, buffer: bytearray, view: memoryview) -> int:
        """Handle every whole frame in the buffer; returns the offset of the first byte still needed."""
        crc32, unpack, unpack_u32 = zlib.crc32, _PRELUDE.unpack_from, _U32.unpack_from
        counted, skipped, count_delta = COUNTED_PREFIXES, SKIPPED_PREFIXES, self._acc.count_delta
        available = len(buffer)
        offset = 0
        while available - offset >= _PRELUDE_LENGTH:
            total, headers_length, prelude_crc = unpack(buffer, offset)
            # _sane_prelude inlined (this loop runs once per frame), then the prelude CRC.
            if not (
                headers_length <= _MAX_HEADERS_LENGTH
                and 0 <= total - headers_length - _MIN_FRAME_LENGTH <= _MAX_PAYLOAD_LENGTH
                and crc32(view[offset : offset + 8]) == prelude_crc
            ):
                offset = self._lost_boundary(buffer, view, offset, counts=False)
                continue
            end = offset + total
            if end > available:
                break
            # The message CRC covers everything before it, prelude CRC included, so it continues
            # from the prelude CRC just checked rather than re-reading the first eight bytes.
            if crc32(view[offset + 8 : end - 4], prelude_crc) != unpack_u32(buffer, end - 4)[0]:
                offset = self._lost_boundary(buffer, view, offset, counts=True)
                continue
            if self._resyncing:
                self._resyncing = False
            payload_start = offset + _PRELUDE_LENGTH + headers_length
            if buffer.startswith(counted, payload_start, end - 4):
                count_delta()
            elif not buffer.startswith(skipped, payload_start, end - 4):
                self._decode(bytes(view[offset:end]), self._bytes_seen - available + offset)
            offset = end
        return offset

    def _lost_boundary(self, buffer: bytearray, view: memoryview, offset: int, *, counts: bool) -> int:
        """The frame at ``offset`` cannot be trusted: record why, and return where to look next.

        Outside a resynchronisation the first failure is recorded and counts as a framing error.
        While resynchronising, candidates that fail the prelude checks cost nothing (most offsets
        do), but a candidate that passes them and then fails its message CRC costs a CRC over up
        to one maximal frame, so it counts too.
        """
        if not self._resyncing:
            self._resyncing = True
            self._framing_errors += 1
            position = self._bytes_seen - len(buffer) + offset
            total, headers_length, prelude_crc = _PRELUDE.unpack_from(buffer, offset)
            if not _sane_prelude(total, headers_length):
                problem = f"claims {total} bytes with {headers_length} bytes of headers"
            elif zlib.crc32(view[offset : offset + 8]) != prelude_crc:
                problem = "fails its prelude CRC"
            else:
                problem = "fails its message CRC"
            self._acc.set_malformed(f"event-stream frame at byte {position} {problem}")
        elif counts:
            self._framing_errors += 1
        if self._framing_errors > _MAX_FRAMING_ERRORS:
            self._stopped = True
            self._buffer = bytearray()
            return len(buffer)
        # Every sane total length is below 2**25, so a frame can only start at a 0x00 or 0x01 byte;
        # the search skips JSON and base64 text at C speed.
        found = _FRAME_START.search(buffer, offset + 1)
        return found.start() if found else len(buffer)

    def _decode(self, frame: bytes, position: int) -> None:
        # The frame's CRCs check, so its boundary is sound: whatever is wrong inside it is recorded
        # and the frames after it are still counted. Nothing here may raise into the proxy.
        stage = "headers"
        try:
            headers, payload = _decode_frame(frame)
            message_type = headers.get(":message-type")
            if message_type == "event":
                if headers.get(":event-type") == "chunk":
                    stage = "chunk payload JSON"
                    envelope = json.loads(payload)
                    stage = "chunk bytes field"
                    event_bytes = base64.b64decode(envelope["bytes"], validate=True)
                    stage = "event JSON"
                    event = json.loads(event_bytes)
                    stage = "event"
                    self._acc.apply_event(event)
            elif message_type == "exception":
                stage = "exception payload"
                self._acc.set_error(str(headers.get(":exception-type") or "exception"), _error_text(payload))
            elif message_type == "error":
                # Service-level errors put their code and text in headers instead of the payload.
                self._acc.set_error(
                    str(headers.get(":error-code") or "error"), str(headers.get(":error-message") or "")
                )
        except Exception as exc:
            # Only the stage and the exception's type: the messages of some (UnicodeDecodeError,
            # KeyError) quote payload bytes, which must not reach logs or usage rows.
            self._acc.set_malformed(
                f"event-stream frame at byte {position}: {stage} could not be decoded ({type(exc).__name__})"
            )


# The header block of a chunk frame as Bedrock writes it (the three string headers of
# _CHUNK_HEADERS, in that order). A frame carrying exactly these bytes needs no header decoding.
CHUNK_HEADER_BLOCK = _encode_headers(_CHUNK_HEADERS)
_CHUNK_PAYLOAD_PREFIX = b'{"bytes":"'


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One whole event-stream message.

    ``kind`` is its ``:message-type`` (``event``, ``exception`` or ``error``); ``name`` its
    ``:event-type``, ``:exception-type`` or ``:error-code``; ``payload`` its payload (for an
    ``error`` message, which carries its text in a header, the ``:error-message`` header).
    """

    kind: str
    name: str
    payload: bytes


class EventStreamReader:
    """Splits a Bedrock event-stream body fed in arbitrary chunks into its events.

    Both CRCs of every frame are checked. A ``chunk`` frame is Bedrock's envelope around one
    Anthropic event: when its header block is byte for byte the one Bedrock writes and its payload
    starts ``{"bytes":"``, the event is decoded from the base64 where it stands (botocore's full
    decode of the frame costs about 11 µs, more than the rest of translating the event, on every
    event of every stream). Any other frame (another header layout, an exception, an error) is
    decoded by botocore and given whole as a :class:`StreamMessage`.

    Unlike :class:`EventStreamMeter`, which must keep counting around damage, the reader stops at
    the first frame it cannot trust (a failed CRC, an impossible length, headers botocore refuses):
    a translated stream must not go on after a lost frame boundary. :attr:`malformed` then says
    where and why (never quoting payload bytes), and every later byte is ignored.
    """

    __slots__ = ("_buffer", "_bytes_seen", "malformed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._bytes_seen = 0
        self.malformed: str | None = None

    def feed(self, chunk: bytes) -> list[bytes | StreamMessage]:
        """What ``chunk`` completes, in order: each chunk event's Anthropic event (its JSON bytes),
        or a :class:`StreamMessage`; never raises on malformed input."""
        self._bytes_seen += len(chunk)
        if self.malformed is not None:
            return []
        buffer = self._buffer
        buffer += chunk
        out: list[bytes | StreamMessage] = []
        with memoryview(buffer) as view:
            offset = self._split(buffer, view, out)
        if self.malformed is not None:
            self._buffer = bytearray()
        elif offset:
            del buffer[:offset]
        return out

    def _split(self, buffer: bytearray, view: memoryview, out: list[bytes | StreamMessage]) -> int:
        # One pass per frame with everything in locals: this loop runs for every event.
        crc32, unpack, unpack_u32, a2b = (
            zlib.crc32,
            _PRELUDE.unpack_from,
            _U32.unpack_from,
            binascii.a2b_base64,
        )
        block, block_length = CHUNK_HEADER_BLOCK, len(CHUNK_HEADER_BLOCK)
        prefix, prefix_length = _CHUNK_PAYLOAD_PREFIX, len(_CHUNK_PAYLOAD_PREFIX)
        append = out.append
        available = len(buffer)
        offset = 0
        while available - offset >= _PRELUDE_LENGTH:
            total, headers_length, prelude_crc = unpack(buffer, offset)
            if not (
                headers_length <= _MAX_HEADERS_LENGTH
                and 0 <= total - headers_length - _MIN_FRAME_LENGTH <= _MAX_PAYLOAD_LENGTH
            ):
                self._fail(offset, f"claims {total} bytes with {headers_length} bytes of headers")
                return offset
            end = offset + total
            if end > available:
                # Not whole yet: check the prelude now, so a corrupt length is not waited for.
                if crc32(view[offset : offset + 8]) != prelude_crc:
                    self._fail(offset, "fails its prelude CRC")
                    return offset
                break
            # The message CRC is continued from the prelude CRC as the frame states it, so a
            # mismatch also catches a prelude whose CRC fails: one CRC pass per whole frame.
            if crc32(view[offset + 8 : end - 4], prelude_crc) != unpack_u32(buffer, end - 4)[0]:
                bad_prelude = crc32(view[offset : offset + 8]) != prelude_crc
                self._fail(offset, "fails its prelude CRC" if bad_prelude else "fails its message CRC")
                return offset
            payload = offset + _PRELUDE_LENGTH + headers_length
            if headers_length == block_length and buffer.startswith(block, offset + _PRELUDE_LENGTH):
                # Base64 holds no quote or backslash: the value ends at the next quote.
                quote = buffer.find(b'"', payload + prefix_length, end - 4)
                if quote > 0 and buffer.startswith(prefix, payload):
                    try:
                        append(a2b(view[payload + prefix_length : quote], strict_mode=True))
                        offset = end
                        continue
                    except binascii.Error:
                        pass
                append(StreamMessage("event", "chunk", bytes(view[payload : end - 4])))
            else:
                try:
                    headers, body = _decode_frame(bytes(view[offset:end]))
                except Exception as exc:
                    self._fail(offset, f"has headers that could not be decoded ({type(exc).__name__})")
                    return offset
                append(_message(headers, body))
            offset = end
        return offset

    def _fail(self, offset: int, problem: str) -> None:
        position = self._bytes_seen - len(self._buffer) + offset
        self.malformed = f"event-stream frame at byte {position} {problem}"


def _message(headers: Mapping[str, Any], payload: bytes) -> StreamMessage:
    kind = str(headers.get(":message-type") or "")
    if kind == "exception":
        return StreamMessage(kind, str(headers.get(":exception-type") or "exception"), payload)
    if kind == "error":
        text = str(headers.get(":error-message") or "")
        return StreamMessage(kind, str(headers.get(":error-code") or "error"), text.encode())
    return StreamMessage(kind, str(headers.get(":event-type") or ""), payload)


def chunk_event_bytes(payload: bytes) -> bytes:
    """The Anthropic event (JSON bytes) a ``chunk`` payload carries in base64, read as JSON; raises
    ValueError (or KeyError, TypeError) when the payload is not a chunk."""
    envelope = json.loads(payload)
    return base64.b64decode(envelope["bytes"], validate=True)


def error_text(payload: bytes) -> str:
    """The message of an exception frame's payload (``{"message": ...}``), else its text."""
    return _error_text(payload)


def _error_text(payload: bytes) -> str:
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return payload.decode("utf-8", "replace")
    if isinstance(body, Mapping):
        for key in ("message", "Message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return payload.decode("utf-8", "replace")
