"""Google's side of service-account auth: key files, and the JWT-bearer grant of the token endpoint.

The emulator checks the assertion the way ``oauth2.googleapis.com/token`` does (RFC 7523 section 3:
signature by a key registered for the issuer, audience, a short-lived ``exp``/``iat`` window, and the
scope), so google-auth's real ``service_account.Credentials`` run unmodified against it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# google-auth always puts Google's own token endpoint in the assertion's "aud", whatever the key
# file's token_uri says, and Google accepts it (plus the legacy v4 URL); so does the emulator.
GOOGLE_TOKEN_AUDIENCES = ("https://oauth2.googleapis.com/token", "https://www.googleapis.com/oauth2/v4/token")
ACCESS_TOKEN_LIFETIME = 3600
# Google refuses assertions valid for more than an hour; a little skew is tolerated either way.
MAX_ASSERTION_LIFETIME = 3600
CLOCK_LEEWAY = 60


@dataclass(frozen=True, slots=True)
class ServiceAccountPublicKey:
    """The public half of a service-account key, as Google keeps it for verifying assertions."""

    key_id: str
    client_email: str
    token_uri: str
    public_key: rsa.RSAPublicKey


class TokenGrantError(Exception):
    """A refused grant; ``error`` is the RFC 6749 section 5.2 code, ``description`` Google's text."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description

    def to_json(self) -> dict[str, str]:
        """The JSON body Google answers with."""
        return {"error": self.error, "error_description": self.description}


def default_client_email(project_id: str) -> str:
    """The service-account email the emulator uses when the caller names none."""
    return f"claude-gateway@{project_id}.iam.gserviceaccount.com"


def generate_service_account_key(
    path: Path, *, token_uri: str, project_id: str, client_email: str | None = None
) -> None:
    """Write a real service-account JSON key file with a fresh RSA 2048 key.

    The file has the fields google-auth reads (``type``, ``private_key_id``, ``private_key``,
    ``client_email``, ``token_uri``, ...); ``token_uri`` should point at the emulator's ``/token``.
    The file is created with mode 0600 because it holds a private key.
    """
    email = client_email or default_client_email(project_id)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode("ascii")
    document = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(100000000000000000000 + secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
        "universe_domain": "googleapis.com",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)


def load_service_account_public_key(path: Path) -> ServiceAccountPublicKey:
    """Read a service-account key file and keep only what verification needs."""
    document = json.loads(path.read_text(encoding="utf-8"))
    private_key = serialization.load_pem_private_key(document["private_key"].encode("ascii"), password=None)
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ValueError(f"{path}: service-account keys are RSA, found {type(private_key).__name__}")
    return ServiceAccountPublicKey(
        key_id=str(document["private_key_id"]),
        client_email=str(document["client_email"]),
        token_uri=str(document["token_uri"]),
        public_key=private_key.public_key(),
    )


def verify_jwt_bearer_grant(
    form: Mapping[str, str],
    *,
    keys: Mapping[str, ServiceAccountPublicKey],
    audiences: Collection[str],
    now: float,
) -> str:
    """Check a token request of the JWT-bearer grant and return the service account it is for.

    ``keys`` maps key id to registered public key; ``audiences`` are the token URIs accepted as
    ``aud`` besides Google's own (``GOOGLE_TOKEN_AUDIENCES``). Raises ``TokenGrantError`` with
    Google's error code and description on refusal.
    """
    grant_type = form.get("grant_type", "")
    if grant_type != JWT_BEARER_GRANT:
        raise TokenGrantError("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
    assertion = form.get("assertion", "")
    if not assertion:
        raise TokenGrantError("invalid_request", "Missing required parameter: assertion")
    key = _find_key(assertion, keys)
    try:
        claims = jwt.decode(
            assertion,
            key=key.public_key,
            # Pin the algorithm: the header's "alg" is attacker-controlled.
            algorithms=["RS256"],
            audience=[*GOOGLE_TOKEN_AUDIENCES, *audiences],
            issuer=key.client_email,
            leeway=CLOCK_LEEWAY,
            options={"require": ["iss", "aud", "exp", "iat"]},
        )
    except jwt.InvalidSignatureError as exc:
        raise TokenGrantError("invalid_grant", "Invalid JWT Signature.") from exc
    except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError) as exc:
        raise TokenGrantError("invalid_grant", _TIMEFRAME) from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenGrantError("invalid_grant", "Invalid JWT: Failed audience check.") from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenGrantError("invalid_grant", "Invalid JWT: issuer does not own the signing key.") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenGrantError("invalid_grant", f"Invalid JWT: {exc}") from exc
    exp, iat = claims["exp"], claims["iat"]
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise TokenGrantError("invalid_grant", _TIMEFRAME)
    if exp - iat > MAX_ASSERTION_LIFETIME or iat > now + CLOCK_LEEWAY:
        raise TokenGrantError("invalid_grant", _TIMEFRAME)
    scopes = str(claims.get("scope", "")).split()
    if CLOUD_PLATFORM_SCOPE not in scopes:
        raise TokenGrantError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    return key.client_email


def new_access_token() -> str:
    """A random opaque access token shaped like Google's."""
    return "ya29." + secrets.token_urlsafe(96)


_TIMEFRAME = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)


def _find_key(assertion: str, keys: Mapping[str, ServiceAccountPublicKey]) -> ServiceAccountPublicKey:
    """Pick the registered key the assertion claims, by ``kid`` or else by issuer."""
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise TokenGrantError("invalid_grant", "Invalid JWT: malformed assertion.") from exc
    kid = header.get("kid")
    if isinstance(kid, str) and kid:
        key = keys.get(kid)
        if key is None:
            raise TokenGrantError("invalid_grant", "Invalid JWT Signature.")
        return key
    issuer = unverified.get("iss")
    candidates = [key for key in keys.values() if key.client_email == issuer]
    if len(candidates) != 1:
        # Without a kid Google cannot tell which of several keys signed; with none, the account
        # is unknown. Either way the grant is refused.
        raise TokenGrantError("invalid_grant", "Invalid grant: account not found")
    return candidates[0]
