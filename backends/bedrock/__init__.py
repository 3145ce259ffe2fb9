"""Amazon Bedrock: the ``bedrock`` upstream kind.

* :mod:`backends.bedrock.ids`: Bedrock's model-id and REST route grammars (pure);
* :mod:`backends.bedrock.upstream`: AWS credentials and SigV4 signing;
* this module: the ``upstreams.<name>`` settings for ``kind: bedrock`` and the kind's descriptor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from backends.base import Endpoint, ModelRef, Upstream
from backends.bedrock import ids
from backends.bedrock.upstream import (
    AssumeRole,
    BedrockSettings,
    BedrockUpstream,
    DefaultChain,
    StaticKeys,
    endpoint,
)
from backends.descriptor import PassThroughFormat, UpstreamKind
from backends.errors import BackendError, BadModelId, ConfigError
from backends.eventstream import EventStreamMeter
from backends.jsonbody import JsonMeter
from backends.usage import Meter

__all__ = ["KIND", "AwsCredentials", "BedrockConfig", "BedrockUpstream", "settings_from_config"]

_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)+")


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """Where a Bedrock upstream's AWS credential comes from.

    ``default`` (the AWS default chain), ``static`` (access key id and secret, optional session
    token) or ``assume_role`` (STS AssumeRole with ``role_arn``, optional ``external_id``; the user
    is recorded as SourceIdentity and a session tag; static keys, when given, are its source).
    """

    source: Literal["default", "static", "assume_role"] = "default"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    duration_seconds: int = 3600
    sts_endpoint_url: str | None = None
    sts_region: str | None = None


@dataclass(frozen=True, slots=True)
class BedrockConfig:
    """``upstreams.<name>`` for ``kind: bedrock``."""

    region: str
    base_url: str | None = None
    fips: bool = False
    credentials: AwsCredentials = field(default_factory=AwsCredentials)
    model_map: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 5.0


def validate(where: str, config: BedrockConfig) -> None:
    """Cross-field rules; :class:`ConfigError` names the field."""
    creds = config.credentials
    if creds.source == "static" and not (creds.access_key_id and creds.secret_access_key):
        raise ConfigError(f"{where}.credentials", "static needs access_key_id and secret_access_key")
    if creds.source == "assume_role" and not creds.role_arn:
        raise ConfigError(f"{where}.credentials.role_arn", "is required for assume_role")
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
    if not _REGION.fullmatch(config.region):
        raise ConfigError(f"{where}.region", f"{config.region!r} is not an AWS region name")


def settings_from_config(name: str, config: BedrockConfig) -> BedrockSettings:
    """The runtime settings for the upstream called ``name`` (``config`` is already validated)."""
    creds = config.credentials
    credentials: StaticKeys | DefaultChain | AssumeRole
    if creds.source == "static":
        credentials = StaticKeys(
            creds.access_key_id or "", creds.secret_access_key or "", creds.session_token
        )
    elif creds.source == "assume_role":
        source: StaticKeys | DefaultChain = DefaultChain()
        if creds.access_key_id and creds.secret_access_key:
            source = StaticKeys(creds.access_key_id, creds.secret_access_key, creds.session_token)
        credentials = AssumeRole(
            role_arn=creds.role_arn or "",
            external_id=creds.external_id,
            duration_seconds=creds.duration_seconds,
            source_credentials=source,
            sts_endpoint_url=creds.sts_endpoint_url,
            sts_region=creds.sts_region,
        )
    else:
        credentials = DefaultChain()
    return BedrockSettings(
        name=name,
        region=config.region,
        credentials=credentials,
        base_url=config.base_url,
        fips=config.fips,
        model_map=dict(config.model_map),
    )


def _build(name: str, config: BedrockConfig) -> Upstream:
    return BedrockUpstream(settings_from_config(name, config))


def _meter(streaming: bool) -> Meter:
    return EventStreamMeter() if streaming else JsonMeter()


def _regional(_config: BedrockConfig, model: ModelRef | None) -> bool:
    # The profile decides: only `global.` profiles are served from global capacity.
    return model.regional if model is not None else True


# Cross-region inference profiles keep requests in the geography of the upstream's region; a region
# outside these geographies gets the global profile.
# https://docs.aws.amazon.com/bedrock/latest/userguide/inference-profiles-support.html
_GEOGRAPHIES = (("us-gov-", "us-gov"), ("us-", "us"), ("eu-", "eu"), ("ap-", "apac"))


def profile_geography(region: str) -> str:
    """The inference-profile prefix for requests sent from ``region``."""
    return next((geo for prefix, geo in _GEOGRAPHIES if region.startswith(prefix)), "global")


def _default_model_id(config: BedrockConfig, provider_ids: Mapping[str, str]) -> str | None:
    # Claude Code's own Bedrock ids are the `us.` profiles of these foundation models; the geography
    # follows the upstream's region so that requests stay where the operator put the upstream.
    foundation = provider_ids.get("bedrock")
    return f"{profile_geography(config.region)}.{foundation}" if foundation else None


KIND = UpstreamKind(
    name="bedrock",
    settings_type=BedrockConfig,
    validate=validate,
    endpoint=lambda config: endpoint(config.region, config.base_url, fips=config.fips),
    build=_build,
    # SigV4 signs the SHA-256 of the exact body sent.
    signs_body=True,
    meter=_meter,
    regional=_regional,
    parse_model_id=ids.parse_model_id,
    default_model_id=_default_model_id,
    passthrough=PassThroughFormat(name="bedrock", routes=ids.ROUTES, parse=ids.parse_route),
)
