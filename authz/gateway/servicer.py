"""The gRPC edge: Envoy's ext_authz ``Check`` and ext_proc ``Process`` services.

Thin servicers (STYLE.md, habit 1): protobuf is turned into plain data at the top, the decision
is made by :mod:`authz.gateway.authorize` or :mod:`authz.gateway.exchange`, and the answer is
turned back into protobuf at the bottom. A deny is a response; a fault is an error, and Envoy
fails closed on errors. This is the only module that imports Envoy's generated protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz.envoy.names import (
    ATTEMPT_COUNT_ATTRIBUTE,
    ATTEMPT_NAMESPACE,
    RECORDED_NAMESPACE,
    UPSTREAM_NAME_ATTRIBUTE,
)
from authz.gateway.accesslog import AccessLog, AccessRecord
from authz.gateway.attempt import Answer, Attempt, AttemptAction
from authz.gateway.authorize import Allow, Authorizer, CheckInput, Deny
from authz.gateway.context import METADATA_NAMESPACE, from_metadata, to_metadata
from authz.gateway.exchange import Action, AttemptAnswer, Continue, Deps, Exchange, Reply
from authz.gateway.limits import LimitGate
from authz.identity import RequestIdentity
from authz.store.usagerow import UsageRow
from authz.telemetry.runtime import NO_TELEMETRY, Telemetry
from authz.telemetry.tracing import row_attributes
from authz.translate.envelope import ErrorReply

log = logging.getLogger("authz.grpc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Bytes no header value may hold (RFC 9110 section 5.5: field values are visible characters,
# spaces and tabs; CR, LF and NUL are never allowed, and obs-fold is refused, section 5.2 of
# RFC 9112).
_FORBIDDEN_IN_VALUES = frozenset(range(0x00, 0x09)) | frozenset(range(0x0A, 0x20)) | {0x7F}


def _header_option(name: str, value: str) -> base_pb2.HeaderValueOption:
    # ext_proc reads header values from raw_value (bytes) since Envoy 1.32.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
    )


def _authz_header_option(name: str, value: str) -> base_pb2.HeaderValueOption:
    # ext_authz reads only the string ``value`` of a HeaderValue.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def check_headers(
    entries: Any,
) -> tuple[dict[str, str], frozenset[str], str | None]:
    """``(headers, repeated names, problem)`` from ext_authz's raw header list
    (``encode_raw_headers``: one entry per header line, values as bytes).

    The first value of a repeated header is kept and its name reported; a value with control
    characters or invalid UTF-8 is reported as the problem (the request is refused, never
    normalised).
    """
    headers: dict[str, str] = {}
    repeated: set[str] = set()
    problem: str | None = None
    for entry in entries:
        name = entry.key
        raw: bytes = entry.raw_value
        if problem is None and not _FORBIDDEN_IN_VALUES.isdisjoint(raw):
            problem = f"{name} holds a control character"
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            problem = problem or f"{name} is not valid UTF-8"
            value = raw.decode("utf-8", "replace")
        if name in headers:
            repeated.add(name)
        else:
            headers[name] = value
    return headers, frozenset(repeated), problem


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """ext_authz: one unary ``Check`` per request."""

    def __init__(
        self,
        authorizer: Authorizer,
        record: Callable[[UsageRow], None],
        clock: Callable[[], float] = time.time,
        count_refusal: Callable[[str], None] = lambda _reason: None,
        telemetry: Telemetry = NO_TELEMETRY,
        gate: LimitGate | None = None,
    ) -> None:
        self._authorizer = authorizer
        self._record = record
        self._clock = clock
        self._count_refusal = count_refusal
        self._telemetry = telemetry
        self._gate = gate

    def use(self, authorizer: Authorizer) -> None:
        """Decide the requests that arrive from now on with ``authorizer`` (a reload): each
        ``Check`` reads it once, so one being decided keeps the one it started with."""
        self._authorizer = authorizer

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        """Decide one request."""
        # --- telemetry: handling time, and for a refusal a span when Envoy traces the request ---
        telemetry = self._telemetry
        if not telemetry.enabled:
            return await self._check(request, None)
        started = time.perf_counter()
        traced = (context, time.time_ns()) if telemetry.tracing else None
        try:
            return await self._check(request, traced)
        finally:
            telemetry.check_seconds(time.perf_counter() - started)

    async def _check(
        self,
        request: external_auth_pb2.CheckRequest,
        traced: tuple[grpc.aio.ServicerContext[Any, Any], int] | None,
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        if http.header_map.headers:
            headers, repeated, problem = check_headers(http.header_map.headers)
        else:
            headers, repeated, problem = dict(http.headers), frozenset(), None
        decision = self._authorizer.check(
            CheckInput(
                method=http.method,
                path=http.path,
                headers=headers,
                request_id=headers.get("x-request-id") or http.id,
                now=self._clock(),
                repeated=repeated,
                malformed=problem,
            )
        )
        if isinstance(decision, Allow) and self._gate is not None:
            # Spend caps and rate limits; the body (its first part: ExtAuthz.with_request_body)
            # gives max_tokens for the reservation.
            decision = await self._gate.admit(decision, http.raw_body or http.body.encode())
        if traced is not None and isinstance(decision, Deny):
            self._trace_refusal(decision, *traced)
        if isinstance(decision, Allow):
            return _allow_response(decision)
        if decision.row is not None:
            self._record(decision.row)
            return _deny_response(decision.reply, recorded=True)
        self._count_refusal(decision.reason)
        return _deny_response(decision.reply, recorded=False)

    def _trace_refusal(
        self, decision: Deny, context: grpc.aio.ServicerContext[Any, Any], started_ns: int
    ) -> None:
        # Only a refusal gets a span here: an allowed request's story (who, model, tokens, outcome)
        # is told by its ext_proc span and Envoy's egress span times this call, so the metadata is
        # not even read for one.
        span = self._telemetry.span("ext_authz Check", context.invocation_metadata(), started_ns)
        if span is None:
            return
        if decision.row is not None:
            span.finish({**row_attributes(decision.row), "gateway.decision": "deny"})
        else:
            span.finish({"gateway.decision": "deny", "gateway.denial_reason": decision.reason})


def _allow_response(decision: Allow) -> external_auth_pb2.CheckResponse:
    metadata = struct_pb2.Struct()
    metadata.update(to_metadata(decision.identity))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_authz_header_option(k, v) for k, v in decision.set_headers],
            headers_to_remove=list(decision.remove_headers),
            # Added to the response the client gets (OkHttpResponse.response_headers_to_add), after
            # the upstream's own anthropic-ratelimit-* were stripped (authz.envoy.filters).
            response_headers_to_add=[_authz_header_option(k, v) for k, v in decision.response_headers],
        ),
        dynamic_metadata=metadata,
    )


# Dynamic metadata saying a usage row was written for the request (Envoy's access log skips it).
_RECORDED_BY_AUTHZ = struct_pb2.Struct(fields={"recorded": struct_pb2.Value(string_value="1")})
_RECORDED_BY_PROC = struct_pb2.Struct(
    fields={
        RECORDED_NAMESPACE: struct_pb2.Value(
            struct_value=struct_pb2.Struct(fields={"row": struct_pb2.Value(string_value="1")})
        )
    }
)


def _deny_response(reply: ErrorReply, *, recorded: bool) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=reply.status),
            headers=[_authz_header_option(k, v) for k, v in reply.headers],
            body=reply.body.decode(),
        ),
        dynamic_metadata=_RECORDED_BY_AUTHZ if recorded else None,
    )


def _headers(msg: ep.HttpHeaders) -> dict[str, str]:
    # Envoy sends header values in raw_value (bytes) since 1.32; older versions used value.
    return {
        h.key: (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
        for h in msg.headers.headers
    }


def _identity(request: ep.ProcessingRequest) -> RequestIdentity | None:
    ns = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if ns is None:
        return None
    return from_metadata({k: v.string_value for k, v in ns.fields.items()})


# ext_proc's attributes arrive under the filter's canonical name (ProcessingRequest.attributes).
_ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


def _attempted(request: ep.ProcessingRequest) -> tuple[str, int | None]:
    """The upstream Envoy picked for an attempt of a failover chain (the endpoint's metadata) and
    the attempt's number, as the gateway.attempt filter's request attributes ("" and None when
    absent)."""
    attributes = request.attributes.get(_ATTRIBUTES_KEY)
    if attributes is None:
        return "", None
    name = attributes.fields.get(UPSTREAM_NAME_ATTRIBUTE)
    number = attributes.fields.get(ATTEMPT_COUNT_ATTRIBUTE)
    return (
        name.string_value if name is not None else "",
        int(number.number_value) if number is not None and number.number_value >= 1 else None,
    )


def _attempt_answer(request: ep.ProcessingRequest) -> AttemptAnswer | None:
    """What an attempt that answered the client itself said (gateway.attempt metadata), if one did."""
    ns = request.metadata_context.filter_metadata.get(ATTEMPT_NAMESPACE)
    if ns is None:
        return None
    fields = ns.fields
    number = fields["attempts"].number_value if "attempts" in fields else 0
    return AttemptAnswer(
        fields["upstream"].string_value if "upstream" in fields else "",
        fields["outcome"].string_value if "outcome" in fields else "error",
        fields["reason"].string_value if "reason" in fields else "",
        int(number) if number >= 1 else None,
    )


def _common(action: Continue) -> ep.CommonResponse:
    common = ep.CommonResponse()
    if action.set_headers or action.remove_headers:
        common.header_mutation.CopyFrom(
            ep.HeaderMutation(
                set_headers=[_header_option(k, v) for k, v in action.set_headers],
                remove_headers=list(action.remove_headers),
            )
        )
    if action.body is not None:
        common.body_mutation.CopyFrom(ep.BodyMutation(body=action.body))
    return common


def _immediate(reply: ErrorReply) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reply.status),
            headers=ep.HeaderMutation(set_headers=[_header_option(k, v) for k, v in reply.headers]),
            body=reply.body,
        )
    )


_MODE = processing_mode_pb2.ProcessingMode
_BUFFERED = _MODE(response_body_mode=_MODE.BUFFERED)
# The exchange writes the response body on its own schedule (keep-alives while the upstream is
# silent). FULL_DUPLEX_STREAMED requires trailers to be sent (ProcessingMode.BodySendMode); header
# modes left DEFAULT keep the filter's (ProcessingResponse.mode_override).
_FULL_DUPLEX = _MODE(response_body_mode=_MODE.FULL_DUPLEX_STREAMED, response_trailer_mode=_MODE.SEND)

# The unchanged answer to each message kind, built once: most messages get one of these.
_UNCHANGED = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
}


def _to_response(kind: str, action: Action) -> ep.ProcessingResponse:
    response = _response(kind, action)
    if not action.recorded:
        return response
    # The row is written: Envoy's access log must skip the request (a copy: the unchanged answers
    # are shared).
    marked = ep.ProcessingResponse()
    marked.CopyFrom(response)
    marked.dynamic_metadata.CopyFrom(_RECORDED_BY_PROC)
    return marked


def _response(kind: str, action: Action) -> ep.ProcessingResponse:
    if isinstance(action, Reply):
        return _immediate(action.reply)
    if not (
        action.set_headers
        or action.remove_headers
        or action.body is not None
        or action.buffer_response_body
        or action.duplex
    ):
        return _UNCHANGED.get(kind) or ep.ProcessingResponse()
    common = _common(action)
    if kind == "request_headers":
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
    if kind == "request_body":
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
    if kind == "response_headers":
        override = _FULL_DUPLEX if action.duplex else _BUFFERED if action.buffer_response_body else None
        headers = ep.HeadersResponse(response=common)
        return ep.ProcessingResponse(response_headers=headers, mode_override=override)
    return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))


# An attempt prepared from its headers alone tells Envoy not to send the body it would have
# (header modes left DEFAULT keep the filter's: ProcessingResponse.mode_override).
_NO_REQUEST_BODY = _MODE(request_body_mode=_MODE.NONE)


def _attempt_response(kind: str, action: AttemptAction, *, skip_body: bool = False) -> ep.ProcessingResponse:
    """The answer to an attempt's message: the prepared request, or the attempt's own answer to the
    client with what happened in the gateway.attempt metadata (for the exchange's usage row)."""
    if isinstance(action, Answer):
        note = struct_pb2.Struct()
        note.update({"upstream": action.upstream, "outcome": action.outcome, "reason": action.reason})
        if action.attempts is not None:
            note.update({"attempts": action.attempts})
        response = _immediate(action.reply)
        response.dynamic_metadata.fields[ATTEMPT_NAMESPACE].struct_value.CopyFrom(note)
        return response
    response = _response(kind, action)
    if not skip_body:
        return response
    skipping = ep.ProcessingResponse()
    skipping.CopyFrom(response)
    skipping.mode_override.CopyFrom(_NO_REQUEST_BODY)
    return skipping


def _response_side(request_body: int, streams: bool) -> processing_mode_pb2.ProcessingMode:
    return _MODE(
        request_header_mode=_MODE.SEND,
        request_body_mode=request_body,
        response_header_mode=_MODE.SEND,
        response_body_mode=_MODE.STREAMED if streams else _MODE.BUFFERED,
        request_trailer_mode=_MODE.SKIP,
        response_trailer_mode=_MODE.SKIP,
    )


# The routes configure only the request side (authz/envoy/filters.py: route_mode): the answer to
# the request headers switches the response side on, so a request ext_authz refused (whose local
# reply passes this filter without a request phase) never opens a stream to the service. The
# request body mode is the route's, as Envoy reports it (ProcessingRequest.protocol_config).
_OPENED = {
    (body, streams): ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(), mode_override=_response_side(body, streams)
    )
    for body in (_MODE.NONE, _MODE.BUFFERED)
    for streams in (False, True)
}


def _open_response(action: Continue, request: ep.ProcessingRequest, streams: bool) -> ep.ProcessingResponse:
    """The answer to the request headers, with the response side of the processing mode on."""
    body = request.protocol_config.request_body_mode
    response = _to_response("request_headers", action)
    shared = _OPENED.get((body, streams))
    if shared is not None and response is _UNCHANGED["request_headers"]:
        return shared
    opened = ep.ProcessingResponse()
    opened.CopyFrom(response)
    opened.mode_override.CopyFrom(_response_side(body, streams))
    return opened


def _streamed(body: bytes, end_of_stream: bool, *, recorded: bool = False) -> ep.ProcessingResponse:
    """A body chunk in FULL_DUPLEX_STREAMED mode (BodyMutation.streamed_response), the only answer
    Envoy takes to a body message in that mode."""
    chunk = ep.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
    mutation = ep.BodyMutation(streamed_response=chunk)
    return ep.ProcessingResponse(
        response_body=ep.BodyResponse(response=ep.CommonResponse(body_mutation=mutation)),
        dynamic_metadata=_RECORDED_BY_PROC if recorded else None,
    )


class ExternalProcessorServicer(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """ext_proc: one bidirectional stream per request."""

    def __init__(self, deps: Deps, telemetry: Telemetry = NO_TELEMETRY) -> None:
        self._deps = deps
        self._telemetry = telemetry

    def use(self, deps: Deps) -> None:
        """Serve the streams that open from now on with ``deps`` (a reload): each stream reads them
        once when it opens and keeps them to its end, usage row included."""
        self._deps = deps

    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ep.ProcessingResponse]:
        """Serve one request's messages; in duplex mode, also write keep-alives on time. A stream of
        the gateway.attempt upstream filter (one attempt of a failover chain) is served apart."""
        inbox = _Inbox(request_iterator)
        first = await inbox.next()
        # Only the gateway.attempt filter sends attributes, with the request headers.
        if isinstance(first, ep.ProcessingRequest) and first.attributes:
            try:
                async for response in self._attempt(first, inbox):
                    yield response
            finally:
                inbox.close()
            return
        # --- telemetry: streams in flight, the time spent on the request's messages, a span ---
        telemetry = self._telemetry
        timed = telemetry.enabled
        spent = 0.0
        span = (
            telemetry.span("ext_proc Process", context.invocation_metadata()) if telemetry.tracing else None
        )
        telemetry.stream_opened()
        exchange = Exchange(self._deps)
        clock = self._deps.translate.clock
        pending = first if isinstance(first, ep.ProcessingRequest) else None
        try:
            while True:
                if pending is not None:
                    request, pending = pending, None
                else:
                    deadline = exchange.ping_deadline()
                    if deadline is not None or inbox.waking:
                        inbox.wake_at(deadline, clock())
                    request = await inbox.next()
                if request is None:
                    break
                if isinstance(request, _Tick):
                    ping = exchange.on_ping()
                    if ping is not None and ping.body:
                        yield _streamed(ping.body, False)
                    continue
                started = time.perf_counter() if timed else 0.0
                kind = request.WhichOneof("request")
                action: Action
                if kind == "response_body":
                    body = request.response_body
                    action = exchange.on_response_body(body.body, body.end_of_stream)
                    if exchange.duplex and isinstance(action, Continue):
                        out = action.body if action.body is not None else b""
                        if timed:
                            spent += time.perf_counter() - started
                        yield _streamed(out, body.end_of_stream, recorded=action.recorded)
                        continue
                elif kind == "response_trailers" and exchange.duplex:
                    # Trailers end the body instead of end_of_stream: the last bytes, then the
                    # trailers' answer (ProcessingMode.FULL_DUPLEX_STREAMED).
                    final = exchange.on_response_body(b"", True)
                    if isinstance(final, Continue):
                        yield _streamed(final.body or b"", False, recorded=final.recorded)
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
                    continue
                elif kind == "request_headers":
                    message = request.request_headers
                    action = await exchange.on_request_headers(
                        _headers(message), message.end_of_stream, _identity(request)
                    )
                    if not isinstance(action, Reply):
                        response = _open_response(action, request, exchange.streams)
                        if timed:
                            spent += time.perf_counter() - started
                        yield response
                        continue
                elif kind == "request_body":
                    action = await exchange.on_request_body(request.request_body.body)
                elif kind == "response_headers":
                    headers = _headers(request.response_headers)
                    status = int(headers.get(":status") or 0)
                    if exchange.chained:
                        action = exchange.on_response_headers(status, headers, _attempt_answer(request))
                    else:
                        action = exchange.on_response_headers(status, headers)
                else:
                    action = Continue()
                response = _to_response(kind or "", action)
                if timed:
                    spent += time.perf_counter() - started
                yield response
        finally:
            inbox.close()
            exchange.on_close()
            telemetry.stream_closed()
            if timed:
                telemetry.exchange_seconds("request", spent)
            if span is not None and exchange.row is not None:
                # A stream with no row (only a local reply's response headers, ext_authz having
                # refused) exports nothing.
                span.finish_row(exchange.row)

    async def _attempt(
        self, first: ep.ProcessingRequest, inbox: _Inbox
    ) -> AsyncIterator[ep.ProcessingResponse]:
        """Serve one attempt of a failover chain (authz.gateway.attempt): its request headers, then
        its body when the cluster sends it. Nothing of the response comes here."""
        telemetry = self._telemetry
        timed = telemetry.enabled
        started = time.perf_counter() if timed else 0.0
        upstream, number = _attempted(first)
        attempt = Attempt(self._deps, number)
        message = first.request_headers
        action = await attempt.on_request_headers(
            _headers(message),
            message.end_of_stream,
            _identity(first),
            upstream,
            first.protocol_config.request_body_mode == _MODE.BUFFERED,
        )
        spent = time.perf_counter() - started if timed else 0.0
        try:
            yield _attempt_response("request_headers", action, skip_body=attempt.skips_body)
            while (request := await inbox.next()) is not None:
                if isinstance(request, _Tick):
                    continue
                started = time.perf_counter() if timed else 0.0
                kind = request.WhichOneof("request") or ""
                if kind == "request_body":
                    action = await attempt.on_request_body(request.request_body.body)
                    response = _attempt_response(kind, action)
                else:
                    response = _UNCHANGED.get(kind) or ep.ProcessingResponse()
                if timed:
                    spent += time.perf_counter() - started
                yield response
        finally:
            if timed:
                telemetry.exchange_seconds("attempt", spent)


class _Tick:
    """A keep-alive may be due: what :class:`_Inbox` hands out when its timer fires."""


_TICK = _Tick()
_END = object()


class _Inbox:
    """One stream's request messages, and in duplex mode keep-alive ticks between them.

    Until :meth:`wake_at` is first given a deadline, messages are read straight from the stream
    (one await per message, nothing else). From then on a task reads them into a queue and a timer
    puts a tick in the same queue, so waiting costs no task per message and a read is never
    cancelled (cancelling one could lose a message). A timer that fires before the current deadline
    (the deadline moved on since it was set) yields a tick the exchange finds not due; the next
    :meth:`wake_at` sets it again.
    """

    __slots__ = ("_due", "_queue", "_reader", "_requests", "_timer")

    def __init__(self, requests: AsyncIterator[ep.ProcessingRequest]) -> None:
        self._requests = requests.__aiter__()
        self._queue: asyncio.Queue[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None

    @property
    def waking(self) -> bool:
        """Whether a timer is set."""
        return self._timer is not None

    async def next(self) -> ep.ProcessingRequest | _Tick | None:
        """The next message, a tick, or None at the end of the stream."""
        if self._queue is None:
            try:
                return await self._requests.__anext__()
            except StopAsyncIteration:
                return None
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item  # a request or a tick, as queued (the queue holds Any)

    def wake_at(self, deadline: float | None, now: float) -> None:
        """Tick at ``deadline`` (None: never); ``now`` is on the deadline's clock."""
        if deadline is None:
            self._cancel_timer()
            return
        if self._timer is not None and self._due is not None and self._due <= deadline:
            return  # the timer set fires first; its tick sets the next one
        self._cancel_timer()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._reader = asyncio.ensure_future(self._read(self._queue))
        self._due = deadline
        self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - now), self._tick)

    def close(self) -> None:
        """Stop the timer and the reading task."""
        self._cancel_timer()
        if self._reader is not None:
            self._reader.cancel()

    def _tick(self) -> None:
        self._timer = self._due = None
        assert self._queue is not None
        self._queue.put_nowait(_TICK)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._due = None

    async def _read(self, queue: asyncio.Queue[Any]) -> None:
        try:
            async for request in self._requests:
                queue.put_nowait(request)
        except Exception as exc:  # handed to the servicer, which fails the stream with it
            queue.put_nowait(exc)
            return
        queue.put_nowait(_END)


