"""ID token (OIDC Core §3.1.3.7) and back-channel logout token (§2.6) validation, pure."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from authz.signin.idtoken import (
    BACKCHANNEL_LOGOUT_EVENT,
    ID_TOKEN_REASONS,
    LOGOUT_TOKEN_REASONS,
    OidcError,
    validate_id_token,
    validate_logout_token,
)

ISS = "https://idp.example"
CLIENT = "gateway-client"
NOW = 1_800_000_000
SKEW = 60
ALGS = ("RS256", "ES256")

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
FOREIGN_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = dict(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
    else:
        jwk = dict(ECAlgorithm.to_jwk(key.public_key(), as_dict=True))
    jwk.update({"kid": kid, "use": "sig", **extra})
    return jwk


JWKS = {"keys": [_jwk(RSA_KEY, "rsa-1"), _jwk(EC_KEY, "ec-1")]}


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISS,
        "sub": "user-1",
        "aud": CLIENT,
        "exp": NOW + 300,
        "iat": NOW,
        "nonce": "n-123",
        "email": "ada@example.com",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(
    claims: dict[str, Any], *, key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa-1"
) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def _id(token: str, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "jwks": JWKS,
        "issuer": ISS,
        "client_id": CLIENT,
        "algorithms": ALGS,
        "nonce": "n-123",
        "now": float(NOW),
        "skew": SKEW,
    }
    args.update(kw)
    return validate_id_token(token, **args)


def _reason(token: str, **kw: Any) -> str:
    with pytest.raises(OidcError) as info:
        _id(token, **kw)
    assert info.value.reason in ID_TOKEN_REASONS
    return info.value.reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(claims: dict[str, Any], secret: bytes, kid: str = "rsa-1") -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = _b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(sig)}"


# --- ID tokens: what passes ----------------------------------------------------------------------


def test_valid_rs256_token_returns_its_claims() -> None:
    """A well-formed RS256 ID token signed by the IdP's key yields its claims."""
    claims = _id(_sign(_claims()))
    assert claims["sub"] == "user-1"
    assert claims["email"] == "ada@example.com"


def test_valid_es256_token_is_accepted() -> None:
    """An ES256 token signed with the IdP's EC key verifies through its kid."""
    assert _id(_sign(_claims(), key=EC_KEY, alg="ES256", kid="ec-1"))["sub"] == "user-1"


def test_token_without_kid_is_accepted_when_the_jwks_has_one_key() -> None:
    """OIDC Core 10.1 lets a token omit kid when the IdP publishes a single key."""
    token = _sign(_claims(), kid=None)
    assert _id(token, jwks={"keys": [_jwk(RSA_KEY, "only")]})["sub"] == "user-1"


def test_several_audiences_with_azp_equal_to_client_are_accepted() -> None:
    """Multiple audiences pass when azp names this client."""
    token = _sign(_claims(aud=[CLIENT, "other"], azp=CLIENT))
    assert _id(token)["azp"] == CLIENT


def test_exp_and_iat_within_the_skew_are_accepted() -> None:
    """exp just passed and iat slightly ahead are tolerated within the clock skew."""
    token = _sign(_claims(exp=NOW - SKEW + 1, iat=NOW + SKEW - 1))
    assert _id(token)["sub"] == "user-1"


def test_no_expected_nonce_ignores_the_tokens_nonce() -> None:
    """A refreshed ID token (nonce=None) passes with or without a nonce claim."""
    assert _id(_sign(_claims(nonce=None)), nonce=None)["sub"] == "user-1"
    assert _id(_sign(_claims()), nonce=None)["sub"] == "user-1"


# --- ID tokens: algorithm and key ----------------------------------------------------------------


def test_alg_none_is_refused() -> None:
    """An unsigned token (alg none) is refused before any key is looked at."""
    token = jwt.encode(_claims(), None, algorithm="none", headers={"kid": "rsa-1"})
    assert _reason(token) == "bad_algorithm"


