"""Identity extraction from IdP claims and the admission rules, pure."""

from __future__ import annotations

from typing import Any

import pytest

from authz.signin.admission import ADMISSION_REASONS, IdpIdentity, admit, extract_identity, resolve_claim
from authz.signin.idtoken import OidcError

ISS = "https://idp.example"


def _extract(
    claims: dict[str, Any],
    userinfo: dict[str, Any] | None = None,
    *,
    groups_claim: str = "groups",
    email_claim: str = "email",
    prefer_userinfo: bool = False,
) -> IdpIdentity:
    return extract_identity(
        claims,
        userinfo,
        groups_claim=groups_claim,
        email_claim=email_claim,
        issuer=ISS,
        prefer_userinfo=prefer_userinfo,
    )


def _identity(**overrides: Any) -> IdpIdentity:
    values: dict[str, Any] = {
        "sub": "user-1",
        "email": "ada@example.com",
        "email_verified": True,
        "groups": ("eng",),
        "sid": None,
        "issuer": ISS,
    }
    values.update(overrides)
    return IdpIdentity(**values)


def _admit(identity: IdpIdentity, domains: tuple[str, ...] = (), groups: tuple[str, ...] = ()) -> str | None:
    reason = admit(identity, allowed_email_domains=domains, allowed_groups=groups)
    assert reason is None or reason in ADMISSION_REASONS
    return reason


# --- claim resolution -----------------------------------------------------------------------------


def test_flat_groups_claim_is_read() -> None:
    """A top-level groups claim becomes the identity's groups, in order."""
    identity = _extract({"sub": "u", "groups": ["eng", "ml"], "sid": "s-1", "email": "a@x.com"})
    assert identity == IdpIdentity("u", "a@x.com", None, ("eng", "ml"), "s-1", ISS)


def test_json_pointer_groups_claim_is_read() -> None:
    """An RFC 6901 pointer reaches nested roles such as Keycloak's realm_access.roles."""
    claims = {"sub": "u", "realm_access": {"roles": ["admin", "dev"]}}
    assert _extract(claims, groups_claim="/realm_access/roles").groups == ("admin", "dev")


def test_json_pointer_unescapes_tilde_and_slash() -> None:
    """~1 and ~0 decode to / and ~ in pointer tokens."""
    claims = {"a/b": {"m~n": ["g"]}}
    assert resolve_claim(claims, "/a~1b/m~0n") == ["g"]


def test_json_pointer_indexes_arrays() -> None:
    """A numeric token indexes into an array; out of range or leading zeros resolve to nothing."""
    claims = {"orgs": [{"teams": ["t1"]}, {"teams": ["t2"]}]}
    assert resolve_claim(claims, "/orgs/1/teams") == ["t2"]
    assert resolve_claim(claims, "/orgs/2/teams") is None
    assert resolve_claim(claims, "/orgs/01/teams") is None


def test_missing_groups_claim_gives_no_groups() -> None:
    """Without the claim the user has no groups."""
    assert _extract({"sub": "u"}, groups_claim="/realm_access/roles").groups == ()


def test_single_string_group_and_junk_members() -> None:
    """A string claim is one group; non-string members and duplicates are dropped."""
    assert _extract({"sub": "u", "groups": "eng"}).groups == ("eng",)
    assert _extract({"sub": "u", "groups": ["eng", 3, None, "eng", "ml"]}).groups == ("eng", "ml")


def test_custom_email_claim_is_read() -> None:
    """email_claim selects which claim holds the address."""
    identity = _extract({"sub": "u", "upn": "ada@corp.example", "email": "x@y.z"}, email_claim="upn")
    assert identity.email == "ada@corp.example"


@pytest.mark.parametrize(
    ("raw", "parsed"), [(True, True), (False, False), ("false", False), ("TRUE", True), (1, None)]
)
def test_email_verified_is_parsed(raw: Any, parsed: bool | None) -> None:
    """email_verified accepts booleans and the "true"/"false" strings some IdPs send."""
    assert _extract({"sub": "u", "email": "a@x.com", "email_verified": raw}).email_verified is parsed


def test_missing_sub_is_malformed() -> None:
    """Claims without a sub cannot name a user."""
    with pytest.raises(OidcError) as info:
        _extract({"email": "a@x.com"})
    assert info.value.reason == "malformed"


