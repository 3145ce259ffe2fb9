"""Google Vertex AI: the ``vertex`` upstream kind.

* :mod:`backends.vertex.ids`: Vertex's Claude model-id and REST route grammars (pure);
* :mod:`backends.vertex.upstream`: Google access tokens and the configured project and region;
* this module: the ``upstreams.<name>`` settings for ``kind: vertex`` and the kind's descriptor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from backends.base import Endpoint, ModelRef, Upstream
from backends.descriptor import PassThroughFormat, UpstreamKind
from backends.errors import BackendError, BadModelId, ConfigError
from backends.jsonbody import JsonMeter
from backends.sse import SseMeter
from backends.usage import Meter
from backends.vertex import ids
from backends.vertex.upstream import (
    ApplicationDefault,
    ServiceAccountFile,
    VertexSettings,
    VertexUpstream,
    endpoint,
)

__all__ = ["KIND", "GoogleCredentials", "VertexConfig", "VertexUpstream", "settings_from_config"]


@dataclass(frozen=True, slots=True)
class GoogleCredentials:
    """Where a Vertex upstream's Google credential comes from: ``adc`` (Application Default
    Credentials) or ``service_account_file`` (``path`` to a key file)."""

    source: Literal["adc", "service_account_file"] = "adc"
    path: str | None = None


@dataclass(frozen=True, slots=True)
class VertexConfig:
    """``upstreams.<name>`` for ``kind: vertex``."""

    region: str
    project: str
    base_url: str | None = None
    credentials: GoogleCredentials = field(default_factory=GoogleCredentials)
    model_map: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 5.0


def validate(where: str, config: VertexConfig) -> None:
    """Cross-field rules; :class:`ConfigError` names the field."""
    if config.credentials.source == "service_account_file" and not config.credentials.path:
        raise ConfigError(f"{where}.credentials.path", "is required for service_account_file")
    if config.base_url is not None:
        try:
            Endpoint.parse(config.base_url)
        except BackendError as exc:
            raise ConfigError(f"{where}.base_url", str(exc)) from None
    for canonical, target in config.model_map:
        try:
            ids.parse_model_id(target)
        except BadModelId as exc:
            raise ConfigError(f"{where}.model_map.{canonical}", str(exc)) from None
    if not ids.REGION.fullmatch(config.region):
        raise ConfigError(f"{where}.region", f"{config.region!r} is not a Vertex AI region name")
    if not ids.PROJECT.fullmatch(config.project):
        raise ConfigError(f"{where}.project", f"{config.project!r} is not a Google Cloud project id")


def settings_from_config(name: str, config: VertexConfig) -> VertexSettings:
    """The runtime settings for the upstream called ``name`` (``config`` is already validated)."""
    creds = config.credentials
    credentials: ApplicationDefault | ServiceAccountFile = (
        ServiceAccountFile(creds.path or "")
        if creds.source == "service_account_file"
        else ApplicationDefault()
    )
    return VertexSettings(
        name=name,
        project=config.project,
        region=config.region,
        credentials=credentials,
        base_url=config.base_url,
        model_map=dict(config.model_map),
    )


def _build(name: str, config: VertexConfig) -> Upstream:
    return VertexUpstream(settings_from_config(name, config))


def _meter(streaming: bool) -> Meter:
    return SseMeter() if streaming else JsonMeter()


def _regional(config: VertexConfig, _model: ModelRef | None) -> bool:
    # Vertex serves from the configured region, whatever location the client's path names.
    return config.region != "global"


def _default_model_id(_config: VertexConfig, provider_ids: Mapping[str, str]) -> str | None:
    # Vertex names dated models `<name>@<date>` and newer ones by their first-party id.
    return provider_ids.get("vertex")


KIND = UpstreamKind(
    name="vertex",
    settings_type=VertexConfig,
    validate=validate,
    endpoint=lambda config: endpoint(config.region, config.base_url),
    build=_build,
    # A bearer token does not cover the body.
    signs_body=False,
    meter=_meter,
    regional=_regional,
    parse_model_id=ids.parse_model_id,
    default_model_id=_default_model_id,
    passthrough=PassThroughFormat(name="vertex", routes=ids.ROUTES, parse=ids.parse_route),
)