def test_alg_none_is_refused_even_if_listed() -> None:
    """Listing none among the algorithms never makes an unsigned token acceptable."""
    token = jwt.encode(_claims(), None, algorithm="none")
    assert _reason(token, algorithms=("none", "RS256")) == "bad_algorithm"


def test_hs256_signed_with_the_idp_public_key_is_refused() -> None:
    """The algorithm-confusion forgery (HMAC keyed with the IdP's public key) is refused."""
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = _hs256(_claims(), public_pem)
    assert _reason(token) == "bad_algorithm"
    assert _reason(token, algorithms=("HS256", "RS256")) == "bad_algorithm"


def test_algorithm_outside_the_pinned_list_is_refused() -> None:
    """A PS256 token is refused when only RS256 and ES256 are pinned."""
    assert _reason(_sign(_claims(), alg="PS256")) == "bad_algorithm"


def test_algorithm_that_does_not_fit_the_key_type_is_refused() -> None:
    """An ES256 token naming the IdP's RSA key is refused."""
    assert _reason(_sign(_claims(), key=EC_KEY, alg="ES256", kid="rsa-1")) == "bad_algorithm"


def test_algorithm_other_than_the_jwk_alg_is_refused() -> None:
    """A key published with alg RS256 never verifies a PS256 token (RFC 7517 4.4)."""
    jwks = {"keys": [_jwk(RSA_KEY, "rsa-1", alg="RS256")]}
    token = _sign(_claims(), alg="PS256")
    assert _reason(token, jwks=jwks, algorithms=("RS256", "PS256")) == "bad_algorithm"


def test_foreign_key_with_a_known_kid_is_a_bad_signature() -> None:
    """A token signed by another key under the IdP's kid fails signature verification."""
    assert _reason(_sign(_claims(), key=FOREIGN_RSA)) == "bad_signature"


def test_tampered_payload_is_a_bad_signature() -> None:
    """Changing the payload after signing breaks the signature."""
    header, _, sig = _sign(_claims()).split(".")
    forged = _b64(json.dumps(_claims(sub="admin")).encode())
    assert _reason(f"{header}.{forged}.{sig}") == "bad_signature"


def test_unknown_kid_is_reported() -> None:
    """A kid absent from the JWKS is unknown_kid (the client then re-fetches the JWKS once)."""
    assert _reason(_sign(_claims(), kid="rotated-2")) == "unknown_kid"


def test_missing_kid_with_several_keys_is_unknown_kid() -> None:
    """Without a kid, a JWKS of several keys gives no key to use (OIDC Core 10.1)."""
    assert _reason(_sign(_claims(), kid=None)) == "unknown_kid"


def test_encryption_keys_never_verify() -> None:
    """A JWK published with use=enc is not a signature key."""
    jwks = {"keys": [_jwk(RSA_KEY, "rsa-1", use="enc")]}
    assert _reason(_sign(_claims()), jwks=jwks) == "unknown_kid"


def test_embedded_jwk_header_is_ignored() -> None:
    """A key carried in the token's own jwk header is never trusted (RFC 8725 3.10)."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    headers = {"kid": "rsa-1", "jwk": _jwk(attacker, "rsa-1")}
    token = jwt.encode(_claims(), attacker, algorithm="RS256", headers=headers)
    assert _reason(token) == "bad_signature"


# --- ID tokens: claims ---------------------------------------------------------------------------


def test_wrong_issuer_is_refused() -> None:
    """iss must equal the configured issuer exactly."""
    assert _reason(_sign(_claims(iss="https://evil.example"))) == "wrong_issuer"


def test_issuer_with_a_trailing_slash_is_refused() -> None:
    """iss comparison is exact: a trailing slash is a different issuer."""
    assert _reason(_sign(_claims(iss=ISS + "/"))) == "wrong_issuer"


def test_wrong_audience_is_refused() -> None:
    """aud must contain this client's id."""
    assert _reason(_sign(_claims(aud="another-client"))) == "wrong_audience"


