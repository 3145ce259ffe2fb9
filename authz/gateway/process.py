"""The ext_proc logic for one HTTP request, as plain state machines over plain data.

Two Envoy ext_proc filters talk to this service (see docs/architecture.md):

``gateway.sign`` (blocking) sees the request headers and the buffered body, and answers with the
upstream's ``:authority``, ``:path`` and credential headers. It sees the response headers too: for
errors and non-streaming answers it asks Envoy for the buffered body (``mode_override``) so it can
hide upstream error text and count usage; for successful streams it lets the body flow untouched.

``gateway.meter`` (observability mode: Envoy sends copies and never waits) sees the response of
streaming routes chunk by chunk and counts tokens as they pass, writing the row at the end of the
stream or when the stream is cut.

Exactly one of the two writes each request's usage row: the meter for 2xx streaming responses, the
sign handler for everything else. Both derive that from the same facts (status and route), so they
agree without talking to each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from authz.billing.accounting import finished_row
from authz.billing.pricing import PriceBook
from authz.billing.usagerow import UsageRow
from authz.gateway.context import RequestContext
from authz.gateway.envelope import ErrorReply, error_reply
from authz.gateway.upstream_errors import map_upstream_error
from backends.base import BackendError, Caller, UnsupportedPathError, Upstream
from backends.eventstream import EventStreamMeter
from backends.jsonbody import JsonMeter
from backends.sse import SseMeter
from backends.usage import Meter, MeterResult

log = logging.getLogger("authz.gateway.process")

# Hop-by-hop and encoding headers the upstream request must not carry: the meters read the
# response bytes, so the upstream must answer uncompressed.
_REMOVE_UPSTREAM = ("accept-encoding",)


@dataclass(frozen=True, slots=True)
class Continue:
    """Let the message through, with header changes and an optional response-body mode switch."""

    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    buffer_response_body: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """Stop and answer the client with this reply instead."""

    reply: ErrorReply


Action = Continue | Reply

CONTINUE = Continue()


@dataclass
class Deps:
    """What the handlers need from the process: upstreams, prices, the ledger and a clock."""

    upstreams: Mapping[str, Upstream]
    model_maps: Mapping[str, Mapping[str, str]]
    prices: PriceBook
    record: Callable[[UsageRow], None]
    clock: Callable[[], float] = time.time


def _upstream_model(deps: Deps, ctx: RequestContext) -> str | None:
    mapped = deps.model_maps.get(ctx.upstream, {}).get(ctx.model or "")
    return mapped or ctx.model_raw


def meter_for(ctx: RequestContext) -> Meter:
    """The usage parser for this request's response format."""
    if ctx.streaming:
        return EventStreamMeter() if ctx.ingress_format == "bedrock" else SseMeter()
    return JsonMeter()


