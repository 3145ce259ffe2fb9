"""Validation of the IdP's ID tokens and back-channel logout tokens.

ID tokens follow OpenID Connect Core 1.0 §3.1.3.7 and logout tokens OpenID Connect Back-Channel
Logout 1.0 §2.4 and §2.6. Every JOSE step (parsing, signature, ``iss``, ``aud``) is pyjwt's; this
module only decides which key and algorithm may be used (RFC 8725 §3.1) and applies the OpenID
rules pyjwt does not know (``azp``, ``nonce``, the ``iat`` window, the ``events`` claim).

Everything here is pure: the IdP's JWK Set and ``now`` are arguments, nothing is fetched and no
clock is read. Fetching and re-fetching the JWK Set is :mod:`authz.signin.oidc`'s job.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jwt

from authz.errors import GatewayError

# Claims OIDC Core §2 makes REQUIRED in every ID token.
ID_TOKEN_REQUIRED: tuple[str, ...] = ("iss", "sub", "aud", "exp", "iat")
# Back-Channel Logout §2.4: iss, aud, iat, jti and events are REQUIRED; exp is checked when present
# (older drafts and some IdPs omit it); jti and events are checked here for precise reasons.
LOGOUT_TOKEN_REQUIRED: tuple[str, ...] = ("iss", "aud", "iat")

# The member of the logout token's `events` object that marks it (Back-Channel Logout §2.4).
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"

# OIDC Core §3.1.3.7 step 10 lets the client bound how long ago `iat` may be. ID tokens arrive
# straight from the token endpoint, so a few minutes is generous; logout tokens are pushed at once.
ID_TOKEN_MAX_AGE = 600.0
LOGOUT_TOKEN_MAX_AGE = 300.0

# Nothing the IdP signs for us comes near this; refuse before spending work on parsing.
MAX_TOKEN_LENGTH = 64 * 1024

# Signature algorithms with a public verification key. `none` and HS* are never accepted: the IdP's
# keys come from its public JWK Set, and an HMAC "keyed" with a public key is the classic
# algorithm-confusion forgery (RFC 8725 §2.1, §3.1). authz.config refuses them in the config too.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

ID_TOKEN_REASONS = frozenset(
    {
        "malformed",
        "bad_algorithm",
        "unknown_kid",
        "bad_signature",
        "wrong_issuer",
        "wrong_audience",
        "wrong_azp",
        "expired",
        "not_yet_valid",
        "iat_in_future",
        "stale_iat",
        "nonce_mismatch",
        "sub_mismatch",
    }
)
LOGOUT_TOKEN_REASONS = frozenset(
    {
        *(
            f"logout_{r}"
            for r in (
                "malformed",
                "bad_algorithm",
                "unknown_kid",
                "bad_signature",
                "wrong_issuer",
                "wrong_audience",
                "expired",
                "not_yet_valid",
                "iat_in_future",
                "stale_iat",
            )
        ),
        "logout_missing_sub_sid",
        "logout_missing_events",
        "logout_nonce_present",
        "logout_missing_jti",
    }
)


class OidcError(GatewayError):
    """The IdP or something it signed failed a check; ``reason`` is a short machine code.

    Reasons from token validation are listed in :data:`ID_TOKEN_REASONS` and
    :data:`LOGOUT_TOKEN_REASONS`; :mod:`authz.signin.oidc` adds its own (``issuer_mismatch``, ...). The
    message says what failed and never carries a token.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or reason)


def _fail(prefix: str, reason: str, message: str) -> OidcError:
    return OidcError(prefix + reason, message)


def _numeric(payload: Mapping[str, Any], name: str, prefix: str) -> float:
    value = payload[name]
    # RFC 7519 §2 NumericDate is a JSON number; bool is an int subclass in Python, so refuse it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(prefix, "malformed", f"claim {name!r} is not a NumericDate")
    return float(value)


