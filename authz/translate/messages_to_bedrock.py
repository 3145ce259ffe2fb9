"""Messages API to an Amazon Bedrock upstream (DESIGN.md, "Claude Code's gateway protocol").

Request: ``POST /model/{id}/invoke-with-response-stream`` (``/invoke`` for a whole answer) with the
body Bedrock's InvokeModel takes for Claude: no ``model`` or ``stream``, ``anthropic_version:
"bedrock-2023-05-31"``, the ``anthropic-beta`` header's values as ``anthropic_beta``, and neither
``tags`` nor the request-tags beta (Bedrock refuses both). The exchange signs the rewritten bytes.

Streamed answer: Bedrock's event-stream frames are decoded as they arrive and written as the
Messages API's SSE (``event: <type>`` then ``data: <json>``), the event's own JSON bytes unchanged
but for ``amazon-bedrock-invocationMetrics``, which is removed. Nothing is held back: each chunk's
events go out with that chunk. Bedrock writes no keep-alives, so when nothing was written for
``translate.ping_interval`` seconds an ``event: ping`` is (the exchange runs this body in ext_proc's
FULL_DUPLEX_STREAMED mode to write on its own schedule; with the interval 0 there are no
keep-alives, and each chunk is replaced by its SSE in STREAMED mode). An exception frame becomes one ``event:
error`` with the Anthropic error type (:func:`authz.translate.errors.stream_error`) and ends the
translation.

Counting tokens: Bedrock's CountTokens (``POST /model/{foundation-model id}/count-tokens``, body
``{"input":{"invokeModel":{"body": <base64 InvokeModel body>}}}``) answers ``{"inputTokens": N}``,
given to the client as ``{"input_tokens": N}``; a model CountTokens cannot count, or any failure,
is a 501 ``not_supported`` with ``x-should-retry: false``, after which Claude Code counts locally.
https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_InvokeModelWithResponseStream.html
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from authz.translate.base import Refused, ResponseStart, UpstreamRequest
from authz.translate.envelope import error_reply
from authz.translate.errors import MappedError, stream_error
from authz.translate.messages_base import FIRST_PARTY_ONLY, REMOVE_UPSTREAM, MessagesPair, cloud_betas
from backends.bedrock.ids import foundation_model_id
from backends.eventstream import EventStreamReader, StreamMessage, chunk_event_bytes, error_text
from backends.messages import BEDROCK_METRICS_KEY, StreamAccumulator
from backends.sse import PING, sse_event, sse_frame
from backends.usage import MeterResult

BEDROCK_VERSION = "bedrock-2023-05-31"
# Fields of the Messages body that Bedrock's InvokeModel body does not take, or that the gateway sets.
_DROPPED = ("model", "stream", "anthropic_version", "anthropic_beta", *FIRST_PARTY_ONLY)
_SSE_HEADERS = (("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"))
# The event-stream answer's own framing headers mean nothing once it is SSE.
_EVENTSTREAM_HEADERS = ("content-length", "x-amzn-bedrock-content-type")
_COUNT_HEADERS = ("content-length",)

# An Anthropic event's type where Bedrock's compact JSON puts it: first. Events whose type is known
# here and that carry no usage are written without being parsed; any other shape is parsed.
_TYPE = re.compile(rb'\{"type":"([a-z_]{1,64})"[,}]')
_UNPARSED_TYPES = frozenset({b"content_block_delta", b"content_block_start", b"content_block_stop", b"ping"})
_DELTA = b'{"type":"content_block_delta",'
_METRICS = BEDROCK_METRICS_KEY.encode()


def _unsafe(data: bytes) -> bool:
    """Whether an event's bytes cannot be written as they are: a line break (an SSE data line holds
    none) or Bedrock's metrics, which stay here. (Three substring scans beat one regex here.)"""
    return b"\n" in data or b"\r" in data or _METRICS in data


_EVENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _not_supported(message: str) -> Any:
    return error_reply("not_supported", message, status=501, should_retry=False)


