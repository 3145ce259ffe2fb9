"""Bedrock's model ids and REST routes, as exact grammars. Pure, no I/O.

A model id is accepted only when it matches one of Bedrock's id forms as a whole (``re.fullmatch``,
so a trailing newline never slips past an anchor), after the path segment was percent-decoded
exactly once:

* foundation models: ``anthropic.claude-haiku-4-5-20251001-v1:0`` (``-vN:M``, optionally a
  provisioned context suffix ``:200k``);
* cross-region inference profiles: ``us.``/``eu.``/``apac.``/``global.`` (and ``jp.``, ``au.``,
  ``ca.``, ``us-gov.``) before a foundation-model id, which may then omit its version;
* ARNs of inference profiles, foundation models and application inference profiles.

Anything else (``..``, ``/``, ``\\``, ``%``, ``@``, spaces, extra ``:`` parts, control characters)
is a :class:`~backends.errors.BadModelId`. The id the upstream receives is rebuilt from the parsed
parts, so what the policy judged is what Bedrock reads.
https://docs.aws.amazon.com/bedrock/latest/userguide/model-ids.html
https://docs.aws.amazon.com/bedrock/latest/userguide/inference-profiles-support.html
"""

from __future__ import annotations

import re
from urllib.parse import quote

from backends.base import ModelRef, decode_segment
from backends.descriptor import PassThroughRoute, RouteSpec
from backends.errors import BackendError, BadModelId

# A Claude model name: lower-case words joined by single hyphens (`claude-haiku-4-5-20251001`,
# `claude-3-5-sonnet-20241022`). No dots, slashes, colons or at-signs can appear in it.
_NAME = r"claude(?:-[a-z0-9]+)+?"
_VERSION = r"-v[0-9]{1,3}(?::[0-9]{1,3}(?::[0-9]{1,4}k)?)?"
GEOS = ("us", "eu", "apac", "global", "jp", "au", "ca", "us-gov")
_GEO = "|".join(re.escape(g) for g in sorted(GEOS, key=len, reverse=True))
_FOUNDATION = re.compile(rf"anthropic\.(?P<name>{_NAME})(?P<version>{_VERSION})")
_PROFILE = re.compile(rf"(?P<geo>{_GEO})\.anthropic\.(?P<name>{_NAME})(?P<version>{_VERSION})?")
_PARTITION = r"aws|aws-cn|aws-us-gov"
_REGION = r"[a-z]{2}(?:-gov)?-[a-z]+-[0-9]{1,2}"
_ACCOUNT = r"[0-9]{12}"
_ARN = re.compile(
    rf"arn:(?P<partition>{_PARTITION}):bedrock:(?P<region>{_REGION}):(?P<account>{_ACCOUNT})?:"
    r"(?P<type>inference-profile|foundation-model|application-inference-profile)/(?P<resource>[^/]+)"
)
_APPLICATION_PROFILE = re.compile(r"[a-z0-9]{12}")

_ACTIONS = {
    "invoke": ("invoke", False),
    "invoke-with-response-stream": ("stream", True),
    "count-tokens": ("count_tokens", False),
}
_PATH_ACTIONS = {operation: action for action, (operation, _) in _ACTIONS.items()}

# The routes Envoy sends to ext_authz and ext_proc (Client contracts in DESIGN.md).
ROUTES = (
    RouteSpec("bedrock_stream", "POST", r"^/model/[^/]+/invoke-with-response-stream$", True),
    RouteSpec("bedrock_invoke", "POST", r"^/model/[^/]+/(invoke|count-tokens)$", False),
    RouteSpec("bedrock_inference_profiles", "GET", r"^/inference-profiles$", False),
)

# ListInferenceProfiles query parameters worth forwarding (re-serialised, never the raw query).
_PROFILE_QUERY = {"type": re.compile(r"SYSTEM_DEFINED|APPLICATION"), "maxResults": re.compile(r"[0-9]{1,4}")}


def _foundation(name: str, version: str) -> str:
    return f"anthropic.{name}{version}"


def canonical_name(name: str) -> str:
    """The first-party id for a model name (Bedrock's names already are first-party ids)."""
    return name


