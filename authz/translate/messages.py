"""The Anthropic Messages API as a client format: its routes, and reading a request body once.

Routes (https://docs.anthropic.com/en/api/messages): ``POST /v1/messages`` (the SDKs add
``?beta=true`` for beta calls; the query changes nothing here), ``POST /v1/messages/count_tokens``
and ``GET /v1/models``. The model is in the body, so ext_authz admits the caller and picks the
upstream from the path alone, and the exchange checks the model once the body is in, before
anything is sent upstream.

:func:`read_request` parses the body exactly once, refusing what a lenient parser would let
through: a body that is not UTF-8 JSON, ``NaN``, a key given twice in any object (the policy must
judge the very ``model`` the upstream reads, and JSON parsers disagree about repeated keys), a
missing or non-string ``model``. It keeps each top-level member's exact text, so a translator
rebuilds the body by dropping and adding members without re-serialising the rest: fields it does
not know reach the upstream byte for byte, and the cost stays one linear pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends.anthropic import parse_model_id
from backends.descriptor import PassThroughRoute, RouteSpec
from backends.errors import BadModelId

FORMAT = "messages"
"""The client format's name (usage rows' ``ingress_format``)."""

# Envoy matches these (safe_regex over the path without its query); ext_authz parses them.
ROUTES = (
    RouteSpec("messages", "POST", r"^/v1/messages$", True),
    RouteSpec("messages_count_tokens", "POST", r"^/v1/messages/count_tokens$", False),
    RouteSpec("messages_models", "GET", r"^/v1/models$", False),
)

# GET /v1/models query parameters worth reading (re-serialised, never the raw query).
_MODELS_QUERY = {
    "limit": re.compile(r"[0-9]{1,4}"),
    "after_id": re.compile(r"[a-z0-9-]{1,128}"),
    "before_id": re.compile(r"[a-z0-9-]{1,128}"),
}

_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's insignificant whitespace (RFC 8259, section 2)

# The beta that lets a request carry `tags`; Bedrock and Vertex refuse both (DESIGN.md, "Claude
# Code's gateway protocol").
REQUEST_TAGS_BETA = "request-tags-2026-08-21"


def parse_route(method: str, path: str) -> PassThroughRoute | None:
    """Recognise a Messages API route; None for any other path.

    ``POST /v1/messages`` is an ``invoke`` until the body says ``"stream": true``.
    """
    path, _, query = path.partition("?")
    if path == "/v1/messages":
        return PassThroughRoute("invoke", False, None) if method == "POST" else None
    if path == "/v1/messages/count_tokens":
        return PassThroughRoute("count_tokens", False, None) if method == "POST" else None
    if path == "/v1/models":
        return PassThroughRoute("list_models", False, None, _models_query(query)) if method == "GET" else None
    return None


def _models_query(query: str) -> str:
    kept = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        rule = _MODELS_QUERY.get(name)
        if rule is not None and rule.fullmatch(value):
            kept.append(f"{name}={value}")
    return "&".join(sorted(kept))


def query_params(query: str) -> dict[str, str]:
    """The re-serialised query of a ``GET /v1/models`` as a mapping."""
    return dict(pair.partition("=")[::2] for pair in query.split("&") if pair)


class InvalidRequest(ValueError):
    """The body is not a Messages request the gateway can judge; the message is for the client."""


@dataclass(frozen=True, slots=True)
class Member:
    """One top-level member of the body: its key, its parsed value, and its exact text."""

    key: str
    value: Any
    text: str


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """A Messages (or count_tokens) request body, read once."""

    members: tuple[Member, ...]
    model: str
    stream: bool

    def get(self, key: str) -> Any:
        """The parsed value of a top-level member, or None."""
        for member in self.members:
            if member.key == key:
                return member.value
        return None

    def rebuild(self, *, drop: Collection[str] = (), add: Sequence[tuple[str, Any]] = ()) -> bytes:
        """The body without the members named in ``drop`` and with ``add`` appended (compact JSON);
        every other member keeps its exact text."""
        parts = [m.text for m in self.members if m.key not in drop]
        parts.extend(
            f"{json.dumps(key)}:{json.dumps(value, separators=(',', ':'), ensure_ascii=False)}"
            for key, value in add
        )
        return ("{" + ",".join(parts) + "}").encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRequest(f"the key {key!r} appears twice in one object")
            seen.add(key)
    return document


def _no_constants(name: str) -> Any:
    raise InvalidRequest(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def read_request(body: bytes, *, count_tokens: bool = False) -> MessagesRequest:
    """Parse a request body; :class:`InvalidRequest` says what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.") from None
    try:
        members = _split_object(text)
    except InvalidRequest:
        raise
    except RecursionError:
        raise InvalidRequest("The request body nests too deeply.") from None
    except ValueError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {_json_problem(exc)}.") from None
    by_key = {m.key: m for m in members}
    model = by_key.get("model")
    if model is None:
        raise InvalidRequest("model: Field required")
    if not isinstance(model.value, str):
        raise InvalidRequest("model: Input should be a valid string")
    try:
        parse_model_id(model.value)
    except BadModelId:
        raise InvalidRequest(
            f"model: {model.value[:200]!r} is not a Claude model id (claude-<model>[-YYYYMMDD])"
        ) from None
    stream = by_key.get("stream")
    if stream is not None and not isinstance(stream.value, bool) and not count_tokens:
        raise InvalidRequest("stream: Input should be a valid boolean")
    return MessagesRequest(
        members=tuple(members),
        model=model.value,
        stream=bool(stream.value) if stream is not None and not count_tokens else False,
    )


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at character {exc.pos}"
    return str(exc)


def _skip(text: str, position: int) -> int:
    """The position after the whitespace at ``position``."""
    found = _WHITESPACE.match(text, position)
    return found.end() if found is not None else position


def _split_object(text: str) -> list[Member]:
    """The top-level members of a JSON object, with their exact text.

    The object's braces, commas and colons are read here; keys and values by the json module's own
    scanner (strict, in C), so this is the json module's grammar, one member at a time.
    """
    end = _skip(text, 0)
    if text[end : end + 1] != "{":
        raise InvalidRequest("The request body must be a JSON object.")
    end = _skip(text, end + 1)
    members: list[Member] = []
    seen: set[str] = set()
    if text[end : end + 1] == "}":
        end += 1
    else:
        while True:
            if text[end : end + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, end)
            start = end
            key, end = _DECODER.raw_decode(text, end)  # a JSON string: it starts with a quote
            end = _skip(text, end)
            if text[end : end + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, end)
            end = _skip(text, end + 1)
            value, end = _DECODER.raw_decode(text, end)
            if key in seen:
                raise InvalidRequest(f"the key {key!r} appears twice in one object")
            seen.add(key)
            members.append(Member(key, value, text[start:end]))
            end = _skip(text, end)
            delimiter = text[end : end + 1]
            end = _skip(text, end + 1)
            if delimiter == "}":
                break
            if delimiter != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, end)
    if _skip(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return members


def header_betas(headers: Mapping[str, str]) -> list[str]:
    """The ``anthropic-beta`` header's values, in order, without empty ones."""
    return [b.strip() for b in headers.get("anthropic-beta", "").split(",") if b.strip()]