class EventStreamToSse:
    """Bedrock's event-stream answer, fed in arbitrary chunks, as the Messages API's SSE bytes.

    Usage is counted on the way (``acc``). Pure: the same bytes give the same output whatever the
    chunking.
    """

    __slots__ = ("_acc", "_done", "_reader")

    def __init__(self, acc: StreamAccumulator) -> None:
        self._acc = acc
        self._reader = EventStreamReader()
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        """The SSE bytes for the events ``chunk`` completes."""
        parts: list[bytes] = []
        for item in self._reader.feed(chunk):
            if self._done:
                break
            if isinstance(item, bytes):
                self._event(item, parts)
            elif item.kind == "event":
                if item.name == "chunk":
                    self._chunk(item.payload, parts)
            elif item.kind in ("exception", "error"):
                parts.append(self._exception(item))
        malformed = self._reader.malformed
        if malformed is not None and not self._done:
            self._acc.set_malformed(malformed)
            parts.append(_error_event("api_error", "The upstream's answer could not be read."))
            self._done = True
        return b"".join(parts)

    def finish(self) -> bytes:
        """What to write when the upstream's answer ends: an ``error`` event if it stopped before
        its final event without saying why (the client must not take it for a whole answer)."""
        if self._done or self._acc.result(0).complete:
            return b""
        self._done = True
        return _error_event("api_error", "The upstream's answer ended early.")

    def _exception(self, message: StreamMessage) -> bytes:
        text = error_text(message.payload) if message.kind == "exception" else message.payload.decode()
        self._acc.set_error(message.name, text)
        self._done = True
        return _error_event(*stream_error(message.name, text))

    def _chunk(self, payload: bytes, parts: list[bytes]) -> None:
        # A chunk payload in a shape other than Bedrock's usual one.
        try:
            data = chunk_event_bytes(payload)
        except (ValueError, KeyError, TypeError) as exc:
            # The type only: the exception's text can quote payload bytes.
            self._acc.set_malformed(f"a chunk's bytes could not be decoded ({type(exc).__name__})")
            return
        self._event(data, parts)

    def _event(self, data: bytes, parts: list[bytes]) -> None:
        acc = self._acc
        # The common case first, decided by a prefix: a delta in Bedrock's compact form.
        if data.startswith(_DELTA) and b"\n" not in data and b"\r" not in data and _METRICS not in data:
            acc.count_delta()
            parts += (b"event: content_block_delta\ndata: ", data, b"\n\n")
            return
        match = _TYPE.match(data)
        # _unsafe, inlined: this runs for every event.
        if (
            match is not None
            and match[1] in _UNPARSED_TYPES
            and b"\n" not in data
            and b"\r" not in data
            and _METRICS not in data
        ):
            name = match[1]
            if name == b"content_block_delta":
                acc.count_delta()
            # sse_frame's layout, in parts: one join per chunk rather than one per event.
            parts += (b"event: ", name, b"\ndata: ", data, b"\n\n")
            return
        try:
            event = json.loads(data)
            acc.apply_event(event)
        except (ValueError, RecursionError) as exc:
            acc.set_malformed(f"a chunk's event could not be decoded ({type(exc).__name__})")
            return
        name_text = event.get("type")
        if not isinstance(name_text, str) or not _EVENT_NAME.fullmatch(name_text):
            acc.set_malformed("a chunk's event has no type")
            return
        if BEDROCK_METRICS_KEY in event or match is None or _unsafe(data):
            # Bedrock's own metrics stay here; other shapes are rewritten compactly on one line.
            event.pop(BEDROCK_METRICS_KEY, None)
            data = _compact(event)
        parts.append(sse_frame(name_text.encode(), data))


def _error_event(error_type: str, message: str) -> bytes:
    return sse_event({"type": "error", "error": {"type": error_type, "message": message}})