# Response flags (envoy.data.accesslog.v3.ResponseFlags) that say who ended a request.
_FLAG_NAMES = tuple(
    f.name for f in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields if f.name != "unauthorized_details"
)


def access_record(entry: accesslog_pb2.HTTPAccessLogEntry) -> AccessRecord:
    """One access-log entry as plain data."""
    common, request, response = entry.common_properties, entry.request, entry.response
    flags = common.response_flags
    ns = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
    identity = from_metadata({k: v.string_value for k, v in ns.fields.items()}) if ns is not None else None
    return AccessRecord(
        request_id=request.request_id,
        started_at=common.start_time.ToNanoseconds() / 1e9 if common.HasField("start_time") else 0.0,
        duration=common.duration.ToNanoseconds() / 1e9 if common.HasField("duration") else None,
        method=base_pb2.RequestMethod.Name(request.request_method),
        path=request.path,
        status=response.response_code.value,
        details=response.response_code_details,
        flags=frozenset(name for name in _FLAG_NAMES if getattr(flags, name)),
        request_bytes=request.request_body_bytes,
        response_bytes=response.response_body_bytes,
        headers=dict(request.request_headers),
        identity=identity,
        attempts=common.upstream_request_attempt_count,
    )


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's access-log service: a long-lived stream of entries for requests no row was written
    for (the access log's filter skips the rest)."""

    def __init__(self, handler: AccessLog) -> None:
        self._handler = handler

    def use(self, handler: AccessLog) -> None:
        """Hand the entries that arrive from now on to ``handler`` (a reload)."""
        self._handler = handler

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        """Hand every HTTP entry to the handler; the stream lasts as long as Envoy keeps it."""
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                try:
                    self._handler.handle(access_record(entry))
                except Exception:
                    # One odd entry must not end the stream and lose the ones behind it.
                    log.exception("access-log entry %s could not be handled", entry.request.request_id)
        return als_pb2.StreamAccessLogsResponse()


def add_servicers(
    server: grpc.aio.Server,
    authorization: AuthorizationServicer,
    processor: ExternalProcessorServicer,
    access_log: AccessLogServicer,
) -> None:
    """Register the servicers on ``server`` (Envoy's generated registration functions stay here)."""
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authorization, server)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_log, server)
