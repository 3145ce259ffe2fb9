"""The root of the gateway's exception hierarchy, shared by ``backends/`` and ``authz/``.

``backends/`` may import nothing from ``authz/``, so the errors both packages raise live here;
:mod:`authz.errors` adds the rest of the tree and documents it whole. Messages say what failed
and what to do about it, and never carry a secret.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration file is invalid; the message names the field (``upstreams.main.region``)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class BackendError(GatewayError):
    """A backend could not prepare a request: a credential fetch failed, a setting is unusable, ...

    Messages say what failed and never carry a secret (no keys, tokens or signatures), so they
    are safe to log; callers still send clients a generic message because they may name ARNs.
    """


class BadModelId(GatewayError):
    """A client named a model id that is not one of the upstream's exact id forms."""