def test_several_audiences_without_azp_are_refused() -> None:
    """Multiple audiences require azp."""
    assert _reason(_sign(_claims(aud=[CLIENT, "other"]))) == "wrong_azp"


def test_azp_naming_another_client_is_refused() -> None:
    """An azp different from the client id is refused, with one or several audiences."""
    assert _reason(_sign(_claims(azp="other"))) == "wrong_azp"
    assert _reason(_sign(_claims(aud=[CLIENT, "other"], azp="other"))) == "wrong_azp"


def test_expired_token_is_refused() -> None:
    """A token past exp plus the skew is expired."""
    assert _reason(_sign(_claims(exp=NOW - SKEW, iat=NOW - 400))) == "expired"


def test_iat_in_the_future_is_refused() -> None:
    """A token issued beyond the skew in the future is refused."""
    assert _reason(_sign(_claims(iat=NOW + SKEW + 5, exp=NOW + 900))) == "iat_in_future"


def test_stale_iat_is_refused() -> None:
    """A token issued more than ten minutes (plus skew) ago is refused even if not expired."""
    assert _reason(_sign(_claims(iat=NOW - 600 - SKEW - 1, exp=NOW + 3600))) == "stale_iat"


def test_nbf_in_the_future_is_refused() -> None:
    """nbf beyond the skew makes the token not yet valid."""
    assert _reason(_sign(_claims(nbf=NOW + SKEW + 5))) == "not_yet_valid"


def test_nonce_mismatch_is_refused() -> None:
    """The nonce must equal the one sent with the authentication request."""
    assert _reason(_sign(_claims(nonce="other"))) == "nonce_mismatch"


def test_missing_nonce_is_refused_when_one_is_expected() -> None:
    """A token without a nonce fails when the request carried one."""
    assert _reason(_sign(_claims(nonce=None))) == "nonce_mismatch"


def test_sub_must_match_on_refresh() -> None:
    """A refreshed ID token naming another user is refused (OIDC Core 12.2)."""
    token = _sign(_claims(nonce=None))
    assert _id(token, nonce=None, expected_sub="user-1")["sub"] == "user-1"
    assert _reason(token, nonce=None, expected_sub="user-2") == "sub_mismatch"


@pytest.mark.parametrize("missing", ["sub", "exp", "iat", "aud", "iss"])
def test_missing_required_claim_is_malformed(missing: str) -> None:
    """Each claim OIDC Core 2 requires must be present."""
    claims = _claims()
    del claims[missing]
    assert _reason(_sign(claims)) == "malformed"


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "a.b.c.d.e", "x" * 70000])
def test_garbage_is_malformed(token: str) -> None:
    """Anything that is not a compact JWS is malformed."""
    assert _reason(token) == "malformed"


def test_non_numeric_exp_is_malformed() -> None:
    """exp must be a NumericDate, not a string."""
    assert _reason(_sign(_claims(exp=str(NOW + 300)))) == "malformed"


# --- logout tokens --------------------------------------------------------------------------------


def _logout_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISS,
        "aud": CLIENT,
        "iat": NOW,
        "jti": "jti-1",
        "sub": "user-1",
        "sid": "sid-1",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _logout(token: str, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "jwks": JWKS,
        "issuer": ISS,
        "client_id": CLIENT,
        "algorithms": ALGS,
        "now": float(NOW),
        "skew": SKEW,
    }
    args.update(kw)
    return validate_logout_token(token, **args)


def _logout_reason(token: str, **kw: Any) -> str:
    with pytest.raises(OidcError) as info:
        _logout(token, **kw)
    assert info.value.reason in LOGOUT_TOKEN_REASONS
    return info.value.reason


