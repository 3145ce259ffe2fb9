"""Gateway access tokens: key handling, minting and verification.

Access tokens are JWTs (RFC 7519) signed by the gateway itself with an asymmetric algorithm
(ES256 or EdDSA) and typed ``at+jwt`` (RFC 9068). Every JOSE operation goes through pyjwt; this
module only decides *which* key and algorithm may be used, following the JWT best current
practices of RFC 8725. Everything here is pure: no I/O, no clock reads (``now`` is passed in).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import jwt
from cachetools import LRUCache
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from authz.configtypes import Sessions, SigningKey
from authz.errors import ConfigError, TokenError
from authz.serviceid import service_identity

Algorithm: TypeAlias = Literal["ES256", "EdDSA"]
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# The only algorithms a gateway token may carry. `none`, HS* and RS* are never accepted: pinning
# the list defeats alg=none and "HS256 keyed with the public key" confusion (RFC 8725 §2.1, §3.1).
ALGORITHMS: tuple[Algorithm, ...] = ("ES256", "EdDSA")

# RFC 9068 §2.1 (header typ) and §4 (resource servers MUST check it): explicit typing keeps other
# JWTs signed by the same key from being replayed as access tokens (RFC 8725 §3.11).
TOKEN_TYPE = "at+jwt"  # noqa: S105 -- a JOSE media type (RFC 9068 §2.1), not a secret
_ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt"})

# Claims a token must carry; RFC 7519 §4.1 makes them all optional, RFC 9068 §2.2 and our own
# session model (sid, jti for revocation) make them mandatory here.
REQUIRED_CLAIMS: tuple[str, ...] = ("exp", "iat", "iss", "aud", "sub", "sid", "jti")

# Envoy caps request headers well below this; anything longer is not one of our tokens and is
# refused before any parsing work is spent on it.
MAX_TOKEN_LENGTH = 64 * 1024

REASONS: frozenset[str] = frozenset(
    {
        "missing",
        "malformed",
        "unknown_kid",
        "algorithm_not_allowed",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "missing_claim",
    }
)


def generate_signing_key(kid: str, algorithm: str = "ES256") -> SigningKey:
    """Create a fresh key pair as a :class:`SigningKey` holding PKCS#8 / SPKI PEM text.

    ES256 uses a P-256 key (RFC 7518 §3.4); EdDSA uses Ed25519 (RFC 8037 §3.1).
    """
    private: PrivateKey
    alg: Algorithm
    if algorithm == "ES256":
        alg, private = "ES256", ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "EdDSA":
        alg, private = "EdDSA", ed25519.Ed25519PrivateKey.generate()
    else:
        raise ConfigError("algorithm", f"unsupported algorithm {algorithm!r}; use ES256 or EdDSA")
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    return SigningKey(kid=kid, algorithm=alg, private_key=private_pem, public_key=public_pem)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key that may verify tokens whose header names ``kid``, with ``algorithm`` only."""

    kid: str
    algorithm: Algorithm
    key: PublicKey


def _check_type(where: str, algorithm: str, key: object) -> None:
    """Refuse a key whose type does not match its algorithm (RFC 8725 §3.1: one key, one alg)."""
    if algorithm == "ES256":
        curve_ok = isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
            key.curve, ec.SECP256R1
        )
        if not curve_ok:
            raise ConfigError(where, "algorithm ES256 needs a P-256 (secp256r1) EC key")
    elif algorithm == "EdDSA":
        if not isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
            raise ConfigError(where, "algorithm EdDSA needs an Ed25519 key")
    else:
        raise ConfigError(where, f"unsupported algorithm {algorithm!r}; use ES256 or EdDSA")


