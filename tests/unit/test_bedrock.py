"""Bedrock upstream: endpoints, path mapping, SigV4 signatures and AWS credential sources."""

from __future__ import annotations

import datetime
import hmac
import re
import socket
import threading
from collections.abc import Mapping
from typing import Any

import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials
from botocore.stub import Stubber

from backends.base import Caller, ModelRef
from backends.bedrock import BedrockConfig
from backends.bedrock.upstream import (
    AssumeRole,
    BedrockSettings,
    BedrockUpstream,
    DefaultChain,
    StaticKeys,
    StsClient,
    role_session_name,
    session_tags,
    source_identity,
)
from backends.errors import BackendError
from backends.kinds import KINDS

ALICE = Caller(sub="00u1alice", email="alice@example.com", groups=("eng",))
BOB = Caller(sub="00u2bob", email="bob+ai@example.com", groups=())
KEYS = StaticKeys("AKIDEXAMPLESTATIC01", "static-secret-do-not-log")
TEMP_KEYS = StaticKeys("ASIAEXAMPLETEMP0001", "temp-secret-do-not-log", "temp-session-token")
ROLE_ARN = "arn:aws:iam::123456789012:role/claude-gateway"
PROFILE_ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5"
ENCODED_ARN = (
    "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-opus-5-5"
)
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
BODY = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":16,"messages":[]}'


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a network connection (unit tests must not)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def settings(**overrides: Any) -> BedrockSettings:
    values: dict[str, Any] = {"name": "bedrock-main", "region": "us-east-1", "credentials": KEYS}
    values.update(overrides)
    return BedrockSettings(**values)


class Clock:
    """A settable clock in seconds since the epoch."""

    def __init__(self, now: datetime.datetime = T0) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now


def verify_sigv4(
    *, method: str, url: str, received: Mapping[str, str], body: bytes, secret: str, token: str | None = None
) -> bool:
    """Verify a request's SigV4 signature the way a server does, recomputed with botocore's SigV4Auth.

    Only the headers named in SignedHeaders are taken from what was received, the timestamp is the
    received X-Amz-Date, and the URL is the raw one on the wire.
    """
    match = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)"
        r"/aws4_request, SignedHeaders=(?P<signed>[^,]+), Signature=(?P<sig>[0-9a-f]{64})",
        received["authorization"],
    )
    assert match is not None, received["authorization"]
    assert received["x-amz-date"].startswith(match["date"])
    request = AWSRequest(
        method=method, url=url, data=body, headers={h: received[h] for h in match["signed"].split(";")}
    )
    request.context["timestamp"] = received["x-amz-date"]
    signer = SigV4Auth(ReadOnlyCredentials(match["key"], secret, token), match["service"], match["region"])
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    return hmac.compare_digest(expected, match["sig"])


def sts_client() -> Any:
    return botocore.session.get_session().create_client(
        "sts",
        region_name="us-east-1",
        aws_access_key_id="AKIDSOURCE000000",
        aws_secret_access_key="source-secret-do-not-log",
    )


def sts_response(key_id: str, expires: datetime.datetime) -> dict[str, Any]:
    return {
        "Credentials": {
            "AccessKeyId": key_id,
            "SecretAccessKey": f"secret-of-{key_id}",
            "SessionToken": f"token-of-{key_id}",
            "Expiration": expires,
        },
        "AssumedRoleUser": {"AssumedRoleId": "AROAEXAMPLE:alice", "Arn": f"{ROLE_ARN}/alice"},
    }


def assume_params(caller: Caller, **extra: Any) -> dict[str, Any]:
    return {
        "RoleArn": ROLE_ARN,
        "RoleSessionName": role_session_name(caller),
        "DurationSeconds": 3600,
        "SourceIdentity": source_identity(caller),
        "Tags": session_tags(caller),
        **extra,
    }


# --- endpoints ------------------------------------------------------------------------------------


def test_default_endpoint_is_regional_bedrock_runtime() -> None:
    """Without base_url the upstream is https://bedrock-runtime.{region}.amazonaws.com."""
    upstream = BedrockUpstream(settings(region="eu-west-1"))
    assert (upstream.endpoint.scheme, upstream.authority) == (
        "https",
        "bedrock-runtime.eu-west-1.amazonaws.com",
    )
    assert (upstream.kind, upstream.name) == ("bedrock", "bedrock-main")


