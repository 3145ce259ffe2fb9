"""Turn an upstream's error response into what the client should see. Pure.

Upstream error text can leak account ids and role ARNs, so the operator gets it in the log and the
client gets a generic Anthropic envelope, except for the messages clients key their recovery on
(DESIGN.md, "Client contracts"): Anthropic-envelope 400/413 errors such as "prompt is too long",
and Bedrock's exact ``Input is too long.``, which pass through verbatim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from authz.translate.envelope import ErrorReply, error_reply

BEDROCK_TOO_LONG = "Input is too long."


@dataclass(frozen=True, slots=True)
class MappedError:
    """The reply for the client and a one-line summary for the usage row and the log."""

    reply: ErrorReply | None  # None: pass the upstream response through unchanged
    summary: str


def _message_of(body: bytes) -> tuple[str | None, str | None, bool]:
    """(error type, message, is an Anthropic envelope) from an Anthropic, Bedrock or Google error body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None, False
    if not isinstance(data, dict):
        return None, None, False
    err = data.get("error")
    if isinstance(err, dict):
        etype = err.get("type") or err.get("status")
        msg = err.get("message")
        # {"type":"error","error":{"type":...}}: Anthropic's own envelope (Vertex relays it as is).
        envelope = data.get("type") == "error" and isinstance(err.get("type"), str)
        return (str(etype) if etype else None, str(msg) if msg is not None else None, envelope)
    msg = data.get("message") or data.get("Message")
    return None, (str(msg) if msg is not None else None), False


def map_upstream_error(status: int, body: bytes, headers: dict[str, str]) -> MappedError:
    """Decide what the client sees for an upstream response with ``status >= 400``."""
    etype, message, is_envelope = _message_of(body)
    summary = f"upstream {status}" + (f" {etype}" if etype else "")
    if status in (400, 413):
        # An envelope's type need not end in "_error": a 413 carries "request_too_large".
        if is_envelope or message == BEDROCK_TOO_LONG:
            return MappedError(None, f"{summary}: {message}")
        if status == 413:
            reply = error_reply("request_too_large", "The upstream refused the request size.")
            return MappedError(reply, summary)
        return MappedError(
            error_reply("invalid_request_error", "The upstream rejected the request."), summary
        )
    if status in (401, 403):
        # The upstream refused the gateway's own credential: the client did nothing wrong.
        return MappedError(
            error_reply(
                "api_error",
                "The upstream rejected the gateway's credentials. An operator must check the upstream "
                "configuration.",
                status=502,
            ),
            summary,
        )
    if status == 404:
        return MappedError(error_reply("not_found_error", "The upstream does not serve this model."), summary)
    if status == 429:
        retry_after = headers.get("retry-after", "")
        return MappedError(
            error_reply(
                "rate_limit_error",
                "The upstream is rate limiting requests; retry shortly.",
                retry_after=int(retry_after) if retry_after.isdigit() else 5,
            ),
            summary,
        )
    if status in (503, 529):
        return MappedError(
            error_reply("overloaded_error", "The upstream is overloaded.", status=529), summary
        )
    return MappedError(error_reply("api_error", "The upstream failed to answer.", status=502), summary)