def test_valid_logout_token_returns_its_claims() -> None:
    """A signed logout token with events, sid and jti passes."""
    claims = _logout(_sign(_logout_claims(), key=EC_KEY, alg="ES256", kid="ec-1"))
    assert claims["sid"] == "sid-1"
    assert claims["jti"] == "jti-1"


def test_logout_token_with_only_sid_or_only_sub_passes() -> None:
    """Either sub or sid is enough."""
    assert _logout(_sign(_logout_claims(sub=None)))["sid"] == "sid-1"
    assert _logout(_sign(_logout_claims(sid=None)))["sub"] == "user-1"


def test_logout_token_without_sub_and_sid_is_refused() -> None:
    """A logout token must name a user or a session."""
    assert _logout_reason(_sign(_logout_claims(sub=None, sid=None))) == "logout_missing_sub_sid"


@pytest.mark.parametrize(
    "events",
    [None, {}, {"http://schemas.openid.net/event/other": {}}, {BACKCHANNEL_LOGOUT_EVENT: "yes"}, "x"],
)
def test_logout_token_without_the_logout_event_is_refused(events: Any) -> None:
    """events must be an object whose back-channel logout member is an object."""
    assert _logout_reason(_sign(_logout_claims(events=events))) == "logout_missing_events"


def test_logout_token_with_a_nonce_is_refused() -> None:
    """A nonce is forbidden in logout tokens."""
    assert _logout_reason(_sign(_logout_claims(nonce="n"))) == "logout_nonce_present"


def test_id_token_is_not_accepted_as_a_logout_token() -> None:
    """An ID token (no events claim, a nonce) never passes as a logout token."""
    assert _logout_reason(_sign(_claims())).startswith("logout_")


def test_logout_token_without_jti_is_refused() -> None:
    """jti is required so the caller can refuse replays."""
    assert _logout_reason(_sign(_logout_claims(jti=None))) == "logout_missing_jti"


def test_stale_logout_token_is_refused() -> None:
    """A logout token issued more than five minutes (plus skew) ago is refused."""
    assert _logout_reason(_sign(_logout_claims(iat=NOW - 300 - SKEW - 1))) == "logout_stale_iat"


def test_logout_token_from_the_future_is_refused() -> None:
    """A logout token issued beyond the skew in the future is refused."""
    assert _logout_reason(_sign(_logout_claims(iat=NOW + SKEW + 1))) == "logout_iat_in_future"


def test_logout_token_without_iat_is_refused() -> None:
    """iat is required."""
    assert _logout_reason(_sign(_logout_claims(iat=None))) == "logout_malformed"


def test_expired_logout_token_is_refused() -> None:
    """An exp, when present, is respected."""
    assert _logout_reason(_sign(_logout_claims(exp=NOW - SKEW))) == "logout_expired"


def test_logout_token_with_wrong_audience_is_refused() -> None:
    """aud must contain this client."""
    assert _logout_reason(_sign(_logout_claims(aud="other"))) == "logout_wrong_audience"


def test_logout_token_with_wrong_issuer_is_refused() -> None:
    """iss must be the IdP's exactly."""
    assert _logout_reason(_sign(_logout_claims(iss="https://evil.example"))) == "logout_wrong_issuer"


def test_unsigned_logout_token_is_refused() -> None:
    """alg none is refused for logout tokens too."""
    token = jwt.encode(_logout_claims(), None, algorithm="none", headers={"kid": "rsa-1"})
    assert _logout_reason(token) == "logout_bad_algorithm"


def test_logout_token_signed_by_a_foreign_key_is_refused() -> None:
    """A logout token signed by a key that is not the IdP's fails verification."""
    assert _logout_reason(_sign(_logout_claims(), key=FOREIGN_RSA)) == "logout_bad_signature"


def test_logout_token_with_unknown_kid_is_refused() -> None:
    """An unknown kid is reported with the logout prefix."""
    assert _logout_reason(_sign(_logout_claims(), kid="nope")) == "logout_unknown_kid"