def test_fips_endpoint() -> None:
    """fips selects the bedrock-runtime-fips host."""
    upstream = BedrockUpstream(settings(region="us-gov-west-1", fips=True))
    assert upstream.authority == "bedrock-runtime-fips.us-gov-west-1.amazonaws.com"


def test_base_url_overrides_the_endpoint() -> None:
    """A base_url (VPC endpoint, emulator) sets scheme and authority, dropping a default port."""
    vpce = BedrockUpstream(
        settings(base_url="https://VPCE-1.bedrock-runtime.us-east-1.vpce.amazonaws.com:443/")
    )
    assert (vpce.endpoint.scheme, vpce.authority) == (
        "https",
        "vpce-1.bedrock-runtime.us-east-1.vpce.amazonaws.com",
    )
    emulator = BedrockUpstream(settings(base_url="http://127.0.0.1:8081"))
    assert (emulator.endpoint.scheme, emulator.authority) == ("http", "127.0.0.1:8081")
    ipv6 = BedrockUpstream(settings(base_url="http://[::1]:9000"))
    assert ipv6.authority == "[::1]:9000"


@pytest.mark.parametrize(
    "base_url",
    ["http://bedrock.example.com", "ftp://127.0.0.1", "https://host/prefix", "https://host?x=1", "https://"],
)
def test_unusable_base_url_is_refused(base_url: str) -> None:
    """Plain http to a non-loopback host, other schemes, and a path or query are refused."""
    with pytest.raises(BackendError, match="base_url"):
        BedrockUpstream(settings(base_url=base_url))


def test_base_url_with_user_info_is_refused_without_echoing_it() -> None:
    """A base_url carrying user:password is refused and the password is not in the message."""
    with pytest.raises(BackendError) as info:
        BedrockUpstream(settings(base_url="https://user:hunter2@host"))
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("region", ["", "us-east-1.evil.com", "US-EAST-1", "us_east_1", "useast1"])
def test_invalid_region_is_refused(region: str) -> None:
    """A region that is not of the form xx-yyyy-n is refused (it becomes part of the host name)."""
    with pytest.raises(BackendError, match="region"):
        BedrockUpstream(settings(region=region))


@pytest.mark.parametrize("duration", [899, 43_201])
def test_assume_role_duration_out_of_range_is_refused(duration: int) -> None:
    """DurationSeconds outside STS's 900-43200 range is refused at construction."""
    with pytest.raises(BackendError, match="duration_seconds"):
        BedrockUpstream(settings(credentials=AssumeRole(ROLE_ARN, duration_seconds=duration)))


def test_kind_table_builds_bedrock_upstream() -> None:
    """The bedrock kind's descriptor builds a BedrockUpstream from its YAML settings."""
    upstream = KINDS["bedrock"].build("bedrock-main", BedrockConfig(region="us-east-1"))
    assert isinstance(upstream, BedrockUpstream) and upstream.name == "bedrock-main"


def test_static_keys_repr_hides_the_secret() -> None:
    """The settings' repr (as logged by a config dump) does not show the secret key or token."""
    text = repr(settings(credentials=TEMP_KEYS))
    assert "temp-secret-do-not-log" not in text
    assert "temp-session-token" not in text


# --- paths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "model", "path"),
    [
        ("invoke", "us.anthropic.claude-opus-5-5", "/model/us.anthropic.claude-opus-5-5/invoke"),
        (
            "stream",
            "us.anthropic.claude-opus-5-5",
            "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream",
        ),
        (
            "count_tokens",
            "anthropic.claude-haiku-4-5-20251001-v1:0",
            "/model/anthropic.claude-haiku-4-5-20251001-v1%3A0/count-tokens",
        ),
        ("list_profiles", None, "/inference-profiles"),
    ],
)
def test_bedrock_paths_are_built_from_the_model_id(operation: str, model: str | None, path: str) -> None:
    """Bedrock invoke, streaming, count-tokens and inference-profile paths are built by the gateway."""
    assert BedrockUpstream(settings()).path(operation, model) == path  # type: ignore[arg-type]


