"""Gateway access tokens: minting, verification failures, key rotation, JWKS and the cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from authz.configtypes import Sessions, SigningKey
from authz.errors import ConfigError, TokenError
from authz.signin.tokens import (
    Claims,
    KeySet,
    TokenVerifier,
    generate_signing_key,
    mint,
)

ISS = "https://gateway.example"
AUD = "claude-gateway"
NOW = 1_800_000_000.0
SKEW = 30


def _keyset(*, signing: SigningKey | None = None, verify: tuple[SigningKey, ...] = ()) -> KeySet:
    return KeySet.from_config(
        Sessions(
            issuer=ISS, audience=AUD, signing_key=signing or generate_signing_key("k1"), verify_keys=verify
        )
    )


def _verifier(keyset: KeySet, **kw: Any) -> TokenVerifier:
    return TokenVerifier(keyset, issuer=ISS, audience=AUD, clock_skew=SKEW, **kw)


def _mint(keyset: KeySet, *, now: float = NOW, ttl: int = 900, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "issuer": ISS,
        "audience": AUD,
        "sub": "user-1",
        "email": "ada@example.com",
        "groups": ("eng", "ml"),
        "sid": "sess-1",
    }
    args.update(overrides)
    return mint(keyset, ttl=ttl, now=now, **args)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "email": "ada@example.com",
        "groups": ["eng"],
        "sid": "sess-1",
        "iat": int(NOW),
        "exp": int(NOW) + 900,
        "jti": "jti-1",
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def _private(key: SigningKey) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    private = serialization.load_pem_private_key((key.private_key or "").encode(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
    return private


def _sign_with(key: SigningKey, payload: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(
        payload,
        _private(key),
        algorithm=key.algorithm,
        headers={"kid": key.kid, "typ": "at+jwt", **(headers or {})},
    )


def _reason(verifier: TokenVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, now)
    return info.value.reason


def test_round_trip_returns_the_minted_claims() -> None:
    """A freshly minted token verifies and carries every claim it was minted with."""
    ks = _keyset()
    token = _mint(ks, jti="fixed-jti")
    claims = _verifier(ks).verify(token, NOW)
    assert claims == Claims(
        sub="user-1",
        email="ada@example.com",
        groups=("eng", "ml"),
        sid="sess-1",
        iat=int(NOW),
        exp=int(NOW) + 900,
        jti="fixed-jti",
        iss=ISS,
        aud=AUD,
    )


def test_session_start_and_idp_session_round_trip() -> None:
    """auth_time and idp_sid, when minted, come back in the claims (what a back-channel logout is
    matched on without the database); a non-numeric auth_time or non-string idp_sid is malformed."""
    ks = _keyset()
    claims = _verifier(ks).verify(_mint(ks, auth_time=NOW - 3600.7, idp_sid="idp-s1"), NOW)
    assert (claims.auth_time, claims.idp_sid) == (int(NOW) - 3601, "idp-s1")
    key = generate_signing_key("k1")
    base = {"iss": ISS, "aud": AUD, "sub": "u", "sid": "s", "jti": "j", "iat": int(NOW), "exp": int(NOW) + 60}
    verifier = _verifier(_keyset(signing=key))
    assert _reason(verifier, _sign_with(key, {**base, "auth_time": "yesterday"})) == "malformed"
    assert _reason(verifier, _sign_with(key, {**base, "idp_sid": 7})) == "malformed"


def test_minted_header_names_kid_alg_and_access_token_type() -> None:
    """The header carries the signing key's kid and alg and typ at+jwt (RFC 9068 §2.1)."""
    ks = _keyset()
    header = jwt.get_unverified_header(_mint(ks))
    assert header == {"alg": "ES256", "kid": "k1", "typ": "at+jwt"}


def test_minted_jti_is_random_by_default() -> None:
    """Two tokens minted at the same instant have different jti values."""
    ks = _keyset()
    v = _verifier(ks, cache_size=0)
    assert v.verify(_mint(ks), NOW).jti != v.verify(_mint(ks), NOW).jti


