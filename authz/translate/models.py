"""Anthropic model ids as Messages-format clients name them, and the id each upstream receives.

A Messages request names a first-party id: an alias (``claude-sonnet-4-5``) or a dated snapshot
(``claude-sonnet-4-5-20250929``). :data:`CATALOGUE` lists the models the gateway knows (the families
:mod:`authz.billing.pricing` prices), each with its ids on the other platforms, as Claude Code's own
model table gives them (``provider_ids``: Bedrock foundation-model ids, Vertex ``<name>@<date>``
ids). :class:`ModelResolver` turns a requested id into the id one configured upstream receives:
its ``model_map`` entry first, else the kind's default for the model
(:attr:`backends.descriptor.UpstreamKind.default_model_id`), else nothing, which the caller
answers with a 400 naming the ``model_map`` key that would map it. Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from authz.configtypes import Upstream as UpstreamConfig
from backends.errors import BadModelId
from backends.kinds import KINDS

# Release dates the model ids carry, else the day the model was announced; the Models API answers
# the epoch for a model whose release date it does not know.
_EPOCH = "1970-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class KnownModel:
    """One model of the catalogue: its alias (the id ``GET /v1/models`` lists), its name for people,
    its release date (RFC 3339) and its ids per platform."""

    id: str
    display_name: str
    created_at: str
    first_party: str
    bedrock: str | None
    vertex: str | None


def _model(alias: str, name: str, date: str | None, bedrock: str | None, vertex: str | None) -> KnownModel:
    first_party = f"{alias}-{date}" if date else alias
    created = f"{date[:4]}-{date[4:6]}-{date[6:]}T00:00:00Z" if date else _EPOCH
    return KnownModel(alias, name, created, first_party, bedrock, vertex)


# Newest first, as the Models API orders its list. Bedrock ids are foundation-model ids; the kind
# puts the inference-profile geography in front (backends/bedrock, profile_geography).
CATALOGUE: tuple[KnownModel, ...] = (
    _model("claude-opus-5-5", "Claude Opus 5.5", None, "anthropic.claude-opus-5-5", "claude-opus-5-5"),
    _model("claude-opus-5", "Claude Opus 5", None, "anthropic.claude-opus-5", "claude-opus-5"),
    _model("claude-sonnet-5", "Claude Sonnet 5", None, "anthropic.claude-sonnet-5", "claude-sonnet-5"),
    _model(
        "claude-sonnet-4-6", "Claude Sonnet 4.6", None, "anthropic.claude-sonnet-4-6", "claude-sonnet-4-6"
    ),
    _model("claude-opus-4-6", "Claude Opus 4.6", None, "anthropic.claude-opus-4-6-v1", "claude-opus-4-6"),
    _model(
        "claude-opus-4-5",
        "Claude Opus 4.5",
        "20251101",
        "anthropic.claude-opus-4-5-20251101-v1:0",
        "claude-opus-4-5@20251101",
    ),
    _model(
        "claude-haiku-4-5",
        "Claude Haiku 4.5",
        "20251001",
        "anthropic.claude-haiku-4-5-20251001-v1:0",
        "claude-haiku-4-5@20251001",
    ),
    _model(
        "claude-sonnet-4-5",
        "Claude Sonnet 4.5",
        "20250929",
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        "claude-sonnet-4-5@20250929",
    ),
)

_BY_ID: Mapping[str, KnownModel] = {
    name: model for model in CATALOGUE for name in dict.fromkeys((model.id, model.first_party))
}


def known(model_id: str) -> KnownModel | None:
    """The catalogue entry for an alias or a dated first-party id."""
    return _BY_ID.get(model_id)


def canonical(model_id: str) -> str:
    """The canonical id policy and prices judge: a known alias resolves to its dated snapshot (as
    Bedrock and Vertex clients name it), any other id is its own canonical form."""
    model = _BY_ID.get(model_id)
    return model.first_party if model is not None else model_id


def _provider_ids(requested: str) -> dict[str, str]:
    ids = {"first_party": requested}
    model = _BY_ID.get(requested)
    if model is not None:
        if model.bedrock:
            ids["bedrock"] = model.bedrock
        if model.vertex:
            ids["vertex"] = model.vertex
    return ids


@dataclass(frozen=True, slots=True)
class Resolved:
    """The id the upstream receives and whether that endpoint is priced as regional."""

    upstream_id: str
    regional: bool


class _Target:
    __slots__ = ("kind", "model_map", "name", "settings")

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.kind = KINDS[config.kind]
        self.settings: Any = config.settings
        self.model_map = dict(config.settings.model_map)


class ModelResolver:
    """The id each configured upstream receives for a model a Messages-format client names."""

    def __init__(self, upstreams: Iterable[tuple[str, UpstreamConfig]]) -> None:
        self._targets = {name: _Target(name, config) for name, config in upstreams}

    def resolve(self, upstream: str, requested: str) -> Resolved | None:
        """The id ``upstream`` receives for ``requested`` (an id of the first-party grammar), or
        None when neither its ``model_map`` nor its kind's defaults name one.

        ``model_map`` is looked up by the canonical id, then by the id as requested (so an alias can
        be mapped on its own).
        """
        target = self._targets.get(upstream)
        if target is None:
            return None
        upstream_id = target.model_map.get(canonical(requested)) or target.model_map.get(requested)
        if upstream_id is None:
            upstream_id = target.kind.default_model_id(target.settings, _provider_ids(requested))
        if upstream_id is None:
            return None
        try:
            ref = target.kind.parse_model_id(upstream_id)
        except BadModelId:
            return None
        return Resolved(ref.upstream_id, target.kind.regional(target.settings, ref))

    def listed(self, upstream: str) -> list[KnownModel]:
        """The catalogue's models ``upstream`` can serve, in catalogue order."""
        return [model for model in CATALOGUE if self.resolve(upstream, model.id) is not None]


def map_key(upstream: str, requested: str) -> str:
    """The configuration key that maps ``requested`` on ``upstream`` (named in the 400)."""
    return f"upstreams.{upstream}.model_map.{canonical(requested)}"


# --- GET /v1/models --------------------------------------------------------------------------------

MAX_PAGE = 1000
DEFAULT_PAGE = 20


def models_page(models: list[KnownModel], query: Mapping[str, str]) -> dict[str, Any] | str:
    """One page of ``models`` in the Models API's list shape, or the problem with the query.

    ``limit`` (1-1000, default 20) entries after ``after_id`` or before ``before_id``; an unknown
    cursor gives an empty page. https://docs.anthropic.com/en/api/models-list
    """
    raw_limit = query.get("limit", str(DEFAULT_PAGE))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        return f"limit: must be an integer between 1 and {MAX_PAGE}"
    if "after_id" in query and "before_id" in query:
        return "after_id and before_id cannot both be given"
    limit, ids = int(raw_limit), [model.id for model in models]
    if "before_id" in query:
        end = ids.index(query["before_id"]) if query["before_id"] in ids else 0
        start = max(0, end - limit)
        has_more = start > 0
    else:
        after = query.get("after_id")
        start = ids.index(after) + 1 if after in ids else (len(ids) if after is not None else 0)
        end = min(len(ids), start + limit)
        has_more = end < len(ids)
    page = [
        {"type": "model", "id": m.id, "display_name": m.display_name, "created_at": m.created_at}
        for m in models[start:end]
    ]
    return {
        "data": page,
        "has_more": has_more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
