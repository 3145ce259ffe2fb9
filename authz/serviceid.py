"""How a service identity shows in an access token, a request context and a usage row.

A service token (``authz service-tokens create``) is a gateway access token whose ``sub`` is
``service:<name>`` and whose ``sid`` is ``svc:<token id>``. Session ids the portal issues are
URL-safe base64 and never contain ``:``, so the pair cannot be mistaken for a user's session; the
``sid`` is what the revocation set holds, so revoking a service token reaches every replica the way
a session's revocation does.
"""

from __future__ import annotations

SUB_PREFIX = "service:"
SID_PREFIX = "svc:"


def service_sub(name: str) -> str:
    """The ``sub`` claim of service identity ``name``'s tokens."""
    return SUB_PREFIX + name


def service_sid(token_id: str) -> str:
    """The ``sid`` claim (the revocation key) of the service token ``token_id``."""
    return SID_PREFIX + token_id


def service_identity(sub: str | None, sid: str | None) -> str | None:
    """The service identity's name when ``sub``/``sid`` are a service token's, else None."""
    if sub and sid and sub.startswith(SUB_PREFIX) and sid.startswith(SID_PREFIX):
        return sub[len(SUB_PREFIX) :]
    return None
