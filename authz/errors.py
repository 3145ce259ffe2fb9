"""The gateway's exception hierarchy, documented whole.

Every error the gateway raises on purpose derives from :class:`GatewayError`, so callers can catch
one type at a boundary. Third-party errors are wrapped where they enter (``raise X(...) from exc``).
Messages say what failed and what to do about it, and never carry a secret.

    GatewayError                    (backends.errors: shared with backends/)
    ├── ConfigError                 the configuration names a bad field
    ├── BackendError                an upstream cannot be prepared for (credentials, settings)
    ├── BadModelId                  a model id outside the upstream's exact id forms
    ├── TokenError                  a gateway access token is missing, bad, expired or revoked
    ├── StoreError                  PostgreSQL could not be reached or refused a statement
    └── ExportError                 an OTLP collector did not take an export request
"""

from __future__ import annotations

from backends.errors import BackendError, BadModelId, ConfigError, GatewayError

__all__ = [
    "BackendError",
    "BadModelId",
    "ConfigError",
    "ExportError",
    "GatewayError",
    "StoreError",
    "TokenError",
]


class TokenError(GatewayError):
    """A gateway access token is missing, malformed, badly signed, expired or revoked."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StoreError(GatewayError):
    """PostgreSQL could not be reached or refused a statement."""


class ExportError(GatewayError):
    """An OTLP collector did not take an export request (after the retries it was due)."""
