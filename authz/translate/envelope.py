"""Builders for the error bodies clients expect: the Anthropic error envelope.

``{"type":"error","error":{"type":...,"message":...}}`` is what the Anthropic SDKs and Claude Code
parse on inference routes (DESIGN.md, "Client contracts"). Pure functions, deterministic output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

# The HTTP status each Anthropic error type travels with.
STATUS_FOR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "billing_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A complete response the gateway gives itself: status, headers and body (an error envelope,
    or an answer that needs no upstream, such as ``GET /v1/models``)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def error_body(error_type: str, message: str) -> bytes:
    """The Anthropic error envelope as compact JSON bytes."""
    return json.dumps(
        {"type": "error", "error": {"type": error_type, "message": message}}, separators=(",", ":")
    ).encode()


def error_reply(
    error_type: str,
    message: str,
    *,
    status: int | None = None,
    should_retry: bool | None = None,
    retry_after: int | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> ErrorReply:
    """An error response in the Anthropic envelope, the same for every client format (Bedrock,
    Vertex and Messages clients all parse it).

    ``should_retry=False`` adds ``x-should-retry: false``, which tells Claude Code and the SDKs not to
    retry (an expired or revoked token needs a new one, not another attempt). ``headers`` are added
    after those (the ``anthropic-ratelimit-unified-*`` headers of a spend-cap refusal).
    """
    out: list[tuple[str, str]] = [("content-type", "application/json")]
    if should_retry is not None:
        out.append(("x-should-retry", "true" if should_retry else "false"))
    if retry_after is not None:
        out.append(("retry-after", str(int(retry_after))))
    out.extend(headers)
    return ErrorReply(
        status=status if status is not None else STATUS_FOR_TYPE.get(error_type, 500),
        headers=tuple(out),
        body=error_body(error_type, message),
    )
