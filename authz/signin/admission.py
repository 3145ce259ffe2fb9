"""Who the IdP says the user is, and whether the gateway lets them in.

:func:`extract_identity` turns validated ID token claims (and optionally userinfo) into an
:class:`IdpIdentity`; :func:`admit` applies the configured admission rules to it. Both are pure:
no I/O, plain data in and out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from authz.signin.idtoken import OidcError

ADMISSION_REASONS = frozenset(
    {"email_not_verified", "no_email", "email_domain_not_allowed", "group_not_allowed"}
)

# RFC 6901 §4: an array index is "0" or digits without a leading zero.
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_MISSING = object()


@dataclass(frozen=True, slots=True)
class IdpIdentity:
    """The user as the IdP describes them, after claim mapping."""

    sub: str
    email: str | None
    email_verified: bool | None
    groups: tuple[str, ...]
    sid: str | None
    issuer: str


def resolve_claim(claims: Mapping[str, Any], name: str) -> Any:
    """The value ``name`` designates in ``claims``, or None when absent.

    ``name`` is a top-level claim name (``groups``), or, when it starts with ``/``, an RFC 6901
    JSON pointer into nested claims (``/realm_access/roles``).
    """
    if not name.startswith("/"):
        return claims.get(name)
    node: Any = claims
    for raw in name[1:].split("/"):
        # RFC 6901 §4: unescape ~1 before ~0, so "~01" becomes "~1" and not "/".
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping):
            node = node.get(token, _MISSING)
        elif isinstance(node, list) and _ARRAY_INDEX.fullmatch(token) and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
        if node is _MISSING:
            return None
    return node


def _groups(value: Any) -> tuple[str, ...] | None:
    """Group names from a claim value: a list of strings or one string; None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        items: Iterable[Any] = (value,)
    elif isinstance(value, list | tuple):
        items = value
    else:
        return ()
    # Keep the IdP's order, drop duplicates and anything that is not a name.
    return tuple(dict.fromkeys(g for g in items if isinstance(g, str) and g))


def _email(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _verified(value: Any) -> bool | None:
    """``email_verified`` (OIDC Core §5.1) as a bool; some IdPs send "true"/"false" strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def extract_identity(
    claims: Mapping[str, Any],
    userinfo: Mapping[str, Any] | None,
    *,
    groups_claim: str,
    email_claim: str,
    issuer: str,
    prefer_userinfo: bool = False,
) -> IdpIdentity:
    """Build the identity from validated ID token ``claims`` and optional ``userinfo``.

    Groups and email come from the ID token and fall back to userinfo where the token lacks them;
    with ``prefer_userinfo`` (the ``use_userinfo`` setting) userinfo wins where it has a value.
    ``email_verified`` is taken from the source the email came from. Raises OidcError
    ``userinfo_sub_mismatch`` when userinfo describes another user (OIDC Core §5.3.4).
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise OidcError("malformed", "the ID token has no sub")
    sources: list[Mapping[str, Any]] = [claims]
    if userinfo is not None:
        # OIDC Core §5.3.4: userinfo's sub MUST equal the ID token's, else its values are not used
        # (it may be a substituted response).
        if userinfo.get("sub") != sub:
            raise OidcError("userinfo_sub_mismatch", "userinfo describes a different user than the ID token")
        sources = [userinfo, claims] if prefer_userinfo else [claims, userinfo]

    groups: tuple[str, ...] = ()
    for source in sources:
        found = _groups(resolve_claim(source, groups_claim))
        if found is not None:
            groups = found
            break

    email: str | None = None
    verified: bool | None = None
    for i, source in enumerate(sources):
        email = _email(resolve_claim(source, email_claim))
        if email is None:
            continue
        verified = _verified(source.get("email_verified"))
        if verified is None:
            # The other source may state email_verified for the same address; never borrow it for
            # a different one.
            for other in sources[:i] + sources[i + 1 :]:
                other_email = _email(resolve_claim(other, email_claim))
                if other_email is None or other_email.lower() == email.lower():
                    verified = _verified(other.get("email_verified"))
                    if verified is not None:
                        break
        break

    sid = claims.get("sid")
    return IdpIdentity(
        sub=sub,
        email=email,
        email_verified=verified,
        groups=groups,
        sid=sid if isinstance(sid, str) and sid else None,
        issuer=issuer,
    )


def _domain(value: str) -> str:
    """A domain for case-insensitive comparison: lower case, without "@" or a trailing dot."""
    return value.strip().lstrip("@").rstrip(".").lower()


def admit(
    identity: IdpIdentity,
    *,
    allowed_email_domains: Iterable[str],
    allowed_groups: Iterable[str],
) -> str | None:
    """None when ``identity`` may sign in, else the reason it may not.

    Reasons, checked in this order: ``email_not_verified`` (always, even with no rules: the IdP
    says the address may not be the user's), ``no_email`` (sessions, audit and revocation by user
    are keyed on the email), ``email_domain_not_allowed`` (exact domain, case-insensitive; an empty
    list admits any) and ``group_not_allowed`` (at least one shared group; an empty list admits
    any). Subdomains are not implied: list each domain to admit.
    """
    if identity.email_verified is False:
        return "email_not_verified"
    if not identity.email:
        return "no_email"
    domains = {_domain(d) for d in allowed_email_domains if _domain(d)}
    if domains:
        local, at, host = identity.email.rpartition("@")
        if not (local and at) or _domain(host) not in domains:
            return "email_domain_not_allowed"
    groups = set(allowed_groups)
    if groups and groups.isdisjoint(identity.groups):
        return "group_not_allowed"
    return None
