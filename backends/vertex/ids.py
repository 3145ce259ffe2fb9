"""Vertex AI's Claude model ids and REST routes, as exact grammars. Pure, no I/O.

A model id is ``claude-<words>`` with an optional ``@YYYYMMDD`` snapshot
(``claude-haiku-4-5@20251001``), matched as a whole after the path segment was percent-decoded
exactly once; anything else is a :class:`~backends.errors.BadModelId`. The client's project and
region are read only to recognise the route: requests always go to the configured ones.
https://cloud.google.com/vertex-ai/generative-ai/docs/partner-models/claude/use-claude
"""

from __future__ import annotations

import re
from urllib.parse import quote

from backends.base import ModelRef, decode_segment
from backends.descriptor import PassThroughRoute, RouteSpec
from backends.errors import BackendError, BadModelId

_MODEL = re.compile(r"(?P<name>claude(?:-[a-z0-9]+)+)(?:@(?P<date>[0-9]{8}))?")
# Project ids are 6-30 characters of lower-case letters, digits and hyphens; older projects may
# carry a domain prefix ("example.com:project"). Regions are lower-case words and digits.
# https://cloud.google.com/resource-manager/docs/creating-managing-projects
PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_CLIENT_SEGMENT = re.compile(r"[A-Za-z0-9._:-]{1,64}")
COUNT_TOKENS = "count-tokens"

_VERBS = {"rawPredict": ("invoke", False), "streamRawPredict": ("stream", True)}
_PATH_VERBS = {operation: verb for verb, (operation, _) in _VERBS.items()}

_MODELS = r"^/v1/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/[^/:]+"
ROUTES = (
    RouteSpec("vertex_stream", "POST", _MODELS + r":streamRawPredict$", True),
    RouteSpec("vertex_invoke", "POST", _MODELS + r":rawPredict$", False),
)


def parse_model_id(raw: str) -> ModelRef:
    """Parse a decoded Vertex model id; :class:`BadModelId` unless it is ``claude-...[@date]``."""
    m = _MODEL.fullmatch(raw.lower())
    if m is None:
        raise BadModelId(f"{raw!r} is not a Vertex Claude model id (claude-<model>[@YYYYMMDD])")
    name, date = m["name"], m["date"]
    upstream_id = f"{name}@{date}" if date else name
    return ModelRef(upstream_id, f"{name}-{date}" if date else name, regional=True)


def parse_route(method: str, path: str) -> PassThroughRoute | None:
    """Recognise a Vertex ``rawPredict``/``streamRawPredict`` route; None for anything else.

    Raises :class:`BadModelId` when the route names a malformed model id.
    """
    path = path.partition("?")[0]
    parts = path.split("/")
    # "", v1, projects, {p}, locations, {r}, publishers, anthropic, models, {m}:{verb}
    if method != "POST" or len(parts) != 10 or parts[0]:
        return None
    fixed = (parts[1], parts[2], parts[4], parts[6], parts[7], parts[8])
    if fixed != ("v1", "projects", "locations", "publishers", "anthropic", "models"):
        return None
    if not (_CLIENT_SEGMENT.fullmatch(parts[3]) and _CLIENT_SEGMENT.fullmatch(parts[5])):
        return None
    segment, colon, verb = parts[9].rpartition(":")
    action = _VERBS.get(verb)
    if not colon or action is None or not segment:
        return None
    operation, streaming = action
    if segment == COUNT_TOKENS:
        # The model is in the body; counting tokens names no billable model.
        return PassThroughRoute("count_tokens", False, None) if verb == "rawPredict" else None
    return PassThroughRoute(operation, streaming, parse_model_id(decode_segment(segment)))  # type: ignore[arg-type]


def request_path(project: str, region: str, operation: str, model_id: str | None) -> str:
    """The Vertex path for ``operation`` in the configured project and region."""
    base = f"/v1/projects/{project}/locations/{region}/publishers/anthropic/models"
    if operation == "count_tokens":
        return f"{base}/{COUNT_TOKENS}:rawPredict"
    verb = _PATH_VERBS.get(operation)
    if verb is None or not model_id:
        raise BackendError(f"Vertex has no {operation} route")
    # '@' separates a Vertex model's version and is a legal path character (RFC 3986 pchar).
    return f"{base}/{quote(model_id, safe='-_.~@')}:{verb}"