def _signing_keys(jwks: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The JWKs in ``jwks`` that may verify signatures: public asymmetric keys meant for ``sig``."""
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        return []
    usable: list[Mapping[str, Any]] = []
    for key in keys:
        if not isinstance(key, Mapping) or key.get("kty") == "oct":
            continue
        # RFC 7517 §4.2 / §4.3: a key published for encryption, or without the verify operation,
        # must not verify signatures.
        if key.get("use", "sig") != "sig":
            continue
        ops = key.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        usable.append(key)
    return usable


def _select_key(jwks: Mapping[str, Any], header: Mapping[str, Any], alg: str, prefix: str) -> jwt.PyJWK:
    """Find the IdP key ``header`` names, bound to ``alg`` (OIDC Core §10.1)."""
    candidates = _signing_keys(jwks)
    kid = header.get("kid")
    if isinstance(kid, str):
        candidates = [k for k in candidates if k.get("kid") == kid]
    elif kid is None:
        # OIDC Core §10.1: a kid MUST be present when the JWK Set holds more than one key.
        if len(candidates) != 1:
            raise _fail(prefix, "unknown_kid", "the token names no key (kid) and the IdP has several")
    else:
        raise _fail(prefix, "malformed", "the kid header is not a string")
    if not candidates:
        raise _fail(prefix, "unknown_kid", f"the IdP's JWK Set has no signing key with kid {kid!r}")
    for key in candidates:
        # RFC 7517 §4.4: a key that states its algorithm is used with that algorithm only.
        if key.get("alg", alg) != alg:
            continue
        try:
            # Binding the PyJWK to the header's (already pinned) alg makes pyjwt refuse a key of
            # the wrong type or curve for it (RSA for ES256, P-384 for ES256, ...).
            return jwt.PyJWK(dict(key), algorithm=alg)
        except jwt.PyJWTError:
            continue
    raise _fail(prefix, "bad_algorithm", f"key {kid!r} cannot verify {alg}")


def _verify(
    token: str,
    *,
    jwks: Mapping[str, Any],
    issuer: str,
    client_id: str,
    algorithms: Iterable[str],
    required: Sequence[str],
    prefix: str,
) -> dict[str, Any]:
    """Check structure, algorithm, signature, ``iss`` and ``aud``; return the payload."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise _fail(prefix, "malformed", "not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise _fail(prefix, "malformed", "not a compact JWS") from exc

    # OIDC Core §3.1.3.7 steps 6-8: the alg must be one the client pinned, and asymmetric.
    pinned = ASYMMETRIC_ALGORITHMS.intersection(algorithms)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in pinned:
        raise _fail(prefix, "bad_algorithm", f"algorithm {alg!r} is not accepted (allowed: {sorted(pinned)})")
    # Only the IdP's published JWK Set is consulted: jwk, jku, x5u and x5c headers are ignored, as a
    # key the token carries or points at lets anyone sign (RFC 8725 §3.10).
    key = _select_key(jwks, header, alg, prefix)

    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            # OIDC Core §3.1.3.7 step 2: iss must match exactly; step 3: aud must contain client_id.
            issuer=issuer,
            audience=client_id,
            options={
                "require": list(required),
                "verify_signature": True,
                "verify_iss": True,
                "verify_aud": True,
                # pyjwt would read the wall clock; the time claims are checked against `now` below.
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.InvalidSignatureError as exc:
        raise _fail(prefix, "bad_signature", "the signature does not verify with the IdP's key") from exc
    except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError) as exc:
        raise _fail(prefix, "bad_algorithm", f"the IdP's key cannot verify {alg}") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise _fail(prefix, "malformed", f"required claim {exc.claim!r} is missing") from exc
    except jwt.InvalidIssuerError as exc:
        raise _fail(prefix, "wrong_issuer", f"iss is not exactly {issuer!r}") from exc
    except jwt.InvalidAudienceError as exc:
        raise _fail(prefix, "wrong_audience", f"aud does not contain {client_id!r}") from exc
    except jwt.PyJWTError as exc:
        raise _fail(prefix, "malformed", f"the token is malformed ({type(exc).__name__})") from exc
    return payload


def _check_times(
    payload: Mapping[str, Any], *, now: float, skew: float, max_age: float, prefix: str, require_exp: bool
) -> None:
    """``exp``, ``nbf`` and the ``iat`` window, each with ``skew`` seconds of leeway."""
    skew = max(0.0, float(skew))
    # OIDC Core §3.1.3.7 step 9 (RFC 7519 §4.1.4): reject at or after exp.
    if (require_exp or "exp" in payload) and now >= _numeric(payload, "exp", prefix) + skew:
        raise _fail(prefix, "expired", "the token has expired")
    if "nbf" in payload and _numeric(payload, "nbf", prefix) > now + skew:
        raise _fail(prefix, "not_yet_valid", "the token is not valid yet (nbf)")
    # OIDC Core §3.1.3.7 step 10: iat bounds how old a token may be, and a token issued "later"
    # than now was not issued by a clock we trust.
    iat = _numeric(payload, "iat", prefix)
    if iat > now + skew:
        raise _fail(prefix, "iat_in_future", "the token was issued in the future (check clocks)")
    if iat < now - max_age - skew:
        raise _fail(prefix, "stale_iat", f"the token was issued more than {int(max_age)}s ago")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def validate_id_token(
    token: str,
    *,
    jwks: Mapping[str, Any],
    issuer: str,
    client_id: str,
    algorithms: Iterable[str],
    nonce: str | None,
    now: float,
    skew: float,
    expected_sub: str | None = None,
    max_age: float = ID_TOKEN_MAX_AGE,
) -> dict[str, Any]:
    """Validate an ID token per OIDC Core §3.1.3.7 and return its claims.

    ``nonce`` is the value sent in the authentication request, or None when none is expected (a
    refreshed ID token, OIDC Core §12.2). ``expected_sub`` pins ``sub`` to the session's user on
    refresh (§12.2). The nonce's single use is the caller's: it lives in a single-use request row.
    Raises :class:`OidcError` with a reason from :data:`ID_TOKEN_REASONS`.
    """
    prefix = ""
    payload = _verify(
        token,
        jwks=jwks,
        issuer=issuer,
        client_id=client_id,
        algorithms=algorithms,
        required=ID_TOKEN_REQUIRED,
        prefix=prefix,
    )
    sub = payload["sub"]
    if not isinstance(sub, str) or not sub:
        raise _fail(prefix, "malformed", "sub is not a non-empty string")

    # OIDC Core §3.1.3.7 step 4: several audiences need azp (a SHOULD we make a MUST); step 5: an
    # azp, when present, must be this client.
    aud = payload["aud"]
    audiences = [aud] if isinstance(aud, str) else list(aud)
    azp = payload.get("azp")
    if len(audiences) > 1 and azp is None:
        raise _fail(prefix, "wrong_azp", "several audiences and no azp")
    if azp is not None and azp != client_id:
        raise _fail(prefix, "wrong_azp", f"azp is not {client_id!r}")

    _check_times(payload, now=now, skew=skew, max_age=max_age, prefix=prefix, require_exp=True)

    # OIDC Core §3.1.3.7 step 11: the nonce must equal the one sent in the authentication request.
    if nonce is not None:
        got = payload.get("nonce")
        if not isinstance(got, str) or not _same(got, nonce):
            raise _fail(prefix, "nonce_mismatch", "nonce does not match the sign-in request")
    # OIDC Core §12.2: a refreshed ID token must name the same user.
    if expected_sub is not None and not _same(sub, expected_sub):
        raise _fail(prefix, "sub_mismatch", "sub differs from the session's user")
    return payload


def validate_logout_token(
    token: str,
    *,
    jwks: Mapping[str, Any],
    issuer: str,
    client_id: str,
    algorithms: Iterable[str],
    now: float,
    skew: float,
    max_age: float = LOGOUT_TOKEN_MAX_AGE,
) -> dict[str, Any]:
    """Validate a back-channel logout token per Back-Channel Logout 1.0 §2.6 and return its claims.

    The caller must still refuse a replayed ``jti`` (§2.6 step 7) and act on ``sub`` / ``sid``.
    Raises :class:`OidcError` with a reason from :data:`LOGOUT_TOKEN_REASONS`.
    """
    prefix = "logout_"
    # §2.6 steps 2-3: signature with the IdP's keys and the pinned algorithms, iss, aud, iat, exp
    # validated as for ID tokens (OIDC Core §3.1.3.7).
    payload = _verify(
        token,
        jwks=jwks,
        issuer=issuer,
        client_id=client_id,
        algorithms=algorithms,
        required=LOGOUT_TOKEN_REQUIRED,
        prefix=prefix,
    )
    _check_times(payload, now=now, skew=skew, max_age=max_age, prefix=prefix, require_exp=False)

    # §2.6 step 4: a sub, a sid, or both.
    sub, sid = payload.get("sub"), payload.get("sid")
    for name, value in (("sub", sub), ("sid", sid)):
        if value is not None and not isinstance(value, str):
            raise _fail(prefix, "malformed", f"{name} is not a string")
    if not sub and not sid:
        raise _fail(prefix, "missing_sub_sid", "the logout token names neither sub nor sid")
    # §2.6 step 5 (§2.4): events is a JSON object with the back-channel logout member, itself an object.
    events = payload.get("events")
    if not isinstance(events, Mapping) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), Mapping):
        raise _fail(prefix, "missing_events", f"events does not contain {BACKCHANNEL_LOGOUT_EVENT}")
    # §2.6 step 6: a nonce is forbidden, so an ID token can never pass as a logout token (§2.4).
    if "nonce" in payload:
        raise _fail(prefix, "nonce_present", "a logout token must not carry a nonce")
    # §2.4: jti is REQUIRED; the caller refuses replays of it.
    jti = payload.get("jti")
    if not isinstance(jti, str) or not jti:
        raise _fail(prefix, "missing_jti", "the logout token has no jti")
    return payload