@dataclass
class SignHandler:
    """Handles the ``gateway.sign`` filter's messages for one request."""

    deps: Deps
    ctx: RequestContext | None = None
    method: str = "POST"
    path: str = ""
    content_type: str | None = None
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    first_byte_at: float | None = None
    row_written: bool = False

    async def on_request_headers(
        self, headers: Mapping[str, str], end_of_stream: bool, ctx: RequestContext | None
    ) -> Action:
        """Remember the request; sign now unless the upstream signs over the body that follows
        (Bedrock's SigV4). Vertex routes and the GET never send the body here at all."""
        if ctx is None:
            # ext_authz always attaches the context to an allowed request; without it we cannot
            # know who is calling, so fail closed.
            self.row_written = True
            return Reply(error_reply("api_error", "Gateway misconfiguration: missing request context."))
        self.ctx = ctx
        self.method = headers.get(":method", "POST")
        self.path = headers.get(":path", "")
        self.content_type = headers.get("content-type")
        upstream = self.deps.upstreams.get(ctx.upstream)
        if end_of_stream or upstream is None or upstream.kind != "bedrock":
            return await self._sign(b"")
        return CONTINUE

    async def on_request_body(self, body: bytes) -> Action:
        """Sign the final upstream request over its exact bytes."""
        if self.ctx is None:
            self.row_written = True
            return Reply(error_reply("api_error", "Gateway misconfiguration: body before headers."))
        return await self._sign(body)

    async def _sign(self, body: bytes) -> Action:
        ctx = self.ctx
        assert ctx is not None
        upstream = self.deps.upstreams.get(ctx.upstream)
        if upstream is None:
            # ext_authz and this process disagree about the configuration (e.g. mid-rollout).
            reply = error_reply("api_error", "The gateway is not configured for this upstream.", status=502)
            self._write(reply.status, "error", f"unknown upstream {ctx.upstream!r}", None)
            return Reply(reply)
        headers = {"content-type": self.content_type} if self.content_type else {}
        try:
            path = upstream.upstream_path(self.path, ctx.model or "")
        except UnsupportedPathError as exc:
            reply = error_reply("not_found_error", f"{ctx.upstream} does not serve this route.")
            self._write(reply.status, "error", f"route: {exc}", None)
            return Reply(reply)
        try:
            signed = await upstream.sign(
                method=self.method,
                path=path,
                headers=headers,
                body=body,
                caller=Caller(sub=ctx.sub, email=ctx.email, groups=ctx.groups),
            )
        except BackendError as exc:
            log.error("request %s: cannot prepare upstream %s: %s", ctx.request_id, ctx.upstream, exc)
            reply = error_reply(
                "api_error", "The gateway could not obtain credentials for the upstream.", status=502
            )
            self._write(reply.status, "error", f"credentials: {exc}", None)
            return Reply(reply)
        sets = [(":authority", signed.authority), (":path", signed.path)]
        sets.extend(sorted(signed.headers.items()))
        return Continue(set_headers=tuple(sets), remove_headers=_REMOVE_UPSTREAM)

    def on_response_headers(self, headers: Mapping[str, str]) -> Action:
        """Pick who accounts for this response and whether its body must be buffered."""
        self.first_byte_at = self.deps.clock()
        self.status = int(headers.get(":status", "0") or 0)
        self.response_headers = {k: v for k, v in headers.items() if not k.startswith(":")}
        ctx = self.ctx
        if ctx is None:
            return CONTINUE
        if 200 <= self.status < 300 and ctx.streaming:
            self.row_written = True  # the meter owns this row
            return CONTINUE
        return Continue(buffer_response_body=True)

    def on_response_body(self, body: bytes) -> Action:
        """Count usage of a whole JSON answer, or rewrite an upstream error for the client."""
        ctx = self.ctx
        status = self.status or 0
        if ctx is None or self.row_written:
            return CONTINUE
        if status >= 400:
            mapped = map_upstream_error(status, body, self.response_headers)
            if mapped.reply is not None:
                # Operator-only detail: the upstream text may name accounts and roles.
                log.warning(
                    "request %s: upstream %s answered %s: %s",
                    ctx.request_id,
                    ctx.upstream,
                    status,
                    body[:2000].decode("utf-8", "replace"),
                )
            errors = JsonMeter()
            errors.feed(body)
            client_status = mapped.reply.status if mapped.reply else status
            self._write(client_status, "upstream_error", mapped.summary, errors.result())
            return Reply(mapped.reply) if mapped.reply else CONTINUE
        meter = meter_for(ctx)
        meter.feed(body)
        result = meter.result()
        if result.malformed:
            self._write(status, "upstream_error", f"malformed upstream body: {result.malformed}", result)
        elif ctx.operation == "count_tokens":
            counted = result.usage.input_tokens
            self._write(status, "complete", f"counted {counted} input tokens", MeterResult(complete=True))
        else:
            self._write(status, "complete", None, result)
        return CONTINUE

    def on_close(self) -> None:
        """The stream ended: if nobody accounted for the request yet, record what happened."""
        if self.ctx is None or self.row_written:
            return
        if self.status is None:
            self._write(499, "client_aborted", "closed before the upstream answered", None)
        else:
            self._write(self.status, "client_aborted", "closed before the response was complete", None)

    def _write(self, status: int, outcome: str, reason: str | None, meter: MeterResult | None) -> None:
        ctx = self.ctx
        if ctx is None or self.row_written:
            return
        self.row_written = True
        self.deps.record(
            finished_row(
                ctx,
                status=status,
                outcome=outcome,
                reason=reason,
                meter=meter,
                prices=self.deps.prices,
                upstream_model=_upstream_model(self.deps, ctx),
                ended_at=self.deps.clock(),
                first_byte_at=self.first_byte_at,
            )
        )


@dataclass
class MeterHandler:
    """Handles the ``gateway.meter`` (observability) filter's messages for one streaming request."""

    deps: Deps
    ctx: RequestContext | None = None
    status: int = 0
    meter: Meter | None = None
    first_byte_at: float | None = None
    done: bool = False

    def on_response_headers(self, headers: Mapping[str, str], ctx: RequestContext | None) -> None:
        """Start counting if this is a successful stream (errors belong to the sign handler)."""
        self.first_byte_at = self.deps.clock()
        self.ctx = ctx
        self.status = int(headers.get(":status", "0") or 0)
        if ctx is not None and 200 <= self.status < 300 and ctx.streaming:
            self.meter = meter_for(ctx)

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        """Feed a relayed chunk; at the end of the stream, write the row."""
        if self.meter is None or self.done:
            return
        if chunk:
            self.meter.feed(chunk)
        if end_of_stream:
            result = self.meter.result()
            if result.malformed:
                self._write("upstream_error", f"malformed upstream stream: {result.malformed}", result)
            elif result.error_type:
                self._write(
                    "upstream_error", f"in-stream {result.error_type}: {result.error_message or ''}", result
                )
            elif result.complete:
                self._write("complete", None, result)
            else:
                self._write("upstream_error", "stream ended before message_stop", result)

    def on_close(self) -> None:
        """Envoy closed the stream before the end: the client went away (or the upstream reset)."""
        if self.meter is None or self.done:
            return
        result = self.meter.result()
        if result.malformed:
            # Clients stop reading at a bad frame, so the cut is most likely the upstream's doing.
            self._write("upstream_error", f"malformed upstream stream: {result.malformed}", result)
        else:
            self._write("client_aborted", "stream cut before the end", result)

    def _write(self, outcome: str, reason: str | None, result: MeterResult) -> None:
        ctx = self.ctx
        assert ctx is not None
        self.done = True
        self.deps.record(
            finished_row(
                ctx,
                status=self.status,
                outcome=outcome,
                reason=reason,
                meter=result,
                prices=self.deps.prices,
                upstream_model=_upstream_model(self.deps, ctx),
                ended_at=self.deps.clock(),
                first_byte_at=self.first_byte_at,
            )
        )
