"""Inference routes and model ids: which operation a request path names, and which model.

Pure parsing, no I/O. The Bedrock and Vertex client contracts are in DESIGN.md ("Client
contracts"); model ids are normalised to the first-party Anthropic form so that policy and prices
are written once for every upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

Format = Literal["bedrock", "vertex"]
Operation = Literal["invoke", "stream", "count_tokens", "list_profiles"]

_BEDROCK_ACTIONS: dict[str, tuple[Operation, bool]] = {
    "invoke": ("invoke", False),
    "invoke-with-response-stream": ("stream", True),
    "count-tokens": ("count_tokens", False),
}
_VERTEX_VERBS: dict[str, tuple[Operation, bool]] = {
    "rawPredict": ("invoke", False),
    "streamRawPredict": ("stream", True),
}
_VERTEX_COUNT_TOKENS = "count-tokens"

# `{geo}.anthropic.{model}` (cross-region inference profile) or `anthropic.{model}` (foundation model).
_BEDROCK_ID = re.compile(r"^(?:(?P<geo>[a-z][a-z0-9-]*)\.)?anthropic\.(?P<model>.+)$")
# Bedrock's version suffix: `-v1:0`, `-v2:0`, and provisioned context variants such as `-v1:0:200k`.
_BEDROCK_VERSION = re.compile(r"-v\d+(?::[0-9a-z]+)*$")
_DATE_SUFFIX = re.compile(r"-\d{8}$")
_VERTEX_DATE = re.compile(r"^\d{8}$")
# Model ids are short ASCII tokens; an ARN is at most 2048 characters. Anything with spaces,
# control characters or non-ASCII is not a model id and is refused as an unknown route.
_MODEL_CHARS = re.compile(r"^[\x21-\x7e]{1,2048}$")
_SEGMENT_CHARS = re.compile(r"^[A-Za-z0-9._~%:@!$&'()*+,;=-]+$")


@dataclass(frozen=True, slots=True)
class InferenceRoute:
    """What an inference request asks for, read from its method and path alone.

    ``model_raw`` is the model id as the client sent it (percent-decoded once), ``model_segment``
    the still-encoded path segment (for forwarding byte-for-byte), ``model`` the canonical id.
    ``regional`` marks a geographic or regional endpoint, priced at a premium over global ones.
    ``vertex_project``/``vertex_region`` are what the client sent: informational only, the
    configured upstream decides where the request really goes.
    """

    format: Format
    operation: Operation
    streaming: bool
    model_raw: str | None = None
    model_segment: str | None = None
    model: str | None = None
    regional: bool = False
    vertex_project: str | None = None
    vertex_region: str | None = None


def _decode_segment(segment: str) -> str | None:
    """Percent-decode one path segment once; None if it cannot be a model id or path value."""
    if not segment or segment in (".", "..") or not _SEGMENT_CHARS.match(segment):
        return None
    try:
        decoded = unquote(segment, errors="strict") if "%" in segment else segment
    except UnicodeDecodeError:
        return None
    if not _MODEL_CHARS.match(decoded) or decoded in (".", ".."):
        return None
    return decoded


def _bedrock_resource(raw: str) -> tuple[str, str] | None:
    """``(resource type, resource id)`` of a Bedrock ARN, or None if ``raw`` is not one.

    ARN layout: ``arn:partition:bedrock:region:account:type/id``; the id itself may contain ``:``
    (``-v1:0``), so split at most five times.
    """
    parts = raw.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "bedrock":
        return None
    kind, sep, ident = parts[5].partition("/")
    if not sep or not ident:
        return None
    return kind, ident


def _bedrock_regional(raw: str) -> bool:
    """Whether a Bedrock model id names a regional or geographic endpoint.

    Only ``global.`` profiles are global. Foundation-model ids (in-region invocation), geographic
    profiles (``us.``, ``eu.``, ``apac.``, ``jp.``, ``au.``, ...) and opaque application profiles
    are treated as regional: when unsure, the higher price keeps spend caps on the safe side.
    """
    lowered = raw.lower()
    resource = _bedrock_resource(lowered)
    ident = resource[1] if resource is not None else lowered
    return not ident.startswith("global.")


def canonical_model(raw: str) -> str:
    """Normalise a Bedrock, Vertex or first-party model id to the first-party form, lower-cased.

    ``us.anthropic.claude-opus-5-5`` and Bedrock ARNs naming it become ``claude-opus-5-5``;
    ``anthropic.claude-haiku-4-5-20251001-v1:0`` becomes ``claude-haiku-4-5-20251001``; Vertex
    ``claude-haiku-4-5@20251001`` becomes ``claude-haiku-4-5-20251001``. Application inference
    profile ARNs are opaque and become ``application-inference-profile/<id>``. Anything else is
    returned lower-cased.
    """
    model = raw.strip().lower()
    resource = _bedrock_resource(model)
    if resource is not None:
        kind, ident = resource
        if kind in ("inference-profile", "foundation-model"):
            model = ident
        else:
            # Application inference profiles and provisioned models are opaque ids: the model
            # behind them is only known to the AWS account, so keep the type to stay recognisable.
            return f"{kind}/{ident}"
    match = _BEDROCK_ID.match(model)
    if match is not None:
        return _BEDROCK_VERSION.sub("", match.group("model"))
    base, at, version = model.partition("@")
    if at and base:
        # Vertex writes the snapshot date after `@`; other suffixes (`@latest`) carry no date.
        return f"{base}-{version}" if _VERTEX_DATE.match(version) else base
    return model


def model_family(canonical: str) -> str:
    """The model id without a trailing ``-YYYYMMDD`` snapshot date."""
    return _DATE_SUFFIX.sub("", canonical)


def _bedrock_route(method: str, parts: list[str]) -> InferenceRoute | None:
    if parts == ["inference-profiles"]:
        return InferenceRoute("bedrock", "list_profiles", False) if method == "GET" else None
    if len(parts) != 3 or parts[0] != "model" or method != "POST":
        return None
    action = _BEDROCK_ACTIONS.get(parts[2])
    raw = _decode_segment(parts[1])
    if action is None or raw is None:
        return None
    operation, streaming = action
    return InferenceRoute(
        format="bedrock",
        operation=operation,
        streaming=streaming,
        model_raw=raw,
        model_segment=parts[1],
        model=canonical_model(raw),
        regional=_bedrock_regional(raw),
    )


def _vertex_route(method: str, parts: list[str]) -> InferenceRoute | None:
    # v1 / projects / {p} / locations / {r} / publishers / anthropic / models / {m}:{verb}
    if method != "POST" or len(parts) != 9:
        return None
    fixed = (parts[0], parts[1], parts[3], parts[5], parts[6], parts[7])
    if fixed != ("v1", "projects", "locations", "publishers", "anthropic", "models"):
        return None
    project = _decode_segment(parts[2])
    region = _decode_segment(parts[4])
    segment, colon, verb = parts[8].rpartition(":")
    if project is None or region is None or not colon:
        return None
    regional = region.lower() != "global"
    if segment == _VERTEX_COUNT_TOKENS:
        if verb != "rawPredict":
            return None
        return InferenceRoute(
            format="vertex",
            operation="count_tokens",
            streaming=False,
            regional=regional,
            vertex_project=project,
            vertex_region=region,
        )
    action = _VERTEX_VERBS.get(verb)
    raw = _decode_segment(segment)
    if action is None or raw is None:
        return None
    operation, streaming = action
    return InferenceRoute(
        format="vertex",
        operation=operation,
        streaming=streaming,
        model_raw=raw,
        model_segment=segment,
        model=canonical_model(raw),
        regional=regional,
        vertex_project=project,
        vertex_region=region,
    )


def parse_route(method: str, path: str) -> InferenceRoute | None:
    """Recognise a Bedrock or Vertex inference route; None for anything else (a 404).

    The query string is ignored. The model segment is percent-decoded exactly once, so a Bedrock
    ARN sent as ``inference-profile%2Fus.anthropic...`` arrives whole; extra or empty segments
    are refused rather than guessed at.
    """
    path = path.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        return None
    # HTTP methods are case-sensitive (RFC 9110 §9.1): `post` is not POST.
    parts = path[1:].split("/")
    if parts and parts[0] == "v1":
        return _vertex_route(method, parts)
    return _bedrock_route(method, parts)
