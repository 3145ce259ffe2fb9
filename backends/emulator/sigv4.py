"""AWS's side of request signing: SigV4 verification by botocore itself, and STS AssumeRole's wire format.

Verification never reimplements SigV4: it rebuilds an ``AWSRequest`` from what arrived (method, raw
path and query, the signed headers only, the body) and lets ``botocore.auth.SigV4Auth`` compute the
canonical request, string to sign and signature at the request's own ``X-Amz-Date``. What differs
from a client signing is only which clock is used, so a botocore upgrade that changes signing
changes both sides at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from xml.sax.saxutils import escape

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

MAX_CLOCK_SKEW = timedelta(minutes=5)
_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AUTH_PREFIX = "AWS4-HMAC-SHA256"
_AUTH_PART = re.compile(r"\s*(Credential|SignedHeaders|Signature)=([^,\s]*)\s*")


@dataclass(frozen=True, slots=True)
class AwsIdentity:
    """A key pair the emulator accepts, with the principal it belongs to.

    ``session_token`` and ``expires_at`` (epoch seconds) are set for temporary (``ASIA``) keys
    issued by AssumeRole; static keys have neither.
    """

    access_key_id: str
    secret_access_key: str
    principal_arn: str
    session_token: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """An HTTP request as it arrived: ``target`` is the raw path and query, never re-encoded."""

    method: str
    scheme: str
    target: str
    headers: Sequence[tuple[str, str]]
    body: bytes


class SigV4Error(Exception):
    """A refused signature; ``error_type`` is what AWS puts in ``x-amzn-ErrorType``."""

    def __init__(self, error_type: str, message: str, *, access_key_id: str | None = None) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.access_key_id = access_key_id


def verify_sigv4(
    request: ReceivedRequest,
    *,
    service: str,
    region: str,
    lookup: Callable[[str], AwsIdentity | None],
    now: datetime,
) -> AwsIdentity:
    """Check a SigV4 ``Authorization`` header and return the identity that signed the request.

    Raises ``SigV4Error`` for a missing or malformed header, an unknown key, the wrong region or
    service, a stale or future ``X-Amz-Date``, a missing or wrong session token, an expired
    temporary key, a body that does not match ``X-Amz-Content-SHA256``, or a signature mismatch.
    """
    headers = [(name.lower(), value) for name, value in request.headers]
    authorization = _first(headers, "authorization")
    if authorization is None:
        raise SigV4Error("UnrecognizedClientException", "Missing Authentication Token")
    credential, signed_names, signature = _parse_authorization(authorization)
    scope = credential.split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise SigV4Error("InvalidSignatureException", f"Credential is malformed: '{credential}'.")
    access_key_id, scope_date, scope_region, scope_service, _ = scope

    amz_date = _first(headers, "x-amz-date")
    if amz_date is None:
        raise SigV4Error("InvalidSignatureException", "Authorization requires an X-Amz-Date header.")
    try:
        signed_at = datetime.strptime(amz_date, _AMZ_DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise SigV4Error("InvalidSignatureException", f"Invalid X-Amz-Date '{amz_date}'.") from exc
    if scope_date != amz_date[:8]:
        raise SigV4Error(
            "InvalidSignatureException", f"Credential should be scoped to a valid date: '{amz_date[:8]}'."
        )
    if now - signed_at > MAX_CLOCK_SKEW:
        earliest = (now - MAX_CLOCK_SKEW).strftime(_AMZ_DATE_FORMAT)
        raise SigV4Error(
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier than {earliest} "
            f"({now.strftime(_AMZ_DATE_FORMAT)} - 5 min.)",
        )
    if signed_at - now > MAX_CLOCK_SKEW:
        latest = (now + MAX_CLOCK_SKEW).strftime(_AMZ_DATE_FORMAT)
        raise SigV4Error(
            "InvalidSignatureException",
            f"Signature not yet current: {amz_date} is still later than {latest} "
            f"({now.strftime(_AMZ_DATE_FORMAT)} + 5 min.)",
        )
    if scope_region != region:
        raise SigV4Error(
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{scope_region}'.",
        )
    if scope_service != service:
        raise SigV4Error(
            "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'."
        )

    identity = lookup(access_key_id)
    if identity is None:
        raise SigV4Error(
            "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    _check_session_token(identity, _first(headers, "x-amz-security-token"), now)

    content_sha = _first(headers, "x-amz-content-sha256")
    # botocore trusts X-Amz-Content-SHA256 when present instead of hashing the body, so the header
    # itself must be held to the body or a tampered body would pass.
    if content_sha is not None and content_sha != hashlib.sha256(request.body).hexdigest():
        raise SigV4Error(
            "InvalidSignatureException",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
            access_key_id=access_key_id,
        )
    expected = compute_signature(request, identity, signed_names, headers, service, region, amz_date)
    if not hmac.compare_digest(expected, signature):
        raise SigV4Error(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check "
            "your AWS Secret Access Key and signing method. Consult the service documentation for details.",
            access_key_id=access_key_id,
        )
    return identity


def compute_signature(
    request: ReceivedRequest,
    identity: AwsIdentity,
    signed_names: Sequence[str],
    headers: Sequence[tuple[str, str]],
    service: str,
    region: str,
    amz_date: str,
) -> str:
    """The hex signature botocore would produce for this request at ``amz_date``."""
    host = _first(headers, "host") or "localhost"
    aws_request = AWSRequest(
        method=request.method, url=f"{request.scheme}://{host}{request.target}", data=request.body
    )
    names = set(signed_names)
    for name, value in headers:
        if name in names:
            # HTTPHeaders appends on assignment, so repeated headers keep every value as sent.
            aws_request.headers[name] = value
    # The timestamp botocore's add_auth would take from the clock; every other step is its own.
    aws_request.context["timestamp"] = amz_date
    signer = SigV4Auth(
        Credentials(identity.access_key_id, identity.secret_access_key, identity.session_token),
        service,
        region,
    )
    canonical_request = signer.canonical_request(aws_request)
    return str(signer.signature(signer.string_to_sign(aws_request, canonical_request), aws_request))


def _parse_authorization(value: str) -> tuple[str, list[str], str]:
    """Split ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``."""
    if not value.startswith(_AUTH_PREFIX + " "):
        raise SigV4Error(
            "InvalidSignatureException", f"Authorization header requires the '{_AUTH_PREFIX}' scheme."
        )
    parts: dict[str, str] = {}
    for piece in value[len(_AUTH_PREFIX) + 1 :].split(","):
        match = _AUTH_PART.fullmatch(piece)
        if match is None:
            raise SigV4Error(
                "InvalidSignatureException", f"Authorization header is malformed near '{piece.strip()}'."
            )
        parts[match.group(1)] = match.group(2)
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if not parts.get(name)]
    if missing:
        raise SigV4Error(
            "InvalidSignatureException", f"Authorization header requires '{missing[0]}' parameter."
        )
    signed_names = parts["SignedHeaders"].split(";")
    if "host" not in signed_names:
        raise SigV4Error(
            "InvalidSignatureException", "'Host' must be a 'SignedHeader' in the AWS Authorization."
        )
    return parts["Credential"], signed_names, parts["Signature"]


def _check_session_token(identity: AwsIdentity, token: str | None, now: datetime) -> None:
    """Temporary keys need their own session token; static keys must not carry one."""
    if identity.session_token is None:
        if token is not None:
            raise SigV4Error(
                "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        return
    if token is None or not hmac.compare_digest(token, identity.session_token):
        raise SigV4Error(
            "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    if identity.expires_at is not None and now.timestamp() >= identity.expires_at:
        raise SigV4Error("ExpiredTokenException", "The security token included in the request is expired")


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


# --- STS AssumeRole -------------------------------------------------------------------------------

STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}")
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}")
_KEY_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True, slots=True)
class AssumeRoleRequest:
    """The parameters of one AssumeRole call, as parsed from its form body."""

    role_arn: str
    role_session_name: str
    external_id: str | None
    source_identity: str | None
    tags: tuple[tuple[str, str], ...]
    duration_seconds: int


class StsError(Exception):
    """An STS refusal: HTTP status, error code and message for the XML ``ErrorResponse``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def parse_assume_role(form: Mapping[str, str], *, max_duration: int) -> AssumeRoleRequest:
    """Validate an ``Action=AssumeRole`` form the way STS does and return its parameters."""
    role_arn = form.get("RoleArn", "")
    session_name = form.get("RoleSessionName", "")
    if not role_arn:
        raise StsError(400, "MissingParameter", "The request must contain the parameter RoleArn.")
    if not _SESSION_NAME.fullmatch(session_name):
        raise StsError(
            400,
            "ValidationError",
            f"1 validation error detected: Value '{session_name}' at 'roleSessionName' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]*",
        )
    external_id = form.get("ExternalId")
    if external_id is not None and not _EXTERNAL_ID.fullmatch(external_id):
        raise StsError(
            400, "ValidationError", "1 validation error detected: Value at 'externalId' is invalid."
        )
    source_identity = form.get("SourceIdentity")
    if source_identity is not None and not _SESSION_NAME.fullmatch(source_identity):
        raise StsError(
            400, "ValidationError", "1 validation error detected: Value at 'sourceIdentity' is invalid."
        )
    try:
        duration = int(form.get("DurationSeconds", "3600"))
    except ValueError as exc:
        raise StsError(400, "ValidationError", "DurationSeconds must be an integer.") from exc
    if duration < 900:
        raise StsError(
            400,
            "ValidationError",
            "1 validation error detected: Value at 'durationSeconds' failed "
            "to satisfy constraint: Member must have value greater than or equal to 900",
        )
    if duration > max_duration:
        raise StsError(
            400,
            "ValidationError",
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
        )
    return AssumeRoleRequest(
        role_arn=role_arn,
        role_session_name=session_name,
        external_id=external_id,
        source_identity=source_identity,
        tags=_parse_tags(form),
        duration_seconds=duration,
    )


