"""Turn an upstream's error response into what the client should see. Pure.

Upstream error text can leak account ids and role ARNs, so the operator gets it in the log and the
client gets a generic Anthropic envelope, except for the messages clients key their recovery on
(DESIGN.md, "Client contracts"): Anthropic-envelope 400/413 errors such as "prompt is too long",
and Bedrock's exact ``Input is too long.``, which pass through verbatim.
"""

from __future__ import annotations

import json
import re
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


# --- Messages-format clients --------------------------------------------------------------------

# What Messages-format clients recover on: Claude Code compacts the conversation when an error's
# message contains "prompt is too long" (the Anthropic API's wording, "prompt is too long: N tokens
# > M maximum"). Bedrock says `Input is too long.` and Vertex refuses an oversized payload in its own
# envelope; both become this sentence.
PROMPT_TOO_LONG = "prompt is too long: the request exceeds the model's context window"
# Google's 400 for a request over Vertex's payload limit ("Request payload size exceeds the limit:
# 31457280 bytes.").
_GOOGLE_TOO_LARGE = re.compile(r"payload size exceeds|request (?:is )?too large", re.IGNORECASE)


def too_long_reply() -> ErrorReply:
    """The Anthropic API's answer to a prompt over the context window."""
    return error_reply("invalid_request_error", PROMPT_TOO_LONG)


def map_messages_error(status: int, body: bytes, headers: dict[str, str]) -> MappedError:
    """What a Messages-format client sees for an upstream error: always the Anthropic envelope.

    Anthropic-envelope 400/413 errors pass as they are; Bedrock's ``Input is too long.`` and Vertex's
    oversized-payload 400 become the API's "prompt is too long" (a Bedrock-format client gets
    Bedrock's own sentence instead: :func:`map_upstream_error`); everything else is hidden as for
    every client.
    """
    etype, message, is_envelope = _message_of(body)
    summary = f"upstream {status}" + (f" {etype}" if etype else "")
    too_long = message is not None and (message == BEDROCK_TOO_LONG or _GOOGLE_TOO_LARGE.search(message))
    if status in (400, 413) and not is_envelope and too_long:
        return MappedError(too_long_reply(), f"{summary}: {message}")
    return map_upstream_error(status, body, headers)


# Bedrock's exceptions inside a stream (InvokeModelWithResponseStream's ResponseStream members):
# the Anthropic error type and the message a Messages client gets in an `event: error`.
# https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_ResponseStream.html
_STREAM_ERRORS = {
    "throttlingException": ("rate_limit_error", "The upstream is rate limiting requests; retry shortly."),
    "serviceUnavailableException": ("overloaded_error", "The upstream is overloaded."),
    "modelNotReadyException": ("overloaded_error", "The upstream is overloaded."),
    "validationException": ("invalid_request_error", "The upstream rejected the request."),
}
_STREAM_FAILED = ("api_error", "The upstream failed while streaming the answer.")


def stream_error(exception_type: str, message: str | None) -> tuple[str, str]:
    """``(Anthropic error type, message)`` for a Bedrock exception met mid-stream.

    The upstream's text is hidden (it can name accounts and roles) except ``Input is too long.``,
    which becomes the API's "prompt is too long"; model stream errors, timeouts and internal
    errors are ``api_error``.
    """
    if message is not None and message.strip() == BEDROCK_TOO_LONG:
        return "invalid_request_error", PROMPT_TOO_LONG
    return _STREAM_ERRORS.get(exception_type, _STREAM_FAILED)