def test_arn_is_percent_encoded_as_botocore_does() -> None:
    """An inference-profile ARN's ':' and '/' are encoded inside the one path segment."""
    path = BedrockUpstream(settings()).path("stream", PROFILE_ARN)
    assert path == f"/model/{ENCODED_ARN}/invoke-with-response-stream"


def test_model_map_replaces_a_mapped_model() -> None:
    """A model_map entry for the canonical id replaces the parsed id; others keep theirs."""
    upstream = BedrockUpstream(settings(model_map={"claude-opus-5-5": PROFILE_ARN}))
    mapped = ModelRef("us.anthropic.claude-opus-5-5", "claude-opus-5-5", regional=True)
    assert upstream.model_id(mapped) == PROFILE_ARN
    kept = ModelRef("us.anthropic.claude-haiku-4-5", "claude-haiku-4-5", regional=True)
    assert upstream.model_id(kept) == "us.anthropic.claude-haiku-4-5"


@pytest.mark.parametrize("operation", ["list_models", "converse"])
def test_unsupported_operation_is_refused(operation: str) -> None:
    """Operations Bedrock has no route for raise BackendError."""
    with pytest.raises(BackendError):
        BedrockUpstream(settings()).path(operation, "us.anthropic.claude-opus-5-5")  # type: ignore[arg-type]


# --- SigV4 ----------------------------------------------------------------------------------------


async def test_signature_verifies_for_the_raw_percent_encoded_path() -> None:
    """The SigV4 headers verify against the exact %2F path, host and body that are sent."""
    upstream = BedrockUpstream(settings())
    path = upstream.path("stream", PROFILE_ARN)
    incoming = {
        "Content-Type": "application/json",
        "accept": "application/vnd.amazon.eventstream",
        "user-agent": "claude-cli/2.0.0 (external, cli)",
        "content-length": str(len(BODY)),
        "anthropic-beta": "interleaved-thinking-2025-05-14",
    }
    signed = await upstream.sign(method="POST", path=path, headers=incoming, body=BODY, caller=ALICE)

    assert signed.path == path
    assert signed.authority == "bedrock-runtime.us-east-1.amazonaws.com"
    assert set(signed.headers) == {"authorization", "x-amz-date"}
    assert "SignedHeaders=content-type;host;x-amz-date," in signed.headers["authorization"]
    assert "/us-east-1/bedrock/aws4_request" in signed.headers["authorization"]
    received = {"host": signed.authority, "content-type": "application/json", **signed.headers}
    url = f"https://{signed.authority}{path}"
    assert verify_sigv4(method="POST", url=url, received=received, body=BODY, secret=KEYS.secret_access_key)
    # The same signature does not verify for the decoded path or another body: the bytes matter.
    decoded = f"https://{signed.authority}/model/{PROFILE_ARN}/invoke-with-response-stream"
    assert not verify_sigv4(
        method="POST", url=decoded, received=received, body=BODY, secret=KEYS.secret_access_key
    )
    assert not verify_sigv4(
        method="POST", url=url, received=received, body=BODY + b" ", secret=KEYS.secret_access_key
    )


def test_canonical_uri_encodes_the_raw_path_once_more() -> None:
    """botocore's canonical URI for a %2F path is encoded twice, as AWS requires for non-S3 services."""
    request = AWSRequest(method="POST", url=f"https://h/model/{ENCODED_ARN}/invoke", data=b"")
    request.context["timestamp"] = "20300101T000000Z"
    canonical = SigV4Auth(ReadOnlyCredentials("a", "b", None), "bedrock", "us-east-1").canonical_request(
        request
    )
    assert canonical.split("\n")[1] == "/model/" + ENCODED_ARN.replace("%", "%25") + "/invoke"


async def test_signature_matches_botocore_signing_the_same_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the same X-Amz-Date, botocore's own SigV4Auth produces the same Authorization header."""
    upstream = BedrockUpstream(settings(region="us-west-2"))
    path = "/inference-profiles?type=SYSTEM_DEFINED"
    signed = await upstream.sign(method="get", path=path, headers={}, body=b"", caller=ALICE)

    when = datetime.datetime.strptime(signed.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: when)
    reference = AWSRequest(
        method="GET", url=f"https://bedrock-runtime.us-west-2.amazonaws.com{path}", data=b""
    )
    SigV4Auth(
        ReadOnlyCredentials(KEYS.access_key_id, KEYS.secret_access_key, None), "bedrock", "us-west-2"
    ).add_auth(reference)
    assert signed.headers["authorization"] == reference.headers["Authorization"]