def _parse_tags(form: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Collect ``Tags.member.N.Key``/``Value`` pairs in member order (the query protocol's lists)."""
    tags: list[tuple[int, str, str]] = []
    index = 1
    while f"Tags.member.{index}.Key" in form:
        key = form[f"Tags.member.{index}.Key"]
        value = form.get(f"Tags.member.{index}.Value", "")
        if not 1 <= len(key) <= 128 or len(value) > 256:
            raise StsError(400, "ValidationError", f"Session tag {index} has an invalid key or value length.")
        tags.append((index, key, value))
        index += 1
    if len(tags) > 50:
        raise StsError(400, "ValidationError", "Cannot pass more than 50 session tags.")
    return tuple((key, value) for _, key, value in tags)


def issue_temporary_identity(role_arn: str, session_name: str, expires_at: float) -> AwsIdentity:
    """Fresh ``ASIA`` credentials for an assumed-role session."""
    account, role_name = role_account(role_arn), role_arn.rsplit("/", 1)[-1]
    return AwsIdentity(
        access_key_id="ASIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16)),
        secret_access_key=secrets.token_urlsafe(30)[:40],
        principal_arn=f"arn:aws:sts::{account}:assumed-role/{role_name}/{session_name}",
        session_token="IQoJb3JpZ2luX2VjE" + secrets.token_urlsafe(300),
        expires_at=expires_at,
    )


def role_account(role_arn: str) -> str:
    """The account id field of an IAM ARN (empty when the ARN is malformed)."""
    fields = role_arn.split(":")
    return fields[4] if len(fields) > 5 else ""


def assume_role_response(identity: AwsIdentity, request: AssumeRoleRequest, request_id: str) -> bytes:
    """The ``AssumeRoleResponse`` XML document STS returns."""
    if identity.session_token is None or identity.expires_at is None:
        raise ValueError("AssumeRole answers carry temporary credentials only")
    expiration = datetime.fromtimestamp(identity.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    source = (
        f"<SourceIdentity>{escape(request.source_identity)}</SourceIdentity>"
        if request.source_identity
        else ""
    )
    role_id = "AROA" + hashlib.sha256(request.role_arn.encode()).hexdigest()[:17].upper()
    return (
        f'<AssumeRoleResponse xmlns="{STS_NAMESPACE}">'
        "<AssumeRoleResult>"
        f"{source}"
        "<AssumedRoleUser>"
        f"<AssumedRoleId>{role_id}:{escape(request.role_session_name)}</AssumedRoleId>"
        f"<Arn>{escape(identity.principal_arn)}</Arn>"
        "</AssumedRoleUser>"
        "<Credentials>"
        f"<AccessKeyId>{identity.access_key_id}</AccessKeyId>"
        f"<SecretAccessKey>{escape(identity.secret_access_key)}</SecretAccessKey>"
        f"<SessionToken>{escape(identity.session_token)}</SessionToken>"
        f"<Expiration>{expiration}</Expiration>"
        "</Credentials>"
        f"<PackedPolicySize>{len(request.tags)}</PackedPolicySize>"
        "</AssumeRoleResult>"
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
        "</AssumeRoleResponse>"
    ).encode()


def caller_identity_response(identity: AwsIdentity, request_id: str) -> bytes:
    """The ``GetCallerIdentityResponse`` XML document, for gateways that probe their credentials."""
    account = role_account(identity.principal_arn)
    return (
        f'<GetCallerIdentityResponse xmlns="{STS_NAMESPACE}">'
        "<GetCallerIdentityResult>"
        f"<Arn>{escape(identity.principal_arn)}</Arn>"
        f"<UserId>{identity.access_key_id}</UserId>"
        f"<Account>{account}</Account>"
        "</GetCallerIdentityResult>"
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
        "</GetCallerIdentityResponse>"
    ).encode()


def sts_error_response(code: str, message: str, request_id: str) -> bytes:
    """STS's XML ``ErrorResponse``, which botocore's query parser turns into a ``ClientError``."""
    return (
        f'<ErrorResponse xmlns="{STS_NAMESPACE}">'
        f"<Error><Type>Sender</Type><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId>"
        "</ErrorResponse>"
    ).encode()


# SigV4 failures as the query protocol names them (the JSON services use the exception names).
STS_ERROR_CODES = {
    "UnrecognizedClientException": "InvalidClientTokenId",
    "InvalidSignatureException": "SignatureDoesNotMatch",
    "ExpiredTokenException": "ExpiredToken",
}
