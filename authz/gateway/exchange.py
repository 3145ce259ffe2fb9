"""One request's ext_proc messages, as a state machine over plain data.

One blocking ext_proc filter sees each inference request (docs/architecture.md counts the
messages per route): the request headers (and the buffered body when the translator rewrites it
or the upstream signs over it), then the response headers and the response body, whole for
errors and non-streaming answers, chunk by chunk for streams. Because the filter is blocking,
no byte reaches the client before the meter has counted it: usage cannot fall behind the relay.

A Messages-format request names its model in the body, so it is admitted here, when the body
arrives and before anything is sent upstream: the body is read once (:mod:`authz.translate.messages`),
the model checked against the policy ext_authz chose (:func:`authz.gateway.policy.check_model`) and
mapped to the upstream's id (:mod:`authz.translate.models`); a refusal is a 400 and a ``denied``
row. ``GET /v1/models`` is answered here from the same data, with no upstream call. A translator
that writes its body on its own schedule (Bedrock's stream becoming SSE, with keep-alives) runs the
response in ext_proc's FULL_DUPLEX_STREAMED mode, and the servicer asks :meth:`Exchange.on_ping`
when the translator's deadline passes with nothing from Envoy.

The exchange asks the translator for the upstream request, the backend for its credentials, and
writes exactly one usage row per request: when the response ends, when the upstream fails, or
when the stream closes early (with estimates, and the row says so).

A request several upstreams may serve (its identity carries a failover chain) is sent on unchanged:
Envoy tries the chain's upstreams in turn and the ``gateway.attempt`` upstream filter prepares each
try (:mod:`authz.gateway.attempt`). The answer names the upstream it is from and how many were
tried (headers the failover cluster's upstream filter sets from Envoy's own records, removed here),
and only then is the translator for that upstream's kind built: metering and translating the answer
depend on it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from authz.billing.accounting import usage_row
from authz.billing.pricing import PriceBook
from authz.configtypes import Policy
from authz.envoy.names import ANSWERED_HEADER, ATTEMPTS_HEADER
from authz.gateway.policy import check_model
from authz.gateway.prepare import Prepared, messages_identity, prepare
from authz.identity import RequestIdentity
from authz.store.usagerow import UsageRow
from authz.translate import models
from authz.translate.base import TranslateOptions, Translator
from authz.translate.envelope import ErrorReply, error_reply
from authz.translate.messages import FORMAT as MESSAGES
from authz.translate.messages import InvalidRequest, MessagesRequest, query_params, read_request
from authz.translate.registry import messages_translator, translator_for
from backends.base import Upstream
from backends.jsonbody import JsonMeter
from backends.kinds import KINDS
from backends.usage import MeterResult

log = logging.getLogger("authz.gateway.exchange")


@dataclass(frozen=True, slots=True)
class Continue:
    """Let the message through, with header changes, a replacement body, whether the response
    body must now arrive whole (``mode_override`` to BUFFERED) or be written by the exchange
    (``duplex``: FULL_DUPLEX_STREAMED), and whether the request's usage row was written (Envoy's
    access log then skips it)."""

    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None
    buffer_response_body: bool = False
    duplex: bool = False
    recorded: bool = False


@dataclass(frozen=True, slots=True)
class AttemptAnswer:
    """An attempt of a failover chain that answered the client itself (it could not prepare the
    request for ``upstream``): what its usage row says (the ``gateway.attempt`` metadata), and which
    attempt it was."""

    upstream: str
    outcome: str
    reason: str
    attempts: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """Stop and answer the client with this reply instead (``recorded``: as for Continue)."""

    reply: ErrorReply
    recorded: bool = False


Action = Continue | Reply

CONTINUE = Continue()
RECORDED = Continue(recorded=True)


@dataclass
class Deps:
    """What an exchange needs from the process: upstreams, prices, the ledger and a clock; for
    Messages-format requests, the policies by name, the model ids of each upstream, and the
    translators' options (whose clock times the keep-alives)."""

    upstreams: Mapping[str, Upstream]
    prices: PriceBook
    record: Callable[[UsageRow], None]
    clock: Callable[[], float] = time.time
    policies: Mapping[str, Policy] = field(default_factory=dict)
    models: models.ModelResolver = field(default_factory=lambda: models.ModelResolver(()))
    translate: TranslateOptions = field(default_factory=TranslateOptions)