async def test_signature_verifies_against_a_loopback_base_url() -> None:
    """Signing for the emulator covers http://127.0.0.1:port, the host header including the port."""
    upstream = BedrockUpstream(settings(base_url="http://127.0.0.1:8081"))
    path = "/model/us.anthropic.claude-opus-5-5/invoke"
    signed = await upstream.sign(
        method="POST", path=path, headers={"content-type": "application/json"}, body=BODY, caller=ALICE
    )
    received = {"host": "127.0.0.1:8081", "content-type": "application/json", **signed.headers}
    url = f"http://127.0.0.1:8081{path}"
    assert verify_sigv4(method="POST", url=url, received=received, body=BODY, secret=KEYS.secret_access_key)


async def test_session_token_header_is_set_and_signed_for_temporary_keys() -> None:
    """Temporary credentials add x-amz-security-token, which is part of the signature."""
    upstream = BedrockUpstream(settings(credentials=TEMP_KEYS))
    path = "/model/us.anthropic.claude-opus-5-5/invoke"
    signed = await upstream.sign(method="POST", path=path, headers={}, body=BODY, caller=ALICE)

    assert signed.headers["x-amz-security-token"] == "temp-session-token"
    assert "x-amz-security-token" in signed.headers["authorization"].split("SignedHeaders=")[1].split(",")[0]
    received = {"host": signed.authority, **signed.headers}
    assert verify_sigv4(
        method="POST",
        url=f"https://{signed.authority}{path}",
        received=received,
        body=BODY,
        secret=TEMP_KEYS.secret_access_key,
        token=TEMP_KEYS.session_token,
    )


async def test_client_sent_signing_headers_are_not_trusted() -> None:
    """A client's own x-amz-date, security token or authorization never reach the signature."""
    upstream = BedrockUpstream(settings())
    signed = await upstream.sign(
        method="POST",
        path="/model/m/invoke",
        headers={
            "authorization": "Bearer gateway-token",
            "x-amz-date": "19990101T000000Z",
            "x-amz-security-token": "client-token",
            "x-amz-content-sha256": "0" * 64,
            "x-amz-bedrock-custom": "kept",
        },
        body=BODY,
        caller=ALICE,
    )
    assert signed.headers["x-amz-date"] != "19990101T000000Z"
    assert "x-amz-security-token" not in signed.headers
    assert "SignedHeaders=host;x-amz-bedrock-custom;x-amz-date," in signed.headers["authorization"]


async def test_large_body_is_signed_correctly_off_the_loop() -> None:
    """A multi-megabyte body (hashed in a worker thread) still yields a verifying signature."""
    upstream = BedrockUpstream(settings())
    body = b"x" * (3 << 20)
    signed = await upstream.sign(method="POST", path="/model/m/invoke", headers={}, body=body, caller=ALICE)
    received = {"host": signed.authority, **signed.headers}
    url = f"https://{signed.authority}/model/m/invoke"
    assert verify_sigv4(method="POST", url=url, received=received, body=body, secret=KEYS.secret_access_key)


# --- AssumeRole -----------------------------------------------------------------------------------