def test_eddsa_keys_mint_and_verify() -> None:
    """An Ed25519 signing key works end to end with alg EdDSA."""
    ks = _keyset(signing=generate_signing_key("ed", "EdDSA"))
    token = _mint(ks)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    assert _verifier(ks).verify(token, NOW).sub == "user-1"


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "eyJhbGciOiJFUzI1NiJ9..", "x" * 70_000])
def test_garbage_is_missing_or_malformed(token: str) -> None:
    """Empty input is 'missing'; anything that is not a JWS compact token is 'malformed'."""
    expected = "missing" if token == "" else "malformed"
    assert _reason(_verifier(_keyset()), token) == expected


def test_alg_none_is_refused() -> None:
    """An unsigned alg=none token naming a real kid is refused before any key is used (RFC 8725 §2.1)."""
    ks = _keyset()
    header = _b64(json.dumps({"alg": "none", "kid": "k1", "typ": "at+jwt"}).encode())
    token = f"{header}.{_b64(json.dumps(_payload()).encode())}."
    assert _reason(_verifier(ks), token) == "algorithm_not_allowed"


def test_hs256_keyed_with_the_public_key_is_refused() -> None:
    """The classic confusion attack (HMAC keyed with the PEM public key) fails on the pinned alg list."""
    signing = generate_signing_key("k1")
    ks = _keyset(signing=signing)
    signing_input = (
        _b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "at+jwt"}).encode())
        + "."
        + _b64(json.dumps(_payload()).encode())
    )
    mac = hmac.new((signing.public_key or "").encode(), signing_input.encode(), hashlib.sha256).digest()
    assert _reason(_verifier(ks), f"{signing_input}.{_b64(mac)}") == "algorithm_not_allowed"


def test_rs256_is_refused_even_when_correctly_signed() -> None:
    """RS256 is never allowed, whatever key signed it."""
    ks = _keyset()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_payload(), rsa_key, algorithm="RS256", headers={"kid": "k1", "typ": "at+jwt"})
    assert _reason(_verifier(ks), token) == "algorithm_not_allowed"


def test_alg_must_match_the_kid_key_algorithm() -> None:
    """A token claiming EdDSA for an ES256 kid is refused: the alg list is pinned per key."""
    ks = _keyset()
    attacker = generate_signing_key("k1", "EdDSA")
    assert _reason(_verifier(ks), _sign_with(attacker, _payload())) == "algorithm_not_allowed"


def test_foreign_key_with_a_known_kid_has_a_bad_signature() -> None:
    """A token signed by another P-256 key but naming our kid fails signature verification."""
    ks = _keyset()
    attacker = generate_signing_key("k1")
    assert _reason(_verifier(ks), _sign_with(attacker, _payload())) == "bad_signature"


def test_embedded_jwk_header_is_ignored() -> None:
    """A `jwk` header carrying the attacker's own key is never used to verify (RFC 8725 §3.10)."""
    ks = _keyset()
    attacker = generate_signing_key("k1")
    attacker_pub = serialization.load_pem_public_key((attacker.public_key or "").encode())
    assert isinstance(attacker_pub, ec.EllipticCurvePublicKey)
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(attacker_pub, as_dict=True)
    token = _sign_with(attacker, _payload(), headers={"jwk": jwk, "jku": "https://evil.example/jwks"})
    assert _reason(_verifier(ks), token) == "bad_signature"
    no_kid = jwt.encode(
        _payload(),
        _private(attacker),
        algorithm="ES256",
        headers={"jwk": jwk, "typ": "at+jwt"},
    )
    assert _reason(_verifier(ks), no_kid) == "unknown_kid"


def test_unknown_kid_is_refused() -> None:
    """A kid that is not in the key set is refused without trying other keys."""
    ks = _keyset()
    assert _reason(_verifier(ks), _sign_with(generate_signing_key("other"), _payload())) == "unknown_kid"


def test_wrong_audience_and_issuer_are_refused() -> None:
    """aud and iss must equal the configured values."""
    ks = _keyset()
    v = _verifier(ks)
    assert _reason(v, _mint(ks, audience="someone-else")) == "wrong_audience"
    assert _reason(v, _mint(ks, issuer="https://evil.example")) == "wrong_issuer"


