"""Builds the upstream a configuration entry describes; one branch per upstream kind."""

from __future__ import annotations

from backends.base import BackendError, Upstream
from backends.bedrock import BedrockSettings, BedrockUpstream
from backends.vertex import VertexSettings, VertexUpstream


def build_upstream(settings: BedrockSettings | VertexSettings) -> Upstream:
    """Return the upstream for ``settings``; raise :class:`BackendError` for an unknown kind.

    Settings that are valid dataclasses but unusable (a bad region, an http base_url to a remote
    host) also raise :class:`BackendError`, so a bad configuration fails at load, not per request.
    """
    if isinstance(settings, BedrockSettings):
        return BedrockUpstream(settings)
    if isinstance(settings, VertexSettings):
        return VertexUpstream(settings)
    # Reachable when a caller passes a settings type added to the config loader but not here.
    raise BackendError(f"unknown upstream kind {type(settings).__name__!r}: no backend builds it")