class MessagesToBedrock(MessagesPair):
    """One Messages request served by a Bedrock upstream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acc = StreamAccumulator()
        self._sse = EventStreamToSse(self._acc)
        self._upstream_bytes = 0
        self._last_write: float | None = None
        self._ended = False

    def request(self, headers: Mapping[str, str], body: bytes) -> UpstreamRequest:
        """The Bedrock path for the profile, and the InvokeModel body (wrapped to count tokens)."""
        identity = self._identity
        operation, model_id = identity.operation, identity.upstream_model or ""
        add: list[tuple[str, Any]] = [("anthropic_version", BEDROCK_VERSION)]
        betas = cloud_betas(headers)
        if betas:
            add.append(("anthropic_beta", betas))
        if operation == "count_tokens":
            foundation = foundation_model_id(model_id)
            if foundation is None:
                message = f"Token counting is not available for {identity.requested_model} on this gateway."
                raise Refused(_not_supported(message), "error", f"CountTokens cannot count {model_id}")
            if self._request.get("max_tokens") is None:
                # InvokeModel's body requires max_tokens; counting ignores it.
                add.append(("max_tokens", 1))
            invoke = self._request.rebuild(drop=_DROPPED, add=add)
            new_body = _compact({"input": {"invokeModel": {"body": base64.b64encode(invoke).decode()}}})
            path = self._upstream.path("count_tokens", foundation)
        else:
            new_body = self._request.rebuild(drop=_DROPPED, add=add)
            path = self._upstream.path(operation, model_id)  # type: ignore[arg-type]
        return UpstreamRequest(
            path=path,
            set_headers=(("content-type", "application/json"),),
            # The betas travel in the body now.
            remove_headers=(*REMOVE_UPSTREAM, "anthropic-beta"),
            body=new_body,
        )

    def response_headers(self, status: int, headers: Mapping[str, str]) -> ResponseStart:
        """A stream becomes SSE written on the translator's schedule; the rest arrives whole."""
        if status >= 400:
            return ResponseStart(buffer=True)
        if self._identity.operation == "count_tokens":
            return ResponseStart(remove_headers=_COUNT_HEADERS, buffer=True)
        if not self._identity.streaming:
            return ResponseStart(buffer=True)
        # Keep-alives need the duplex mode; without them each chunk is simply replaced by its SSE.
        duplex = self._options.ping_interval > 0
        return ResponseStart(set_headers=_SSE_HEADERS, remove_headers=_EVENTSTREAM_HEADERS, duplex=duplex)

    def response_chunk(self, chunk: bytes, end: bool) -> bytes | None:
        """SSE for a stream's chunk; a count's answer in the API's shape; other answers unchanged."""
        if not self._identity.streaming:
            super().response_chunk(chunk, end)
            if end and self._identity.operation == "count_tokens":
                counted = self._meter.result()
                if counted.complete and counted.error_type is None:
                    return _compact({"input_tokens": counted.usage.input_tokens})
            return None
        self._upstream_bytes += len(chunk)
        out = self._sse.feed(chunk) if chunk else b""
        if end:
            out += self._sse.finish()
            self._ended = True
        if out or self._last_write is None:
            self._last_write = self._options.clock()
        return out

    def usage(self) -> MeterResult:
        """What was counted: the stream's events, or the whole body's."""
        if not self._identity.streaming:
            return super().usage()
        return self._acc.result(self._upstream_bytes)

    def next_ping(self) -> float | None:
        """Once the body has started and until it ends, ``ping_interval`` after the last write (never
        when the interval is 0)."""
        if self._last_write is None or self._ended or self._options.ping_interval <= 0:
            return None
        return self._last_write + self._options.ping_interval

    def ping(self) -> bytes | None:
        """``event: ping`` if nothing was written for ``ping_interval`` seconds."""
        due = self.next_ping()
        now = self._options.clock()
        if due is None or now < due:
            return None
        self._last_write = now
        return PING

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> MappedError:
        """Counting failed: the client counts itself (501); other errors as for every pair."""
        if self._identity.operation == "count_tokens":
            message = "Token counting is not available right now; count locally."
            return MappedError(_not_supported(message), f"upstream {status} to CountTokens")
        return super().error(status, body, headers)