def outcome_of(result: MeterResult) -> tuple[str, str | None]:
    """``(outcome, reason)`` for a response body that ended: complete, or why not."""
    if result.malformed:
        return "upstream_error", f"malformed upstream response: {result.malformed}"
    if result.error_type:
        return "upstream_error", f"in-stream {result.error_type}: {result.error_message or ''}".rstrip()
    if result.complete:
        return "complete", None
    return "upstream_error", "the response ended before its final event"


class Exchange:
    """Handles one request's ext_proc messages."""

    __slots__ = (
        "_attempts",
        "_awaiting_body",
        "_chained",
        "_deps",
        "_duplex",
        "_first_byte_at",
        "_headers",
        "_identity",
        "_request",
        "_route_streams",
        "_sent",
        "_status",
        "_translator",
        "_upstream",
        "_written",
        "row",
    )

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._identity: RequestIdentity | None = None
        self._upstream: Upstream | None = None
        self._translator: Translator | None = None
        self._headers: Mapping[str, str] = {}
        self._status: int | None = None
        self._first_byte_at: float | None = None
        self._sent = False
        self._written = False
        self._awaiting_body = False
        self._route_streams = False
        self._duplex = False
        self._chained = False
        self._request: MessagesRequest | None = None
        self._attempts: int | None = None
        self.row: UsageRow | None = None
        """The usage row this exchange recorded, once it has (at most one)."""

    @property
    def streams(self) -> bool:
        """Whether the response body starts chunk by chunk (STREAMED) rather than whole: streams,
        and Messages calls until their response headers say otherwise."""
        return self._route_streams

    @property
    def chained(self) -> bool:
        """Whether the request has a failover chain: Envoy tries its upstreams in turn, and the
        response says which one answered."""
        return self._chained

    @property
    def duplex(self) -> bool:
        """Whether the response body runs in FULL_DUPLEX_STREAMED mode: every body message must be
        answered with the bytes the exchange writes (none are relayed as they came)."""
        return self._duplex

    async def on_request_headers(
        self, headers: Mapping[str, str], end_of_stream: bool, identity: RequestIdentity | None
    ) -> Action:
        """Remember the request; prepare it now unless the body must be seen first."""
        if identity is None:
            # ext_authz attaches the identity to every allowed request; without it nobody knows who
            # is calling, so fail closed (and there is nobody to write a row for).
            log.error("ext_proc request without the ext_authz context: refused")
            self._written = True
            return Reply(error_reply("api_error", "Gateway misconfiguration: missing request context."))
        self._identity = identity
        self._headers = headers
        self._chained = bool(identity.chain)
        # The response body mode the request-headers answer sets (authz/gateway/servicer.py):
        # STREAMED for streams and for Messages calls (a stream or not, as the body will say).
        self._route_streams = identity.streaming or (
            identity.client_format == MESSAGES and identity.operation == "invoke"
        )
        upstream = self._deps.upstreams.get(identity.upstream or "")
        if identity.client_format == MESSAGES and upstream is not None:
            self._upstream = upstream
            if identity.operation == "list_models":
                return self._list_models(upstream)
            self._awaiting_body = True
            return CONTINUE if not end_of_stream else await self.on_request_body(b"")
        translator = translator_for(identity, upstream) if upstream is not None else None
        if upstream is None or translator is None:
            return self._misconfigured()
        if self._chained:
            # Each attempt is prepared by gateway.attempt; the answer's upstream picks the translator.
            self._sent = True
            return CONTINUE
        self._upstream, self._translator = upstream, translator
        if not end_of_stream and (translator.needs_request_body or KINDS[upstream.kind].signs_body):
            return CONTINUE
        return await self._prepare(b"")

    def _misconfigured(self) -> Reply:
        # ext_authz and this process disagree about the configuration (e.g. mid-rollout).
        identity = self._identity
        assert identity is not None
        reply = error_reply("api_error", "The gateway is not configured for this upstream.", status=502)
        self._write(reply.status, "error", f"no translator for upstream {identity.upstream!r}")
        return Reply(reply, recorded=True)

    async def on_request_body(self, body: bytes) -> Action:
        """The whole request body arrived: prepare the upstream request over its exact bytes."""
        if self._awaiting_body:
            self._awaiting_body = False
            refused = self._admit(body)
            if refused is not None:
                return refused
            if self._chained:
                self._sent = True
                return CONTINUE
        if self._translator is None:
            if self._written:
                return CONTINUE
            self._written = True
            return Reply(error_reply("api_error", "Gateway misconfiguration: body before headers."))
        return await self._prepare(body)

    def _admit(self, body: bytes) -> Reply | None:
        """Read a Messages body, check its model and map it to the upstream's id (to every
        upstream's of a failover chain); build the translator. A refusal is the reply (and its row
        is written)."""
        identity, upstream, deps = self._identity, self._upstream, self._deps
        assert identity is not None and upstream is not None
        try:
            request = read_request(body, count_tokens=identity.operation == "count_tokens")
        except InvalidRequest as exc:
            reply = error_reply("invalid_request_error", str(exc))
            return self._refuse(reply, f"invalid request body: {exc}")
        requested = request.model
        identity = self._identity = replace(
            identity, requested_model=requested, model=models.canonical(requested)
        )
        policy = deps.policies.get(identity.policy or "")
        caller = identity.caller
        reason = (
            check_model(policy, caller.models if caller else None, identity.model or requested)
            if policy is not None
            else "no policy admits this user"
        )
        if reason is not None:
            return self._refuse(error_reply("invalid_request_error", reason), f"policy: {reason}")
        # Any upstream of a chain may serve the request, so each must have an id for the model.
        names = [member.upstream for member in identity.chain] or [upstream.name]
        for name in names:
            resolved = deps.models.resolve(name, requested)
            if resolved is None:
                key = models.map_key(name, requested)
                message = (
                    f"Model {requested} has no id on this gateway's upstream;"
                    f" an operator can map it with {key}."
                )
                return self._refuse(error_reply("invalid_request_error", message), f"unmapped model: {key}")
            if name == upstream.name:
                identity = self._identity = messages_identity(identity, request, resolved)
        if self._chained:
            self._request = request  # the translator is built once the answering upstream is known
            return None
        translator = messages_translator(identity, upstream, request, deps.translate)
        if translator is None:
            return self._misconfigured()
        self._translator = translator
        return None

    def _refuse(self, reply: ErrorReply, reason: str, outcome: str = "denied") -> Reply:
        self._write(reply.status, outcome, reason)
        return Reply(reply, recorded=True)

    def _list_models(self, upstream: Upstream) -> Action:
        """``GET /v1/models``: the models the caller's policy allows that the upstream serves."""
        identity, deps = self._identity, self._deps
        assert identity is not None
        policy = deps.policies.get(identity.policy or "")
        token_models = identity.caller.models if identity.caller else None
        # A chain's request may be served by any of its upstreams: the models each of them serves.
        others = [set(deps.models.listed(member.upstream)) for member in identity.chain]
        allowed = [
            model
            for model in deps.models.listed(upstream.name)
            if policy is not None
            and check_model(policy, token_models, model.first_party) is None
            and all(model in served for served in others)
        ]
        page = models.models_page(allowed, query_params(identity.upstream_query))
        if isinstance(page, str):
            return self._refuse(error_reply("invalid_request_error", page), f"invalid query: {page}")
        body = json.dumps(page, separators=(",", ":")).encode()
        self._write(200, "complete", None)
        return Reply(ErrorReply(200, (("content-type", "application/json"),), body), recorded=True)

    async def _prepare(self, body: bytes) -> Action:
        identity, upstream, translator = self._identity, self._upstream, self._translator
        assert identity is not None and upstream is not None and translator is not None
        prepared = await prepare(identity, upstream, translator, self._headers, body)
        if not isinstance(prepared, Prepared):
            return self._refuse(prepared.reply, prepared.reason, prepared.outcome)
        self._sent = True
        return Continue(
            set_headers=prepared.set_headers, remove_headers=prepared.remove_headers, body=prepared.body
        )

    def on_response_headers(
        self, status: int, headers: Mapping[str, str], attempt: AttemptAnswer | None = None
    ) -> Action:
        """React to the upstream's status: errors are buffered to be rewritten. On a failover
        route, first learn which upstream answered (``attempt``: what the attempt filter said when
        it answered itself instead)."""
        self._first_byte_at = self._deps.clock()
        self._status = status
        self._headers = headers
        failover: tuple[str, ...] = ()
        if self._chained:
            failover = (ANSWERED_HEADER, ATTEMPTS_HEADER)
            chosen = self._answered(headers, attempt)
            if chosen is not None:
                return chosen
        if self._translator is None:
            return Continue(remove_headers=failover) if failover else CONTINUE
        start = self._translator.response_headers(status, headers)
        # Non-streaming routes buffer their bodies by configuration; a streaming route switches to
        # BUFFERED for an error (or a whole answer) it must see whole, or to FULL_DUPLEX_STREAMED
        # for a translator that writes on its own schedule.
        buffer = start.buffer and self._route_streams
        self._duplex = start.duplex and not start.buffer and self._route_streams
        return Continue(
            set_headers=start.set_headers,
            remove_headers=(*start.remove_headers, *failover),
            buffer_response_body=buffer,
            duplex=self._duplex,
        )

    def _answered(self, headers: Mapping[str, str], attempt: AttemptAnswer | None) -> Action | None:
        """Take the upstream that answered a failover request as the request's (its kind, model id
        and pricing) and build its translator; an action when the response is not the upstream's
        to translate (the attempt answered itself, or the answer names no upstream of the chain)."""
        identity, deps = self._identity, self._deps
        assert identity is not None
        count = headers.get(ATTEMPTS_HEADER, "")
        self._attempts = int(count) if count.isdigit() and len(count) < 4 else None
        name = headers.get(ANSWERED_HEADER)
        if name is None:
            if attempt is not None:
                # The attempt's own answer (it could not prepare the request) names its upstream
                # and its number; Envoy sends it on as it is.
                name, self._attempts = attempt.upstream, attempt.attempts
            else:
                # No upstream answered: Envoy's own reply once every attempt failed without an
                # answer (refused, reset), each failure sending it to the next upstream, so the last
                # one failed last. (Every upstream answer carries the header: the cluster's
                # upstream filter sets it.)
                name = identity.chain[-1].upstream
                self._attempts = len(identity.chain)
        answered = identity.answered_by(name)
        upstream = deps.upstreams.get(name)
        if answered is None or upstream is None:
            # Set by the failover cluster from its endpoint's metadata: Envoy and the services
            # disagree about the configuration. Fail closed.
            log.error(
                "request %s: failover answer names %r, no upstream of its chain", identity.request_id, name
            )
            return self._fail(f"the answer names {name!r}, no upstream of the request's chain")
        self._identity, self._upstream = answered, upstream
        request = self._request
        if request is not None:
            resolved = deps.models.resolve(name, request.model)
            if resolved is None:
                return self._fail(f"no id for {request.model} on {name}")
            self._identity = messages_identity(answered, request, resolved)
        if attempt is not None and attempt.upstream == name:
            # The attempt could not prepare the request and answered itself: relay its answer.
            self._write(self._status or 0, attempt.outcome, attempt.reason)
            return Continue(remove_headers=(ANSWERED_HEADER, ATTEMPTS_HEADER), recorded=True)
        if request is not None:
            self._translator = messages_translator(self._identity, upstream, request, deps.translate)
        else:
            self._translator = translator_for(answered, upstream)
        if self._translator is None:
            return self._fail(f"no translator for upstream {name!r}")
        return None

    def _fail(self, reason: str) -> Reply:
        reply = error_reply("api_error", "The gateway is not configured for this upstream.", status=502)
        self._write(reply.status, "error", reason)
        return Reply(reply, recorded=True)

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        """Rewrite an upstream error, or relay (and meter) a chunk of a successful answer."""
        translator, identity = self._translator, self._identity
        if translator is None or identity is None or self._written:
            return CONTINUE
        status = self._status or 0
        if status >= 400:
            return self._upstream_error(status, chunk)
        out = translator.response_chunk(chunk, end_of_stream)
        if out is None and self._duplex:
            out = chunk  # Envoy relays nothing itself in duplex mode: unchanged means resent
        if not end_of_stream:
            return CONTINUE if out is None else Continue(body=out)
        result = translator.usage()
        if identity.operation == "count_tokens" and not result.malformed:
            counted = result.usage.input_tokens
            self._write(status, "complete", f"counted {counted} input tokens", MeterResult(complete=True))
        else:
            outcome, reason = outcome_of(result)
            self._write(status, outcome, reason, result)
        return RECORDED if out is None else Continue(body=out, recorded=True)

    def ping_deadline(self) -> float | None:
        """When (on ``deps.translate.clock``) :meth:`on_ping` has something to write if no message
        arrives before; None when nothing is waited for."""
        if not self._duplex or self._written or self._translator is None:
            return None
        return self._translator.next_ping()

    def on_ping(self) -> Continue | None:
        """Nothing came from Envoy by the deadline: the keep-alive to write, if one is due."""
        if not self._duplex or self._written or self._translator is None:
            return None
        out = self._translator.ping()
        return Continue(body=out) if out else None

    def _upstream_error(self, status: int, body: bytes) -> Action:
        translator, identity = self._translator, self._identity
        assert translator is not None and identity is not None
        mapped = translator.error(status, body, self._headers)
        if mapped.reply is not None:
            # Operator-only detail: the upstream text may name accounts and roles.
            log.warning(
                "request %s: upstream %s answered %s: %s",
                identity.request_id,
                identity.upstream,
                status,
                body[:2000].decode("utf-8", "replace"),
            )
        errors = JsonMeter()
        errors.feed(body)
        client_status = mapped.reply.status if mapped.reply else status
        self._write(client_status, "upstream_error", mapped.summary, errors.result())
        return Reply(mapped.reply, recorded=True) if mapped.reply else RECORDED

    def on_close(self) -> None:
        """The stream ended: if nobody accounted for the request yet, record what happened.

        A request the upstream received but never answered still cost its prompt, so the input is
        estimated from the body size; a stream cut mid-way keeps what was counted and estimates
        the output from what was relayed.
        """
        if self._identity is None or self._written:
            return
        if self._status is None:
            why = "closed before the upstream answered" if self._sent else "closed before it was sent"
            self._write(499, "client_aborted", why, None, estimate_input=self._sent, cut=True)
            return
        result = self._translator.usage() if self._translator is not None else None
        if result is not None and result.malformed:
            # Clients stop reading at a bad frame, so the cut is most likely the upstream's doing.
            outcome, reason = outcome_of(result)
            self._write(self._status, outcome, reason, result, estimate_input=True, cut=True)
            return
        # Who cut it (the client, the upstream, or Envoy giving up on this service) is known only to
        # Envoy: its access-log report of the request merges into this row (merge_rows).
        self._write(
            self._status, "client_aborted", "stream cut before the end", result, estimate_input=True, cut=True
        )

    def _write(
        self,
        status: int,
        outcome: str,
        reason: str | None,
        meter: MeterResult | None = None,
        *,
        estimate_input: bool = False,
        cut: bool = False,
    ) -> None:
        identity = self._identity
        if identity is None or self._written:
            return
        self._written = True
        deps = self._deps
        row = self.row = usage_row(
            identity,
            status=status,
            outcome=outcome,
            reason=reason,
            prices=deps.prices,
            ended_at=deps.clock(),
            meter=meter,
            first_byte_at=self._first_byte_at,
            estimate_input=estimate_input,
            recorded_by="ext_proc_cut" if cut else "ext_proc",
            attempts=self._attempt_count(),
        )
        deps.record(row)

    def _attempt_count(self) -> int | None:
        """How many upstreams were tried: as a failover answer said; else one once the request
        was sent to its one upstream, none before; unknown for a chain that never answered."""
        if self._attempts is not None:
            return self._attempts
        if not self._sent:
            return 0
        return None if self._chained else 1