@pytest.mark.parametrize("claim", ["exp", "iat", "iss", "aud", "sub", "sid", "jti"])
def test_each_required_claim_must_be_present(claim: str) -> None:
    """Dropping any required claim yields 'missing_claim'."""
    signing = generate_signing_key("k1")
    ks = _keyset(signing=signing)
    token = _sign_with(signing, _payload(**{claim: None}))
    assert _reason(_verifier(ks), token) == "missing_claim"


@pytest.mark.parametrize(
    "overrides",
    [{"groups": "eng"}, {"groups": [1]}, {"email": 5}, {"sid": 7}, {"exp": "soon"}, {"exp": True}],
)
def test_claims_of_the_wrong_type_are_malformed(overrides: dict[str, Any]) -> None:
    """Claims must have the types the gateway mints; anything else is 'malformed'."""
    signing = generate_signing_key("k1")
    ks = _keyset(signing=signing)
    assert _reason(_verifier(ks), _sign_with(signing, _payload(**overrides))) == "malformed"


def test_wrong_token_type_is_malformed() -> None:
    """A correctly signed JWT that is not typed at+jwt is not an access token (RFC 9068 §4)."""
    signing = generate_signing_key("k1")
    ks = _keyset(signing=signing)
    assert _reason(_verifier(ks), _sign_with(signing, _payload(), headers={"typ": "JWT"})) == "malformed"


def test_expiry_honours_the_clock_skew() -> None:
    """A token is accepted up to clock_skew seconds past exp and refused from then on."""
    ks = _keyset()
    token = _mint(ks, ttl=900)
    exp = NOW + 900
    assert _verifier(ks, cache_size=0).verify(token, exp + SKEW - 1).sub == "user-1"
    assert _reason(_verifier(ks), token, exp + SKEW) == "expired"


def test_token_from_the_future_is_not_yet_valid() -> None:
    """iat beyond now + skew is refused; within the skew it is accepted."""
    ks = _keyset()
    assert _verifier(ks).verify(_mint(ks, now=NOW + SKEW), NOW).sub == "user-1"
    assert _reason(_verifier(ks), _mint(ks, now=NOW + SKEW + 5)) == "not_yet_valid"


def test_nbf_in_the_future_is_not_yet_valid() -> None:
    """An nbf claim beyond now + skew is honoured (RFC 7519 §4.1.5)."""
    signing = generate_signing_key("k1")
    ks = _keyset(signing=signing)
    token = _sign_with(signing, _payload(nbf=int(NOW) + 120))
    assert _reason(_verifier(ks), token) == "not_yet_valid"


def test_rotation_old_tokens_verify_and_new_tokens_use_the_new_kid() -> None:
    """After rotation, tokens from the retired key still verify and new tokens name the new kid."""
    old = generate_signing_key("2024-old")
    old_keyset = _keyset(signing=old)
    old_token = _mint(old_keyset)

    retired = replace(old, private_key=None)
    new_keyset = _keyset(signing=generate_signing_key("2025-new"), verify=(retired,))
    verifier = _verifier(new_keyset)
    assert verifier.verify(old_token, NOW).sub == "user-1"
    new_token = _mint(new_keyset)
    assert jwt.get_unverified_header(new_token)["kid"] == "2025-new"
    assert verifier.verify(new_token, NOW).sub == "user-1"
    # The retired key set does not know the new kid.
    assert _reason(_verifier(old_keyset), new_token) == "unknown_kid"


def test_jwks_lists_every_key_without_private_parts() -> None:
    """jwks() publishes the signing and verify keys, public parameters only, with kid/alg/use."""
    ks = _keyset(
        signing=generate_signing_key("sig", "ES256"),
        verify=(generate_signing_key("old-ec"), generate_signing_key("old-ed", "EdDSA")),
    )
    jwks = ks.jwks()
    assert [k["kid"] for k in jwks["keys"]] == ["sig", "old-ec", "old-ed"]
    for key in jwks["keys"]:
        assert "d" not in key
        assert key["use"] == "sig"
    assert jwks["keys"][0]["kty"] == "EC" and jwks["keys"][0]["crv"] == "P-256"
    assert jwks["keys"][0]["alg"] == "ES256"
    assert jwks["keys"][2]["kty"] == "OKP" and jwks["keys"][2]["crv"] == "Ed25519"
    assert jwks["keys"][2]["alg"] == "EdDSA"
    # The published key really verifies our tokens.
    public = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(
        _mint(ks),
        public,
        algorithms=["ES256"],
        audience=AUD,
        options={"verify_iat": False, "verify_exp": False},
    )
    assert claims["sub"] == "user-1"


