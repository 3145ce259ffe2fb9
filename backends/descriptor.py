"""The shape of an upstream kind's descriptor (the table of kinds is :mod:`backends.kinds`).

A descriptor says everything kind-specific: the typed settings its ``upstreams.<name>`` section
builds into and their cross-field rules, the endpoint, how to build the runtime upstream, whether
signing covers the request body, the response meter, how regional pricing is decided, its model-id
grammar and the id it receives by default for a model a Messages-format client names, and the
client format it serves byte for byte (with that format's route grammar).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from backends.base import Endpoint, ModelRef, Operation, Upstream
from backends.usage import Meter


class UpstreamSettings(Protocol):
    """What every kind's settings carry (each kind adds its own fields)."""

    @property
    def base_url(self) -> str | None: ...
    @property
    def model_map(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def connect_timeout(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One pass-through inference route: Envoy matches it, ext_authz parses it."""

    name: str
    method: str
    regex: str  # an Envoy safe_regex over the path without its query
    streaming: bool


@dataclass(frozen=True, slots=True)
class PassThroughRoute:
    """What a pass-through request asks for, read from its method and path alone.

    ``query`` is the query string to forward, re-serialised from the parameters the route allows
    (empty for most routes).
    """

    operation: Operation
    streaming: bool
    model: ModelRef | None
    query: str = ""


@dataclass(frozen=True, slots=True)
class PassThroughFormat:
    """A client format served byte for byte by one kind (Bedrock's REST API by ``bedrock``).

    ``parse`` returns None for a path that is not one of its routes and raises
    :class:`~backends.errors.BadModelId` for one of its routes naming a malformed model id.
    """

    name: str
    routes: tuple[RouteSpec, ...]
    parse: Callable[[str, str], PassThroughRoute | None]


@dataclass(frozen=True, slots=True)
class UpstreamKind:
    """Everything the gateway knows about one kind of upstream."""

    name: str
    settings_type: type[Any]
    validate: Callable[[str, Any], None]
    endpoint: Callable[[Any], Endpoint]
    build: Callable[[str, Any], Upstream]
    signs_body: bool
    meter: Callable[[bool], Meter]
    regional: Callable[[Any, ModelRef | None], bool]
    parse_model_id: Callable[[str], ModelRef]
    """The kind's exact model-id grammar (raises :class:`~backends.errors.BadModelId`)."""
    default_model_id: Callable[[Any, Mapping[str, str]], str | None]
    """The id an upstream of this kind receives for a model a Messages-format client names, when its
    ``model_map`` has none: chosen from the model's ids per platform (the keys of Claude Code's
    ``provider_ids``: ``first_party``, ``bedrock`` (the foundation-model id), ``vertex``); None
    when the kind has no id for the model."""
    passthrough: PassThroughFormat | None = None
