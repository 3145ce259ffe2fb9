"""One attempt of a failover chain, as a state machine over plain data.

A request several upstreams may serve goes to its failover cluster (:mod:`authz.envoy.failover`),
whose upstream filter ``gateway.attempt`` opens one ext_proc stream per attempt: Envoy runs a
cluster's upstream filters each time it tries an upstream. The stream carries the request headers
(and the body when the translator rewrites it or the upstream signs over it) with the upstream
Envoy picked for this attempt, read from the endpoint's metadata, which is the configuration's and
never anything the client or a cloud sent. The attempt translates and signs the request for that
upstream exactly as :class:`authz.gateway.exchange.Exchange` does for a request with one upstream.

It writes no usage row: a failed attempt leaves none, and the one row is written by the exchange
that sees the response Envoy finally relays. When it cannot prepare the request it answers the
client itself (Envoy does not retry an upstream filter's own answer) and says what happened in the
``gateway.attempt`` metadata, which the exchange reads for the row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from authz.gateway.exchange import Continue, Deps
from authz.gateway.prepare import Prepared, messages_identity, prepare
from authz.identity import RequestIdentity
from authz.translate.base import Translator
from authz.translate.envelope import ErrorReply, error_reply
from authz.translate.messages import FORMAT as MESSAGES
from authz.translate.messages import InvalidRequest, read_request
from authz.translate.registry import messages_translator, translator_for
from backends.base import Upstream
from backends.kinds import KINDS

log = logging.getLogger("authz.gateway.attempt")


@dataclass(frozen=True, slots=True)
class Answer:
    """The attempt answers the client with ``reply`` instead of reaching ``upstream``; the request's
    usage row says ``outcome`` and ``reason``, and that this was attempt number ``attempts``."""

    reply: ErrorReply
    upstream: str
    outcome: str
    reason: str
    attempts: int | None = None


AttemptAction = Continue | Answer

_WAIT = Continue()


class Attempt:
    """Handles one attempt's ext_proc messages."""

    __slots__ = ("_deps", "_headers", "_identity", "_number", "_skips_body", "_translator", "_upstream")

    def __init__(self, deps: Deps, number: int | None = None) -> None:
        """``number``: which attempt of the request this is, as Envoy counts them."""
        self._deps = deps
        self._number = number
        self._identity: RequestIdentity | None = None
        self._upstream: Upstream | None = None
        self._translator: Translator | None = None
        self._headers: Mapping[str, str] = {}
        self._skips_body = False

    @property
    def skips_body(self) -> bool:
        """Whether the request was prepared without its body, which Envoy need not send (the
        answer to the headers then switches the body off: ProcessingResponse.mode_override)."""
        return self._skips_body

    async def on_request_headers(
        self,
        headers: Mapping[str, str],
        end_of_stream: bool,
        identity: RequestIdentity | None,
        upstream: str,
        body_follows: bool,
    ) -> AttemptAction:
        """The attempt on ``upstream`` begins: prepare it now unless the body must be seen first
        (``body_follows``: the cluster sends the body unless this answer says otherwise)."""
        if identity is None:
            log.error("attempt on %r without the ext_authz context: refused", upstream)
            return self._fail(upstream, "no request context on the attempt")
        answered = identity.answered_by(upstream)
        target = self._deps.upstreams.get(upstream)
        if answered is None or target is None:
            # Envoy picked an upstream that is not the request's (the configuration changed under it).
            log.error("request %s: attempt on %r, no upstream of its chain", identity.request_id, upstream)
            return self._fail(upstream, f"attempt on {upstream!r}, no upstream of the request's chain")
        self._identity, self._upstream, self._headers = answered, target, headers
        if answered.client_format == MESSAGES:
            return _WAIT if not end_of_stream else await self.on_request_body(b"")
        translator = translator_for(answered, target)
        if translator is None:
            return self._fail(upstream, f"no translator for upstream {upstream!r}")
        self._translator = translator
        if not end_of_stream and body_follows:
            if translator.needs_request_body or KINDS[target.kind].signs_body:
                return _WAIT
            self._skips_body = True
        return await self._prepare(b"")

    async def on_request_body(self, body: bytes) -> AttemptAction:
        """The whole body arrived: for a Messages request, read it and map its model to this
        upstream's id (ext_proc admitted it before Envoy sent it on); prepare the request."""
        identity, upstream = self._identity, self._upstream
        if identity is None or upstream is None:
            return self._fail("", "request body before its headers")
        if self._translator is None:
            try:
                request = read_request(body, count_tokens=identity.operation == "count_tokens")
            except InvalidRequest as exc:
                return self._fail(upstream.name, f"the admitted body does not read: {exc}")
            resolved = self._deps.models.resolve(upstream.name, request.model)
            if resolved is None:
                return self._fail(upstream.name, f"no id for {request.model} on {upstream.name}")
            self._identity = messages_identity(identity, request, resolved)
            translator = messages_translator(self._identity, upstream, request, self._deps.translate)
            if translator is None:
                return self._fail(upstream.name, f"no translator for upstream {upstream.name!r}")
            self._translator = translator
        return await self._prepare(body)

    async def _prepare(self, body: bytes) -> AttemptAction:
        identity, upstream, translator = self._identity, self._upstream, self._translator
        assert identity is not None and upstream is not None and translator is not None
        prepared = await prepare(identity, upstream, translator, self._headers, body)
        if not isinstance(prepared, Prepared):
            return Answer(prepared.reply, upstream.name, prepared.outcome, prepared.reason, self._number)
        return Continue(
            set_headers=prepared.set_headers, remove_headers=prepared.remove_headers, body=prepared.body
        )

    def _fail(self, upstream: str, reason: str) -> Answer:
        reply = error_reply("api_error", "The gateway is not configured for this upstream.", status=502)
        return Answer(reply, upstream, "error", reason, self._number)