def test_cache_returns_the_same_claims_and_still_expires() -> None:
    """A cache hit returns the stored claims, and an expired cached token is refused."""
    ks = _keyset()
    v = _verifier(ks)
    token = _mint(ks, ttl=60)
    first = v.verify(token, NOW)
    assert v.verify(token, NOW + 10) is first
    assert _reason(v, token, NOW + 60 + SKEW) == "expired"
    assert _reason(v, token, NOW + 60 + SKEW + 1) == "expired"


def test_failed_verifications_are_not_cached() -> None:
    """A refused token is refused again (no negative entry turns into a positive one)."""
    ks = _keyset()
    v = _verifier(ks)
    bad = _mint(ks, audience="other")
    assert _reason(v, bad) == "wrong_audience"
    assert _reason(v, bad) == "wrong_audience"


def _pem_private(key: Any) -> str:
    return str(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    )


def test_config_errors_name_the_field() -> None:
    """Unparsable PEM and keys that do not fit their algorithm are ConfigErrors naming the field."""
    good = generate_signing_key("k1")
    with pytest.raises(ConfigError) as info:
        _keyset(signing=replace(good, private_key="-----BEGIN PRIVATE KEY-----\nnope\n"))
    assert info.value.field == "sessions.signing_key"

    p384 = _pem_private(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigError) as info:
        _keyset(signing=SigningKey(kid="k1", algorithm="ES256", private_key=p384))
    assert info.value.field == "sessions.signing_key"

    with pytest.raises(ConfigError) as info:
        _keyset(verify=(SigningKey(kid="old", algorithm="EdDSA", public_key=good.public_key),))
    assert info.value.field == "sessions.verify_keys[0]"

    ed448_pem = _pem_private(ed448.Ed448PrivateKey.generate())
    with pytest.raises(ConfigError) as info:
        _keyset(
            verify=(generate_signing_key("ok"), SigningKey(kid="x", algorithm="EdDSA", private_key=ed448_pem))
        )
    assert info.value.field == "sessions.verify_keys[1]"

    with pytest.raises(ConfigError) as info:
        _keyset(verify=(SigningKey(kid="old", public_key="garbage"),))
    assert info.value.field == "sessions.verify_keys[0]"


def test_mismatched_public_half_is_refused() -> None:
    """A signing key whose public_key is not the private key's own half is a config error."""
    a, b = generate_signing_key("k1"), generate_signing_key("k2")
    with pytest.raises(ConfigError, match="does not belong"):
        _keyset(signing=replace(a, public_key=b.public_key))


def test_unknown_algorithm_cannot_be_generated() -> None:
    """Only ES256 and EdDSA keys can be generated."""
    with pytest.raises(ConfigError):
        generate_signing_key("k", "HS256")


def test_service_token_claims_name_the_service_and_its_models() -> None:
    """A token minted for a service identity (sub service:NAME, sid svc:ID) verifies with
    ``service`` set and its model patterns; a person's token has neither, even with a lookalike sub."""
    keyset = _keyset()
    token = _mint(keyset, sub="service:ci-nightly", email="", sid="svc:abc", models=["claude-haiku-*"])
    claims = _verifier(keyset).verify(token, NOW)
    assert (claims.service, claims.models, claims.email) == ("ci-nightly", ("claude-haiku-*",), "")
    person = _verifier(keyset).verify(_mint(keyset, sub="service:ci-nightly", sid="portal-session"), NOW)
    assert (person.service, person.models) == (None, None)


def test_a_models_claim_that_is_not_a_list_of_strings_is_malformed() -> None:
    """``models`` must be a list of strings; anything else refuses the token."""
    key = generate_signing_key("k1")
    keyset = _keyset(signing=key)
    token = _sign_with(key, _payload(models="claude-*"))
    assert _reason(_verifier(keyset), token) == "malformed"
