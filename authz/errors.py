"""The gateway's exception hierarchy.

Every error the gateway raises on purpose derives from :class:`GatewayError`, so callers can catch
one type at a boundary. Third-party errors are wrapped where they enter (``raise X(...) from exc``).
Messages say what failed and what to do about it, and never carry a secret.
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


class TokenError(GatewayError):
    """A gateway access token is missing, malformed, badly signed, expired or revoked."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StoreError(GatewayError):
    """PostgreSQL could not be reached or refused a statement."""


class UpstreamError(GatewayError):
    """An upstream could not be prepared for (credentials, signing)."""
