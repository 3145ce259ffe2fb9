"""The first-party Anthropic API's checks and answers, as pure functions the emulator's handlers call.

The rules follow the API as it answers: the API key first (401 ``authentication_error``), then the
``anthropic-version`` header (400), then the body (400 ``invalid_request_error``; a model id that is
not a first-party one is a 404 ``not_found_error``). Fields only the cloud formats carry
(``anthropic_version`` and ``anthropic_beta`` in the body) are refused the way the API refuses extra
inputs, so a translator that forgets to remove them fails here as it would upstream.
https://docs.anthropic.com/en/api/errors
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from backends.emulator.canned import canned_events
from backends.usage import Usage

_VERSION = re.compile(r"20\d\d-\d\d-\d\d")
_MODEL = re.compile(r"claude(?:-[a-z0-9]+)+")
_CLOUD_ONLY_FIELDS = ("anthropic_version", "anthropic_beta")
MAX_MODELS_PAGE = 1000

# What GET /v1/models lists, newest first as the API orders it.
MODELS: tuple[dict[str, Any], ...] = tuple(
    {
        "type": "model",
        "id": model_id,
        "display_name": name,
        "created_at": created,
        "lifecycle": "active",
    }
    for model_id, name, created in (
        ("claude-opus-5-5", "Claude Opus 5.5", "2026-09-01T00:00:00Z"),
        ("claude-sonnet-5", "Claude Sonnet 5", "2026-06-01T00:00:00Z"),
        ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    )
)


@dataclass(frozen=True, slots=True)
class ApiError:
    """An error answer: its status and the envelope's ``error.type`` and ``error.message``."""

    status: int
    type: str
    message: str


def check_key(headers: Mapping[str, str], keys: Collection[str]) -> ApiError | None:
    """None when the request carries an API key in ``keys`` and no other credential.

    The key travels in ``x-api-key`` (what the gateway sends) or as ``Authorization: Bearer`` (what
    the anthropic SDK 2.x sends for ``api_key``); every credential present must be a held key, so a
    client token that leaked past the gateway beside the right key is still refused.
    """
    api_key = headers.get("x-api-key")
    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    if api_key is None and scheme.lower() != "bearer":
        return ApiError(401, "authentication_error", "x-api-key header is required")
    if api_key is not None and api_key not in keys:
        return ApiError(401, "authentication_error", "invalid x-api-key")
    if "authorization" in headers and (scheme.lower() != "bearer" or bearer not in keys):
        return ApiError(401, "authentication_error", "invalid bearer token")
    return None


def check_version(headers: Mapping[str, str]) -> ApiError | None:
    """None when the ``anthropic-version`` header names a dated API version."""
    version = headers.get("anthropic-version")
    if version is None:
        return ApiError(400, "invalid_request_error", "anthropic-version: header is required")
    if not _VERSION.fullmatch(version):
        message = f"anthropic-version: {version!r} is not a valid version"
        return ApiError(400, "invalid_request_error", message)
    return None


def check_body(document: dict[str, Any] | None, *, count_tokens: bool) -> ApiError | None:
    """Validate a Messages (or count_tokens) body: a JSON object with ``model`` and ``messages``,
    plus ``max_tokens`` to create a message, and none of the cloud formats' fields."""
    if document is None:
        return ApiError(400, "invalid_request_error", "The request body is not valid JSON.")
    required = ("model", "messages") if count_tokens else ("model", "max_tokens", "messages")
    for name in required:
        if name not in document:
            return ApiError(400, "invalid_request_error", f"{name}: Field required")
    for name in _CLOUD_ONLY_FIELDS:
        if name in document:
            return ApiError(400, "invalid_request_error", f"{name}: Extra inputs are not permitted")
    model = document["model"]
    if not isinstance(model, str) or not _MODEL.fullmatch(model):
        return ApiError(404, "not_found_error", f"model: {model}")
    if "stream" in document and not isinstance(document["stream"], bool):
        return ApiError(400, "invalid_request_error", "stream: Input should be a valid boolean")
    return None


def stream_events(
    *, model: str, text_chunks: list[str], usage: Usage, cut_by_error: bool
) -> list[dict[str, Any]]:
    """The events of a streamed answer: the canned message with the ``ping`` the API sends after the
    first content block starts, or, when ``cut_by_error``, its first events then an ``error`` event."""
    events = canned_events(model=model, text_chunks=text_chunks, usage=usage)
    events.insert(2, {"type": "ping"})
    if cut_by_error:
        overloaded = {"type": "overloaded_error", "message": "Overloaded"}
        return [*events[:4], {"type": "error", "error": overloaded}]
    return events


def models_page(query: Mapping[str, str]) -> ApiError | dict[str, Any]:
    """One page of :data:`MODELS`: ``limit`` entries after ``after_id`` or before ``before_id``."""
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_MODELS_PAGE:
        return ApiError(400, "invalid_request_error", f"limit: must be between 1 and {MAX_MODELS_PAGE}")
    if "after_id" in query and "before_id" in query:
        return ApiError(400, "invalid_request_error", "after_id and before_id cannot both be set")
    limit, ids = int(raw_limit), [model["id"] for model in MODELS]
    cursor = query.get("after_id", query.get("before_id"))
    if cursor is not None and cursor not in ids:
        return ApiError(404, "not_found_error", f"model: {cursor}")
    if "before_id" in query:
        end = ids.index(query["before_id"])
        start = max(0, end - limit)
        has_more = start > 0
    else:
        start = ids.index(cursor) + 1 if cursor is not None else 0
        end = min(len(ids), start + limit)
        has_more = end < len(ids)
    page = list(MODELS[start:end])
    return {
        "data": page,
        "has_more": has_more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
