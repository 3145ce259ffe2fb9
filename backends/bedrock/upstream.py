"""Amazon Bedrock upstream: endpoint, path mapping, AWS credentials and SigV4 signing.

Clients talk the Bedrock Runtime wire format to the gateway without signing; this module signs
each request with the gateway's own AWS credential (long-term keys, the default provider chain, or
an STS role session per user that records who made the call in CloudTrail).
"""

from __future__ import annotations

import asyncio
import datetime
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import BotoCoreError, ClientError

from backends.base import Caller, Endpoint, ModelRef, Operation, SignedRequest
from backends.bedrock import ids
from backends.credentials import NEVER, Expiring, RefreshingCache
from backends.errors import BackendError

# Bedrock Runtime signs as service "bedrock" (its endpoint prefix differs from its signing name).
# https://docs.aws.amazon.com/bedrock/latest/userguide/inference-invoke.html
SIGNING_NAME = "bedrock"

_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)+")

# STS caps session durations at 12 hours and refuses less than 15 minutes.
# https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRole.html
_MIN_DURATION, _MAX_DURATION = 900, 43_200
# RoleSessionName and SourceIdentity: 2-64 characters of [\w+=,.@-] (\w is ASCII here, as in
# STS's Java-style pattern). https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRole.html
_STS_DISALLOWED = re.compile(r"[^\w+=,.@-]", re.ASCII)
_STS_NAME_MAX = 64
# Session tag values: up to 256 characters of letters, digits, spaces and _.:/=+-@.
# https://docs.aws.amazon.com/IAM/latest/UserGuide/id_session-tags.html#id_session-tags_know
_TAG_VALUE_MAX = 256
_TAG_VALUE_EXTRA = frozenset(" _.:/=+-@")

# Only these request headers are signed: host and content-type pass through Envoy unchanged, and
# x-amz-* headers are AWS's own. Hop-by-hop headers, content-length (Envoy may re-frame the body)
# and user-agent are never signed, so nothing Envoy rewrites can break the signature.
_SIGNED_HEADER = "content-type"
_SIGNED_PREFIX = "x-amz-"
# Set by the signer itself; a client-sent value is never signed.
_SIGNER_HEADERS = frozenset({"x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})
_RETURNED_HEADERS = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
# Hashing a multi-megabyte image body takes milliseconds; above this size it leaves the event loop.
_INLINE_SIGN_MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class StaticKeys:
    """Long-term (or externally managed temporary) access keys given in the configuration."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class DefaultChain:
    """botocore's default provider chain: environment, shared files, SSO, container or instance role."""


@dataclass(frozen=True, slots=True)
class AssumeRole:
    """An IAM role assumed per user with sts:AssumeRole.

    The role's trust policy must allow ``sts:AssumeRole``, ``sts:SetSourceIdentity`` and
    ``sts:TagSession`` for the source credentials' principal.
    """

    role_arn: str
    external_id: str | None = None
    duration_seconds: int = 3600
    source_credentials: StaticKeys | DefaultChain = field(default_factory=DefaultChain)
    sts_endpoint_url: str | None = None
    sts_region: str | None = None


@dataclass(frozen=True, slots=True)
class BedrockSettings:
    """One Bedrock upstream as the configuration describes it."""

    name: str
    region: str
    credentials: StaticKeys | DefaultChain | AssumeRole
    base_url: str | None = None
    fips: bool = False
    model_map: Mapping[str, str] = field(default_factory=dict)


class StsClient(Protocol):
    """The part of botocore's STS client the upstream uses (a Stubber-wrapped client in tests)."""

    def assume_role(self, **kwargs: Any) -> Mapping[str, Any]:
        """Call sts:AssumeRole."""
        ...


def _sts_name(raw: str) -> str:
    cleaned = _STS_DISALLOWED.sub("-", raw)[:_STS_NAME_MAX]
    # STS refuses names shorter than 2 characters.
    return cleaned.ljust(2, "-")


def source_identity(caller: Caller) -> str:
    """The STS SourceIdentity for ``caller``: the email (else the subject) in STS's allowed alphabet.

    SourceIdentity persists through role chaining and is logged by CloudTrail, so actions in AWS
    can be traced to the person. https://docs.aws.amazon.com/IAM/latest/UserGuide/id_credentials_temp_control-access_monitor.html
    """
    return _sts_name(caller.email or caller.sub)


def role_session_name(caller: Caller) -> str:
    """The RoleSessionName for ``caller``; it appears in the assumed-role ARN in CloudTrail."""
    return _sts_name(caller.email or caller.sub)


def _tag_value(raw: str) -> str:
    return "".join(c if c.isalnum() or c in _TAG_VALUE_EXTRA else "_" for c in raw)[:_TAG_VALUE_MAX]


def session_tags(caller: Caller) -> list[dict[str, str]]:
    """Session tags naming the user, usable in IAM conditions as ``aws:PrincipalTag/gateway-user``."""
    tags = [{"Key": "gateway-user", "Value": _tag_value(caller.email or caller.sub)}]
    if caller.sub:
        tags.append({"Key": "gateway-sub", "Value": _tag_value(caller.sub)})
    return tags


def _client_error(exc: ClientError | BotoCoreError) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "unknown error"))
    return type(exc).__name__