def parse_model_id(raw: str) -> ModelRef:
    """Parse a decoded Bedrock model id; :class:`BadModelId` unless it is one of Bedrock's forms.

    Ids are case-insensitive here and re-serialised lower-case, as Bedrock spells them.
    """
    value = raw.lower()
    if (m := _PROFILE.fullmatch(value)) is not None:
        rebuilt = f"{m['geo']}.{_foundation(m['name'], m['version'] or '')}"
        return ModelRef(rebuilt, canonical_name(m["name"]), regional=m["geo"] != "global")
    if (m := _FOUNDATION.fullmatch(value)) is not None:
        # In-region invocation of a foundation model: a regional endpoint.
        return ModelRef(_foundation(m["name"], m["version"]), canonical_name(m["name"]), regional=True)
    if (m := _ARN.fullmatch(value)) is not None:
        return _parse_arn(m)
    raise BadModelId(f"{raw!r} is not a Bedrock model id, inference profile or ARN")


def _parse_arn(m: re.Match[str]) -> ModelRef:
    prefix = f"arn:{m['partition']}:bedrock:{m['region']}:{m['account'] or ''}"
    kind, resource = m["type"], m["resource"]
    if kind == "foundation-model":
        f = _FOUNDATION.fullmatch(resource)
        if f is None or m["account"]:
            raise BadModelId("a foundation-model ARN names anthropic.<model>-vN:M and no account")
        return ModelRef(f"{prefix}:foundation-model/{resource}", canonical_name(f["name"]), regional=True)
    if m["account"] is None:
        raise BadModelId(f"a {kind} ARN names a 12-digit account")
    if kind == "inference-profile":
        p = _PROFILE.fullmatch(resource)
        if p is None:
            raise BadModelId("an inference-profile ARN names a <geo>.anthropic.<model> profile")
        return ModelRef(
            f"{prefix}:inference-profile/{resource}", canonical_name(p["name"]), regional=p["geo"] != "global"
        )
    if not _APPLICATION_PROFILE.fullmatch(resource):
        raise BadModelId("an application-inference-profile ARN ends in a 12-character profile id")
    # Opaque: the model behind it is known only to the AWS account, so the canonical id keeps the
    # type to stay recognisable in policy and rows, and it is priced as regional (the safe side).
    return ModelRef(
        f"{prefix}:application-inference-profile/{resource}",
        f"application-inference-profile/{resource}",
        regional=True,
    )


def foundation_model_id(model_id: str) -> str | None:
    """The foundation-model id behind a Bedrock model id, which CountTokens takes (it refuses
    inference profiles); None when it cannot be known from the id: an application inference profile,
    or a profile of a model released under inference profiles only (no ``-vN`` version).
    https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_CountTokens.html
    """
    value = model_id.lower()
    arn = _ARN.fullmatch(value)
    if arn is not None:
        value = arn["resource"]
    if _FOUNDATION.fullmatch(value) is not None:
        return value
    profile = _PROFILE.fullmatch(value)
    if profile is not None and profile["version"]:
        return _foundation(profile["name"], profile["version"])
    return None


def parse_route(method: str, path: str) -> PassThroughRoute | None:
    """Recognise a Bedrock Runtime route; None for any other path (a 404).

    Raises :class:`BadModelId` for ``/model/{id}/...`` with an id outside Bedrock's forms.
    """
    path, _, query = path.partition("?")
    if path == "/inference-profiles":
        if method != "GET":
            return None
        return PassThroughRoute("list_profiles", False, None, _profile_query(query))
    parts = path.split("/")
    # "", "model", "{id}", "{action}"
    if method != "POST" or len(parts) != 4 or parts[0] or parts[1] != "model" or not parts[2]:
        return None
    action = _ACTIONS.get(parts[3])
    if action is None:
        return None
    operation, streaming = action
    return PassThroughRoute(operation, streaming, parse_model_id(decode_segment(parts[2])))  # type: ignore[arg-type]


def _profile_query(query: str) -> str:
    kept = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        rule = _PROFILE_QUERY.get(name)
        if rule is not None and rule.fullmatch(value):
            kept.append(f"{name}={value}")
    return "&".join(sorted(kept))


def request_path(operation: str, model_id: str | None, query: str = "") -> str:
    """The Bedrock Runtime path for ``operation``, with the model id percent-encoded the way
    botocore serialises the ``modelId`` URI label (everything but unreserved characters), so an
    ARN's ``/`` and ``:`` stay inside one segment."""
    if operation == "list_profiles":
        return "/inference-profiles" + (f"?{query}" if query else "")
    action = _PATH_ACTIONS.get(operation)
    if action is None or not model_id:
        raise BackendError(f"Bedrock has no {operation} route")
    return f"/model/{quote(model_id, safe='-_.~')}/{action}"