async def test_assume_role_is_called_with_role_external_id_source_identity_and_tags() -> None:
    """AssumeRole gets the RoleArn, ExternalId, sanitised SourceIdentity and the user's session tags."""
    client = sts_client()
    role = AssumeRole(ROLE_ARN, external_id="ext-123")
    upstream = BedrockUpstream(settings(credentials=role), sts_client=client, clock=Clock())
    expected = {
        "RoleArn": ROLE_ARN,
        "RoleSessionName": "bob+ai@example.com",
        "DurationSeconds": 3600,
        "SourceIdentity": "bob+ai@example.com",
        "Tags": [
            {"Key": "gateway-user", "Value": "bob+ai@example.com"},
            {"Key": "gateway-sub", "Value": "00u2bob"},
        ],
        "ExternalId": "ext-123",
    }
    with Stubber(client) as stubber:
        stubber.add_response(
            "assume_role", sts_response("ASIABOB000000001", T0 + datetime.timedelta(hours=1)), expected
        )
        signed = await upstream.sign(method="POST", path="/model/m/invoke", headers={}, body=BODY, caller=BOB)
        stubber.assert_no_pending_responses()

    assert "Credential=ASIABOB000000001/" in signed.headers["authorization"]
    assert signed.headers["x-amz-security-token"] == "token-of-ASIABOB000000001"
    received = {"host": signed.authority, **signed.headers}
    assert verify_sigv4(
        method="POST",
        url=f"https://{signed.authority}/model/m/invoke",
        received=received,
        body=BODY,
        secret="secret-of-ASIABOB000000001",
        token="token-of-ASIABOB000000001",
    )


async def test_assumed_role_credentials_are_cached_per_caller() -> None:
    """Each caller gets their own role session, reused for that caller's later requests."""
    client = sts_client()
    upstream = BedrockUpstream(settings(credentials=AssumeRole(ROLE_ARN)), sts_client=client, clock=Clock())
    expires = T0 + datetime.timedelta(hours=1)
    with Stubber(client) as stubber:
        stubber.add_response("assume_role", sts_response("ASIAALICE0000001", expires), assume_params(ALICE))
        stubber.add_response("assume_role", sts_response("ASIABOB000000001", expires), assume_params(BOB))
        first = await upstream.credentials(ALICE)
        second = await upstream.credentials(BOB)
        again = await upstream.credentials(ALICE)
        stubber.assert_no_pending_responses()

    assert (first.access_key, second.access_key, again.access_key) == (
        "ASIAALICE0000001",
        "ASIABOB000000001",
        "ASIAALICE0000001",
    )


async def test_assumed_role_is_refreshed_five_minutes_before_expiry() -> None:
    """A role session is reused until 5 minutes before its Expiration, then assumed again."""
    client = sts_client()
    clock = Clock()
    upstream = BedrockUpstream(settings(credentials=AssumeRole(ROLE_ARN)), sts_client=client, clock=clock)
    expires = T0 + datetime.timedelta(hours=1)
    with Stubber(client) as stubber:
        stubber.add_response("assume_role", sts_response("ASIAFIRST0000001", expires), assume_params(ALICE))
        stubber.add_response(
            "assume_role",
            sts_response("ASIASECOND000001", expires + datetime.timedelta(hours=1)),
            assume_params(ALICE),
        )
        assert (await upstream.credentials(ALICE)).access_key == "ASIAFIRST0000001"
        clock.now = expires.timestamp() - 301
        assert (await upstream.credentials(ALICE)).access_key == "ASIAFIRST0000001"
        clock.now = expires.timestamp() - 300
        assert (await upstream.credentials(ALICE)).access_key == "ASIASECOND000001"
        stubber.assert_no_pending_responses()


async def test_assume_role_failure_is_wrapped_without_secrets() -> None:
    """An STS error becomes a BackendError naming the role and error code, not the source secret."""
    client = sts_client()
    upstream = BedrockUpstream(settings(credentials=AssumeRole(ROLE_ARN)), sts_client=client, clock=Clock())
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "assume_role", "AccessDenied", "not authorized to perform sts:TagSession", 403
        )
        with pytest.raises(BackendError) as info:
            await upstream.credentials(ALICE)
    message = str(info.value)
    assert ROLE_ARN in message and "AccessDenied" in message
    assert "source-secret-do-not-log" not in message


class ThreadRecordingSts:
    """A fake STS client, typed against StsClient, that records the thread each call runs in."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def assume_role(self, **kwargs: Any) -> Mapping[str, Any]:
        self.threads.append(threading.get_ident())
        return sts_response("ASIATHREAD000001", T0 + datetime.timedelta(hours=1))


async def test_assume_role_runs_off_the_event_loop() -> None:
    """sts:AssumeRole is called from a worker thread, not the event loop's thread."""
    fake = ThreadRecordingSts()
    client: StsClient = fake
    upstream = BedrockUpstream(settings(credentials=AssumeRole(ROLE_ARN)), sts_client=client, clock=Clock())
    await upstream.credentials(ALICE)
    assert fake.threads and fake.threads[0] != threading.get_ident()