def endpoint(region: str, base_url: str | None, *, fips: bool = False) -> Endpoint:
    """``base_url`` (VPC interface endpoints, the local emulator) or the Bedrock runtime host for
    ``region`` (the FIPS one when asked). https://docs.aws.amazon.com/general/latest/gr/bedrock.html
    """
    if base_url is not None:
        try:
            return Endpoint.parse(base_url)
        except BackendError as exc:
            raise BackendError(f"base_url {exc}") from exc.__cause__
    prefix = "bedrock-runtime-fips" if fips else "bedrock-runtime"
    return Endpoint.https(f"{prefix}.{region}.amazonaws.com")


class BedrockUpstream:
    """A Bedrock Runtime endpoint plus the AWS credential that signs requests to it.

    ``sts_client`` is injectable for tests (a ``Stubber``-wrapped client); by default one is
    created from the AssumeRole settings on the first fetch, in a thread.
    """

    kind = "bedrock"

    def __init__(
        self,
        settings: BedrockSettings,
        *,
        sts_client: StsClient | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        if not _REGION.fullmatch(settings.region):
            raise BackendError(f"bedrock upstream {settings.name!r}: region {settings.region!r} is invalid")
        creds = settings.credentials
        if isinstance(creds, AssumeRole):
            if not creds.role_arn.startswith("arn:"):
                raise BackendError(f"bedrock upstream {settings.name!r}: role_arn must be an IAM role ARN")
            if not _MIN_DURATION <= creds.duration_seconds <= _MAX_DURATION:
                raise BackendError(
                    f"bedrock upstream {settings.name!r}: duration_seconds must be in "
                    f"[{_MIN_DURATION}, {_MAX_DURATION}] (and within the role's maximum session duration)"
                )
        self.name = settings.name
        self.settings = settings
        self.endpoint = endpoint(settings.region, settings.base_url, fips=settings.fips)
        self.authority = self.endpoint.authority
        self._model_map = dict(settings.model_map)
        self._sts_client = sts_client
        self._owns_sts_client = sts_client is None
        self._lock = threading.Lock()
        self._chain: Any = None
        # Keyed by caller for AssumeRole (each user gets their own SourceIdentity), by "" otherwise.
        self._cache: RefreshingCache[tuple[str, str], ReadOnlyCredentials] = RefreshingCache(
            name=f"AWS credentials for bedrock upstream {settings.name!r}", clock=clock, maxsize=cache_size
        )

    def model_id(self, model: ModelRef) -> str:
        """``model_map``'s Bedrock id for the canonical model, else the id as parsed and rebuilt."""
        return self._model_map.get(model.canonical, model.upstream_id)

    def path(self, operation: Operation, model_id: str | None, query: str = "") -> str:
        """The Bedrock Runtime path (ListInferenceProfiles belongs to the control plane,
        ``bedrock.{region}.amazonaws.com``, which shares the "bedrock" signing name; the runtime
        host serves it only behind the emulator, so against real AWS it is refused there)."""
        return ids.request_path(operation, model_id, query)

    async def sign(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        caller: Caller,
    ) -> SignedRequest:
        """Sign the request with SigV4 for the exact URL, headers and body that will be sent.

        ``path`` is sent as is, percent-encoding included; botocore's canonical URI encodes it once
        more, as AWS does for every service but S3 when it verifies the signature.
        https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html
        """
        credentials = await self.credentials(caller)
        to_sign = {"host": self.authority}
        for name, value in headers.items():
            lname = name.lower()
            if lname == _SIGNED_HEADER or (lname.startswith(_SIGNED_PREFIX) and lname not in _SIGNER_HEADERS):
                to_sign[lname] = value
        request = AWSRequest(
            method=method.upper(),
            url=f"{self.endpoint.scheme}://{self.authority}{path}",
            data=body,
            headers=to_sign,
        )
        signer = SigV4Auth(credentials, SIGNING_NAME, self.settings.region)
        if len(body) > _INLINE_SIGN_MAX_BODY:
            await asyncio.to_thread(signer.add_auth, request)
        else:
            signer.add_auth(request)
        out = {name: str(request.headers[name]) for name in _RETURNED_HEADERS if name in request.headers}
        return SignedRequest(authority=self.authority, path=path, headers=out)

    async def credentials(self, caller: Caller) -> ReadOnlyCredentials:
        """The AWS credentials to sign a request for ``caller`` with (fetched off the event loop)."""
        creds = self.settings.credentials
        if isinstance(creds, StaticKeys):
            return ReadOnlyCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
        if isinstance(creds, DefaultChain):
            return await self._cache.get(("", ""), self._fetch_default_chain)
        return await self._cache.get((caller.sub, caller.email), lambda: self._assume_role(creds, caller))

    def on_credential_refresh_failure(self, callback: Callable[[str], None]) -> None:
        """Report each failed credential refresh to ``callback`` with this upstream's name."""
        self._cache.on_refresh_failure(lambda: callback(self.name))

    async def aclose(self) -> None:
        """Stop in-flight credential fetches and close the STS client this upstream created."""
        await self._cache.aclose()
        client = self._sts_client
        if self._owns_sts_client and client is not None and hasattr(client, "close"):
            client.close()

    # The methods below run in worker threads (RefreshingCache uses asyncio.to_thread).

    def _fetch_default_chain(self) -> Expiring[ReadOnlyCredentials]:
        with self._lock:
            if self._chain is None:
                self._chain = botocore.session.get_session().get_credentials()
        if self._chain is None:
            raise BackendError(
                f"bedrock upstream {self.name!r}: no AWS credentials found in the default chain "
                "(environment, shared config, SSO, container or instance role)"
            )
        try:
            # May refresh (IMDS, SSO, a profile's role) and so block: this runs in a thread.
            frozen = self._chain.get_frozen_credentials()
        except (BotoCoreError, ClientError) as exc:
            raise BackendError(
                f"bedrock upstream {self.name!r}: loading AWS credentials failed ({_client_error(exc)})"
            ) from exc
        # RefreshableCredentials keep their expiry only in this attribute; plain Credentials
        # (long-term keys from the environment or a file) have none and never expire.
        expiry = getattr(self._chain, "_expiry_time", None)
        expires_at = expiry.timestamp() if isinstance(expiry, datetime.datetime) else NEVER
        return Expiring(frozen, expires_at)

    def _sts(self, role: AssumeRole) -> StsClient:
        with self._lock:
            if self._sts_client is None:
                source = role.source_credentials
                keys: dict[str, str | None] = {}
                if isinstance(source, StaticKeys):
                    keys = {
                        "aws_access_key_id": source.access_key_id,
                        "aws_secret_access_key": source.secret_access_key,
                        "aws_session_token": source.session_token,
                    }
                # A regional STS endpoint (botocore's default for a named region) keeps working
                # when us-east-1 does not. Standard retries cover STS throttling.
                self._sts_client = botocore.session.get_session().create_client(
                    "sts",
                    region_name=role.sts_region or self.settings.region,
                    endpoint_url=role.sts_endpoint_url,
                    config=Config(retries={"mode": "standard"}, connect_timeout=5, read_timeout=10),
                    **keys,
                )
            return self._sts_client

    def _assume_role(self, role: AssumeRole, caller: Caller) -> Expiring[ReadOnlyCredentials]:
        params: dict[str, Any] = {
            "RoleArn": role.role_arn,
            "RoleSessionName": role_session_name(caller),
            "DurationSeconds": role.duration_seconds,
            "SourceIdentity": source_identity(caller),
            "Tags": session_tags(caller),
        }
        if role.external_id is not None:
            params["ExternalId"] = role.external_id
        try:
            response = self._sts(role).assume_role(**params)
        except (BotoCoreError, ClientError) as exc:
            raise BackendError(
                f"bedrock upstream {self.name!r}: sts:AssumeRole of {role.role_arn} failed "
                f"({_client_error(exc)}); check that the role trusts the gateway's principal for "
                "sts:AssumeRole, sts:SetSourceIdentity and sts:TagSession"
            ) from exc
        issued = response["Credentials"]
        frozen = ReadOnlyCredentials(issued["AccessKeyId"], issued["SecretAccessKey"], issued["SessionToken"])
        return Expiring(frozen, issued["Expiration"].timestamp())