def _load_private(where: str, algorithm: str, pem: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(where, "private_key is not an unencrypted PEM private key") from exc
    _check_type(where, algorithm, key)
    assert isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
    return key


def _load_public(where: str, algorithm: str, pem: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(where, "public_key is not a PEM public key") from exc
    _check_type(where, algorithm, key)
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return key


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load(where: str, config: SigningKey, *, need_private: bool) -> tuple[PrivateKey | None, PublicKey]:
    if not config.kid:
        raise ConfigError(where, "kid must be a non-empty string")
    private = _load_private(where, config.algorithm, config.private_key) if config.private_key else None
    public = _load_public(where, config.algorithm, config.public_key) if config.public_key else None
    if need_private and private is None:
        raise ConfigError(where, "private_key is required for the signing key")
    if private is not None:
        derived = private.public_key()
        if public is not None and _spki(public) != _spki(derived):
            raise ConfigError(where, "public_key does not belong to private_key")
        public = derived
    if public is None:
        raise ConfigError(where, "set public_key (or private_key)")
    return private, public


class KeySet:
    """One signing key and every key that may verify (the signing key plus ``verify_keys``).

    Verify keys are the previous signing keys kept during a rotation, so tokens they signed stay
    valid until they expire while new tokens already carry the new ``kid``.
    """

    __slots__ = ("_keys", "_signing", "_signing_private")

    def __init__(
        self, signing: VerifyKey | None, signing_private: PrivateKey | None, verify: Iterable[VerifyKey]
    ) -> None:
        self._signing = signing
        self._signing_private = signing_private
        keys: dict[str, VerifyKey] = {}
        for key in ([signing] if signing is not None else []) + list(verify):
            if key.kid in keys:
                raise ConfigError("sessions.verify_keys", f"key id {key.kid!r} is listed twice")
            keys[key.kid] = key
        self._keys: Mapping[str, VerifyKey] = keys

    @classmethod
    def from_config(cls, sessions: Sessions) -> KeySet:
        """Parse and check every configured key; raises ConfigError naming the offending field."""
        signing: VerifyKey | None = None
        private: PrivateKey | None = None
        if sessions.signing_key is not None:
            cfg = sessions.signing_key
            private, public = _load("sessions.signing_key", cfg, need_private=True)
            signing = VerifyKey(cfg.kid, cfg.algorithm, public)
        verify: list[VerifyKey] = []
        for i, cfg in enumerate(sessions.verify_keys):
            _, public = _load(f"sessions.verify_keys[{i}]", cfg, need_private=False)
            verify.append(VerifyKey(cfg.kid, cfg.algorithm, public))
        if signing is None and not verify:
            raise ConfigError("sessions.signing_key", "configure a signing key (or at least one verify key)")
        return cls(signing, private, verify)

    @property
    def signing_kid(self) -> str | None:
        """The ``kid`` new tokens carry, or None when this key set can only verify."""
        return self._signing.kid if self._signing is not None else None

    def signing_key(self) -> tuple[str, Algorithm, PrivateKey]:
        """``(kid, algorithm, private key)`` for minting; ConfigError if there is no signing key."""
        if self._signing is None or self._signing_private is None:
            raise ConfigError("sessions.signing_key", "is required to issue tokens")
        return self._signing.kid, self._signing.algorithm, self._signing_private

    def get(self, kid: str) -> VerifyKey | None:
        """The verify key named ``kid``, if any."""
        return self._keys.get(kid)

    def kids(self) -> tuple[str, ...]:
        """Every key id that verifies, signing key first."""
        return tuple(self._keys)

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (RFC 7517 §5) of every verify key, signing key first.

        Only public parameters are emitted: the JWKs are built from public key objects, so ``d``
        can never appear (RFC 7517 §9.2 / RFC 7518 §6.2.2.1).
        """
        keys: list[dict[str, Any]] = []
        for key in self._keys.values():
            jwk: dict[str, Any]
            if isinstance(key.key, ec.EllipticCurvePublicKey):
                jwk = dict(ECAlgorithm.to_jwk(key.key, as_dict=True))
            else:
                jwk = dict(OKPAlgorithm.to_jwk(key.key, as_dict=True))
            jwk.update({"kid": key.kid, "alg": key.algorithm, "use": "sig"})
            keys.append(jwk)
        return {"keys": keys}


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of a gateway access token.

    ``sub`` is the IdP's subject. ``auth_time`` (when the session was signed in) and ``idp_sid``
    (the IdP's session id) let a back-channel logout be enforced from the token alone while
    PostgreSQL cannot map IdP sessions to gateway sessions; tokens minted without them carry None.
    """

    sub: str
    email: str
    groups: tuple[str, ...]
    sid: str
    iat: int
    exp: int
    jti: str
    iss: str
    aud: str
    auth_time: int | None = None
    idp_sid: str | None = None
    models: tuple[str, ...] | None = None
    """Model patterns the token is limited to (service tokens' ``--models``); None: no limit of its own."""

    @property
    def service(self) -> str | None:
        """The service identity's name for a service token (:mod:`authz.serviceid`), else None."""
        return service_identity(self.sub, self.sid)


def mint(
    keyset: KeySet,
    *,
    issuer: str,
    audience: str,
    sub: str,
    email: str,
    groups: Iterable[str],
    sid: str,
    ttl: int,
    now: float,
    jti: str | None = None,
    auth_time: float | None = None,
    idp_sid: str | None = None,
    models: Iterable[str] | None = None,
) -> str:
    """Sign a new access token with the key set's signing key.

    The header carries ``kid`` and ``alg`` of the signing key and ``typ: at+jwt`` (RFC 9068 §2.1).
    ``iat``/``exp`` are whole seconds (NumericDate, RFC 7519 §2); ``jti`` defaults to 128 random
    bits so every token can be revoked individually (RFC 7519 §4.1.7). ``auth_time`` (RFC 9068
    §2.2.1: when the user signed in, here the session's creation) and ``idp_sid`` (the IdP's
    session id) are written when given. ``models`` (a private claim) limits the token to those
    model patterns on top of the policy (service tokens).
    """
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    kid, algorithm, private = keyset.signing_key()
    iat = int(now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "email": email,
        "groups": list(groups),
        "sid": sid,
        "iat": iat,
        "exp": iat + ttl,
        "jti": jti if jti is not None else secrets.token_urlsafe(16),
    }
    if auth_time is not None:
        payload["auth_time"] = int(auth_time)
    if idp_sid is not None:
        payload["idp_sid"] = idp_sid
    if models is not None:
        payload["models"] = list(models)
    return jwt.encode(payload, private, algorithm=algorithm, headers={"kid": kid, "typ": TOKEN_TYPE})


def _numeric(payload: Mapping[str, Any], name: str) -> int:
    value = payload[name]
    # RFC 7519 §2 NumericDate: a JSON number. bool is an int subclass in Python; refuse it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError("malformed")
    return int(value)


def _string(payload: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = payload.get(name, default)
    if not isinstance(value, str):
        raise TokenError("malformed")
    return value


def bearer_token(headers: Mapping[str, str], repeated: frozenset[str] = frozenset()) -> str | None:
    """The gateway token in a request's lower-cased ``headers``: ``Authorization: Bearer`` (Bedrock,
    Vertex, the SDKs) or ``x-api-key`` (Claude Code's native mode sends both, with the same value);
    None when neither is sent. ext_authz and the portal's bearer-authenticated endpoints read it
    the same way.

    Raises :class:`TokenError` ("ambiguous") when a credential header is repeated, an
    ``Authorization`` header is not one non-empty bearer token, or the two headers carry different
    tokens: the gateway judges exactly one credential, never picks among several.
    """
    if "authorization" in repeated or "x-api-key" in repeated:
        raise TokenError("ambiguous")
    tokens = set()
    if "authorization" in headers:
        scheme, _, value = headers["authorization"].strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value or " " in value:
            raise TokenError("ambiguous")
        tokens.add(value)
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        tokens.add(api_key)
    if len(tokens) > 1:
        raise TokenError("ambiguous")
    return tokens.pop() if tokens else None


class TokenVerifier:
    """Verifies gateway access tokens on the inference hot path.

    Successful verifications are cached by token string (bounded LRU), so a busy agent's repeated
    requests cost one dictionary lookup; ``exp`` is re-checked against ``now`` on every hit.
    Revocation is deliberately not checked here: the caller consults the revocation set.
    """

    def __init__(
        self,
        keyset: KeySet,
        *,
        issuer: str,
        audience: str,
        clock_skew: int,
        cache_size: int = 10000,
    ) -> None:
        self._keyset = keyset
        self._issuer = issuer
        self._audience = audience
        self._skew = max(0, clock_skew)
        self._cache: LRUCache[str, Claims] | None = LRUCache(maxsize=cache_size) if cache_size > 0 else None
        # cachetools caches are not thread-safe; a sync gRPC server would call us from many threads.
        self._lock = threading.Lock()

    def verify(self, token: str, now: float) -> Claims:
        """Verify ``token`` at time ``now`` (Unix seconds) and return its claims.

        Raises TokenError whose ``reason`` is one of :data:`REASONS`.
        """
        if not token:
            raise TokenError("missing")
        if self._cache is not None:
            with self._lock:
                cached = self._cache.get(token)
            if cached is not None:
                self._check_exp(cached.exp, now, token)
                return cached
        claims = self._verify_uncached(token, now)
        if self._cache is not None:
            with self._lock:
                self._cache[token] = claims
        return claims

    def _check_exp(self, exp: int, now: float, token: str | None = None) -> None:
        # RFC 7519 §4.1.4: reject at or after exp, allowing a small leeway for clock skew.
        if now >= exp + self._skew:
            if token is not None and self._cache is not None:
                with self._lock:
                    self._cache.pop(token, None)
            raise TokenError("expired")

    def _verify_uncached(self, token: str, now: float) -> Claims:
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenError("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed") from exc

        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenError("algorithm_not_allowed")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            raise TokenError("malformed")
        # We never mint critical extensions (RFC 7515 §4.1.11) or unencoded payloads (RFC 7797).
        if "crit" in header or "b64" in header:
            raise TokenError("malformed")
        # The key is found by `kid` in our own key set only. `jwk`, `jku`, `x5u` and `x5c` are never
        # consulted: trusting a key the token carries or points at lets anyone sign (RFC 8725 §3.10).
        kid = header.get("kid")
        key = self._keyset.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenError("unknown_kid")
        # Pin to the one algorithm configured for this key (RFC 8725 §3.1), never the header's choice.
        if alg != key.algorithm:
            raise TokenError("algorithm_not_allowed")

        try:
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    # pyjwt reads the wall clock itself; time claims are checked below against `now`.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_iss": True,
                    "verify_aud": True,
                    "verify_sub": True,
                    "verify_jti": True,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise TokenError("bad_signature") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise TokenError("algorithm_not_allowed") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("missing_claim") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenError("wrong_audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenError("wrong_issuer") from exc
        except jwt.PyJWTError as exc:
            raise TokenError("malformed") from exc

        exp = _numeric(payload, "exp")
        iat = _numeric(payload, "iat")
        self._check_exp(exp, now)
        # RFC 7519 §4.1.6 does not forbid a future iat, but a token issued "later" than now (beyond
        # the skew) was not issued by a clock we trust; §4.1.5 nbf is honoured the same way.
        if iat > now + self._skew:
            raise TokenError("not_yet_valid")
        if "nbf" in payload and _numeric(payload, "nbf") > now + self._skew:
            raise TokenError("not_yet_valid")

        groups = payload.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TokenError("malformed")
        auth_time = _numeric(payload, "auth_time") if "auth_time" in payload else None
        idp_sid = _string(payload, "idp_sid") if "idp_sid" in payload else None
        models = payload.get("models")
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) for m in models)
        ):
            raise TokenError("malformed")
        return Claims(
            sub=_string(payload, "sub"),
            email=_string(payload, "email", ""),
            groups=tuple(groups),
            sid=_string(payload, "sid"),
            iat=iat,
            exp=exp,
            jti=_string(payload, "jti"),
            iss=_string(payload, "iss"),
            # `aud` may be a list containing ours (RFC 7519 §4.1.3); record the audience we matched.
            aud=self._audience,
            auth_time=auth_time,
            idp_sid=idp_sid,
            models=tuple(models) if models is not None else None,
        )