# --- userinfo -------------------------------------------------------------------------------------


def test_userinfo_fills_claims_missing_from_the_id_token() -> None:
    """Groups and email absent from the ID token come from userinfo."""
    userinfo = {"sub": "u", "groups": ["eng"], "email": "a@x.com", "email_verified": True}
    identity = _extract({"sub": "u"}, userinfo)
    assert (identity.groups, identity.email, identity.email_verified) == (("eng",), "a@x.com", True)


def test_id_token_wins_unless_userinfo_is_preferred() -> None:
    """ID token values win by default; use_userinfo makes userinfo's win."""
    claims = {"sub": "u", "groups": ["old"], "email": "a@x.com"}
    userinfo = {"sub": "u", "groups": ["new"], "email": "b@x.com"}
    assert _extract(claims, userinfo).groups == ("old",)
    preferred = _extract(claims, userinfo, prefer_userinfo=True)
    assert (preferred.groups, preferred.email) == (("new",), "b@x.com")


def test_userinfo_for_another_sub_is_refused() -> None:
    """userinfo whose sub differs from the ID token's is refused (OIDC Core 5.3.4)."""
    with pytest.raises(OidcError) as info:
        _extract({"sub": "u"}, {"sub": "someone-else", "email": "evil@x.com"})
    assert info.value.reason == "userinfo_sub_mismatch"


def test_email_verified_false_from_the_other_source_applies_to_the_same_address() -> None:
    """email_verified false in userinfo applies when the ID token has the same email and no flag."""
    identity = _extract(
        {"sub": "u", "email": "a@x.com"}, {"sub": "u", "email": "A@x.com", "email_verified": False}
    )
    assert identity.email_verified is False


def test_email_verified_is_not_borrowed_for_a_different_address() -> None:
    """A verified flag for another address in userinfo never vouches for the ID token's email."""
    identity = _extract(
        {"sub": "u", "email": "a@x.com"}, {"sub": "u", "email": "b@y.com", "email_verified": True}
    )
    assert identity.email_verified is None


# --- admission ------------------------------------------------------------------------------------


def test_admitted_identity_gets_none() -> None:
    """An identity satisfying every rule is admitted."""
    assert _admit(_identity(), domains=("example.com",), groups=("eng",)) is None


def test_empty_rules_admit_anyone_with_an_email() -> None:
    """No domain and no group rules admit any identity with an email."""
    assert _admit(_identity(groups=(), email_verified=None)) is None


def test_email_not_verified_is_always_refused() -> None:
    """email_verified false is refused even with no rules at all."""
    assert _admit(_identity(email_verified=False)) == "email_not_verified"
    assert _admit(_identity(email_verified=False), domains=("example.com",)) == "email_not_verified"


def test_missing_email_is_refused() -> None:
    """An identity without an email is refused."""
    assert _admit(_identity(email=None)) == "no_email"


def test_domain_compare_is_case_insensitive() -> None:
    """Email and configured domains compare case-insensitively."""
    assert _admit(_identity(email="Ada@EXAMPLE.com"), domains=("Example.COM",)) is None
    assert _admit(_identity(email="ada@example.com"), domains=("@example.com",)) is None


def test_other_domain_is_refused() -> None:
    """An email outside the allowed domains is refused; subdomains and look-alikes too."""
    for email in ("ada@evil.com", "ada@eng.example.com", "ada@example.com.evil.com", "example.com"):
        assert _admit(_identity(email=email), domains=("example.com",)) == "email_domain_not_allowed"


def test_domain_is_taken_after_the_last_at_sign() -> None:
    """A local part containing @example.com does not smuggle in the domain."""
    assert _admit(_identity(email='"x@example.com"@evil.com'), domains=("example.com",)) == (
        "email_domain_not_allowed"
    )


def test_group_not_allowed() -> None:
    """A user sharing no group with the allowed list is refused."""
    assert _admit(_identity(groups=("sales",)), groups=("eng", "ml")) == "group_not_allowed"
    assert _admit(_identity(groups=()), groups=("eng",)) == "group_not_allowed"


def test_group_compare_is_exact() -> None:
    """Group names are compared exactly (they are IdP identifiers)."""
    assert _admit(_identity(groups=("ENG",)), groups=("eng",)) == "group_not_allowed"
    assert _admit(_identity(groups=("sales", "eng")), groups=("eng",)) is None