async def test_sts_client_is_created_with_endpoint_and_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an injected client, the STS client gets sts_endpoint_url, sts_region and the source keys."""
    created: dict[str, Any] = {}

    class FakeSession:
        def create_client(self, service: str, **kwargs: Any) -> ThreadRecordingSts:
            created.update(kwargs, service=service)
            return ThreadRecordingSts()

    monkeypatch.setattr(botocore.session, "get_session", FakeSession)
    role = AssumeRole(
        ROLE_ARN, source_credentials=KEYS, sts_endpoint_url="http://127.0.0.1:8082", sts_region="eu-west-1"
    )
    upstream = BedrockUpstream(settings(credentials=role), clock=Clock())
    await upstream.credentials(ALICE)
    assert created["service"] == "sts"
    assert created["endpoint_url"] == "http://127.0.0.1:8082"
    assert created["region_name"] == "eu-west-1"
    assert created["aws_access_key_id"] == KEYS.access_key_id
    await upstream.aclose()


# --- default chain --------------------------------------------------------------------------------


class CountingRefreshable(RefreshableCredentials):  # type: ignore[misc]
    """botocore's RefreshableCredentials, counting get_frozen_credentials calls."""

    frozen_calls = 0

    def get_frozen_credentials(self) -> Any:
        type(self).frozen_calls += 1
        return super().get_frozen_credentials()


async def test_default_chain_credentials_are_cached_until_their_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refreshable default-chain credentials are frozen once and re-read 5 minutes before they expire."""
    expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    chain = CountingRefreshable(
        "ASIACHAIN0000001", "chain-secret", "chain-token", expiry, lambda: {}, "test-provider"
    )
    sessions: list[object] = []

    class FakeSession:
        def __init__(self) -> None:
            sessions.append(self)

        def get_credentials(self) -> Any:
            return chain

    monkeypatch.setattr(botocore.session, "get_session", FakeSession)
    clock = Clock(datetime.datetime.now(datetime.UTC))
    upstream = BedrockUpstream(settings(credentials=DefaultChain()), clock=clock)

    assert (await upstream.credentials(ALICE)).token == "chain-token"
    assert (await upstream.credentials(BOB)).access_key == "ASIACHAIN0000001"
    assert CountingRefreshable.frozen_calls == 1
    clock.now = expiry.timestamp() - 300
    await upstream.credentials(ALICE)
    assert CountingRefreshable.frozen_calls == 2
    assert len(sessions) == 1


async def test_empty_default_chain_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the default chain finds no credentials, signing fails with a BackendError saying so."""

    class EmptySession:
        def get_credentials(self) -> None:
            return None

    monkeypatch.setattr(botocore.session, "get_session", EmptySession)
    upstream = BedrockUpstream(settings(credentials=DefaultChain()))
    with pytest.raises(BackendError, match="default chain"):
        await upstream.sign(method="POST", path="/model/m/invoke", headers={}, body=b"", caller=ALICE)


# --- STS names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        (Caller("s", "alice@example.com", ()), "alice@example.com"),
        (Caller("s", "bob+ai@example.com", ()), "bob+ai@example.com"),
        (Caller("s", "jöhn doe@example.com", ()), "j-hn-doe@example.com"),
        (Caller("s", "aws:root@example.com", ()), "aws-root@example.com"),
        (Caller("auth0|12345", "", ()), "auth0-12345"),
        (Caller("x", "", ()), "x-"),
        (Caller("s", "a" * 80 + "@example.com", ()), "a" * 64),
    ],
)
def test_source_identity_is_sanitised_to_sts_rules(caller: Caller, expected: str) -> None:
    """SourceIdentity keeps [\\w+=,.@-] (ASCII), replaces the rest, and is 2 to 64 characters long."""
    assert source_identity(caller) == expected
    assert re.fullmatch(r"[\w+=,.@-]{2,64}", source_identity(caller), re.ASCII)
    assert re.fullmatch(r"[\w+=,.@-]{2,64}", role_session_name(caller), re.ASCII)
