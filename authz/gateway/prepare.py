"""The upstream request for one request and one upstream: translated, then signed.

Shared by the exchange (a request one upstream serves, prepared by ``gateway.ext_proc``) and an
attempt (each try of a failover chain, prepared by the ``gateway.attempt`` upstream filter for the
upstream Envoy picked). Also what a Messages request becomes once its body was read, for either.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from authz.identity import RequestIdentity
from authz.translate import models
from authz.translate.base import Refused, Translator
from authz.translate.envelope import ErrorReply, error_reply
from authz.translate.messages import MessagesRequest
from backends.base import Caller, Upstream
from backends.errors import BackendError

log = logging.getLogger("authz.gateway.exchange")


@dataclass(frozen=True, slots=True)
class Prepared:
    """The upstream request: headers to set (``:authority``, ``:path``, the credential, ...) and
    remove, and the body to send instead of the client's (None: the client's)."""

    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    body: bytes | None


@dataclass(frozen=True, slots=True)
class Unprepared:
    """The request cannot be sent: answer the client with ``reply``; the usage row says
    ``outcome`` and ``reason``."""

    reply: ErrorReply
    outcome: str
    reason: str


async def prepare(
    identity: RequestIdentity,
    upstream: Upstream,
    translator: Translator,
    headers: Mapping[str, str],
    body: bytes,
) -> Prepared | Unprepared:
    """Ask the translator for the upstream request and the upstream for its credential over the
    exact bytes sent (SigV4 signs the body)."""
    try:
        request = translator.request(headers, body)
        final = request.body if request.body is not None else body
        content_type = next(
            (value for name, value in request.set_headers if name == "content-type"),
            headers.get("content-type"),
        )
        caller = identity.caller
        assert caller is not None
        signed = await upstream.sign(
            method=headers.get(":method", "POST"),
            path=request.path,
            headers={"content-type": content_type} if content_type else {},
            body=final,
            caller=Caller(sub=caller.sub, email=caller.email, groups=caller.groups),
        )
    except Refused as exc:
        return Unprepared(exc.reply, exc.outcome, exc.reason)
    except BackendError as exc:
        log.error("request %s: cannot prepare upstream %s: %s", identity.request_id, upstream.name, exc)
        reply = error_reply("api_error", "The gateway could not prepare the upstream request.", status=502)
        return Unprepared(reply, "error", f"upstream preparation: {exc}")
    sets = [(":authority", signed.authority), (":path", signed.path), *sorted(signed.headers.items())]
    sets.extend(request.set_headers)
    if request.body is not None:
        sets.append(("content-length", str(len(request.body))))
    return Prepared(tuple(sets), request.remove_headers, request.body)


def messages_identity(
    identity: RequestIdentity, request: MessagesRequest, resolved: models.Resolved | None = None
) -> RequestIdentity:
    """The identity of a Messages request whose body says which model and whether to stream, and,
    with ``resolved``, the id its upstream receives for it and that id's pricing."""
    operation = "stream" if identity.operation == "invoke" and request.stream else identity.operation
    identity = replace(
        identity,
        requested_model=request.model,
        model=models.canonical(request.model),
        operation=operation,
        streaming=operation == "stream",
    )
    if resolved is not None:
        identity = replace(identity, upstream_model=resolved.upstream_id, regional=resolved.regional)
    return identity
