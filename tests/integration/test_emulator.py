"""The upstream emulator against the real cloud client libraries: botocore, boto3 and google-auth."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import boto3
import botocore.auth
import pytest
import urllib3
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError
from google.auth.exceptions import RefreshError
from google.auth.transport.urllib3 import Request as GoogleRequest
from google.oauth2 import service_account
from yarl import URL

from backends.emulator import (
    ACCOUNT_ID,
    CLOUD_PLATFORM_SCOPE,
    DEFAULT_PROJECT,
    DEFAULT_ROLE_ARN,
    TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY,
    EmulatorState,
    Scenario,
    generate_service_account_key,
    start_emulator,
)

pytestmark = pytest.mark.integration

REGION = "us-east-1"
MODEL = "us.anthropic.claude-opus-5-5"
ARN_MODEL = f"arn:aws:bedrock:{REGION}:{ACCOUNT_ID}:application-inference-profile/a1b2c3d4"
BEDROCK_BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "anthropic_beta": ["claude-code-20250219"],
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello"}],
}
VERTEX_MODEL = "claude-haiku-4-5@20251001"
VERTEX_BODY = {
    "anthropic_version": "vertex-2023-10-16",
    "max_tokens": 64,
    "stream": True,
    "messages": [{"role": "user", "content": "hello"}],
}


@dataclass
class Emulator:
    url: str
    state: EmulatorState
    http: aiohttp.ClientSession
    clients: list[Any] = field(default_factory=list)

    def boto(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for ``service`` aimed at the emulator, closed when the test ends (an
        unclosed one leaves sockets for the garbage collector to warn about during a later test)."""
        client = boto3.client(service, endpoint_url=self.url, region_name=REGION, **kwargs)
        self.clients.append(client)
        return client

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        # encoded=True keeps %2F and %3A in ARN model ids exactly as signed.
        return await self.http.post(URL(self.url + path, encoded=True), data=body, headers=headers)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    state = EmulatorState()
    runner, url = await start_emulator("127.0.0.1", 0, state)
    async with aiohttp.ClientSession() as http:
        made = Emulator(url, state, http)
        yield made
    for client in made.clients:
        client.close()
    await runner.cleanup()


def sigv4_headers(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    access_key: str = TEST_ACCESS_KEY_ID,
    secret_key: str = TEST_SECRET_ACCESS_KEY,
    token: str | None = None,
    region: str = REGION,
    service: str = "bedrock",
    at: datetime | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Sign the way botocore clients do: SigV4Auth on an AWSRequest, optionally at a chosen time."""
    request = AWSRequest(
        method=method, url=url, data=body, headers={"Content-Type": "application/json", **(extra or {})}
    )
    signer = botocore.auth.SigV4Auth(Credentials(access_key, secret_key, token), service, region)
    if at is None:
        signer.add_auth(request)
    else:
        # botocore's own tests pin the signing time the same way.
        with mock.patch("botocore.auth.get_current_datetime", return_value=at.replace(tzinfo=None)):
            signer.add_auth(request)
    return dict(request.headers.items())


def decode_eventstream(raw: bytes) -> list[tuple[dict[str, Any], Any]]:
    """Frames as (headers, payload) with chunk payloads turned back into Anthropic events."""
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    frames = []
    for message in buffer:
        payload: Any = json.loads(message.payload)
        if message.headers.get(":event-type") == "chunk":
            payload = {**payload, "event": json.loads(base64.b64decode(payload["bytes"]))}
        frames.append((message.headers, payload))
    return frames


def decode_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """SSE events as (event name, data)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def invoke(
    emulator: Emulator, action: str, model_path: str = MODEL, **sign: Any
) -> aiohttp.ClientResponse:
    body = json.dumps(BEDROCK_BODY).encode()
    path = f"/model/{model_path}/{action}"
    return await emulator.post(path, body, sigv4_headers("POST", emulator.url + path, body, **sign))


async def test_signed_invoke_is_accepted(emulator: Emulator) -> None:
    """A botocore-signed InvokeModel gets a JSON Messages response with the configured usage."""
    response = await invoke(emulator, "invoke")
    assert response.status == 200, await response.text()
    assert response.headers["content-type"] == "application/json"
    message = await response.json()
    assert message["type"] == "message" and message["model"] == MODEL
    assert message["usage"]["input_tokens"] == 25 and message["usage"]["output_tokens"] == 40
    assert response.headers["x-amzn-bedrock-output-token-count"] == "40"
    assert emulator.state.requests[-1].verdict == "ok"


async def test_signed_stream_decodes_with_botocore(emulator: Emulator) -> None:
    """InvokeModelWithResponseStream returns padded chunk frames botocore decodes, metrics on message_stop."""
    response = await invoke(emulator, "invoke-with-response-stream")
    assert response.status == 200
    assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
    frames = decode_eventstream(await response.read())
    events = [payload["event"] for _, payload in frames]
    assert [event["type"] for event in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(payload["p"] for _, payload in frames)
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["inputTokenCount"] == 25 and metrics["outputTokenCount"] == 40
    assert {"invocationLatency", "firstByteLatency"} <= set(metrics)


async def test_boto3_bedrock_runtime_client_works(emulator: Emulator) -> None:
    """boto3's bedrock-runtime client invokes, streams and counts tokens, with an ARN model id."""
    client = emulator.boto(
        "bedrock-runtime",
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        config=Config(retries={"max_attempts": 1}),
    )
    body = json.dumps(BEDROCK_BODY)

    def call() -> tuple[dict[str, Any], list[dict[str, Any]], int]:
        invoked = json.loads(client.invoke_model(modelId=ARN_MODEL, body=body)["body"].read())
        stream = client.invoke_model_with_response_stream(modelId=ARN_MODEL, body=body)["body"]
        events = [json.loads(part["chunk"]["bytes"]) for part in stream]
        counted = client.count_tokens(modelId=MODEL, input={"invokeModel": {"body": body.encode()}})
        return invoked, events, counted["inputTokens"]

    invoked, events, counted = await asyncio.to_thread(call)
    assert invoked["content"][0]["text"]
    assert events[-1]["type"] == "message_stop"
    assert counted == 25 + 10 + 11
    assert [r.verdict for r in emulator.state.requests] == ["ok", "ok", "ok"]
    assert emulator.state.requests[0].model_id == ARN_MODEL
    assert "%2F" in emulator.state.requests[0].raw_path


async def test_percent_encoded_arn_model_id_verifies(emulator: Emulator) -> None:
    """A model id ARN sent with %3A and %2F verifies against the raw path and is recorded decoded."""
    encoded = ARN_MODEL.replace(":", "%3A").replace("/", "%2F")
    response = await invoke(emulator, "invoke", model_path=encoded)
    assert response.status == 200, await response.text()
    record = emulator.state.requests[-1]
    assert record.model_id == ARN_MODEL
    assert record.raw_path == f"/model/{encoded}/invoke"


@pytest.mark.parametrize(
    ("change", "error_type", "reason"),
    [
        ("tampered_body", "InvalidSignatureException", "does not match the signature"),
        ("wrong_secret", "InvalidSignatureException", "does not match the signature"),
        ("stale_date", "InvalidSignatureException", "Signature expired"),
        ("unknown_key", "UnrecognizedClientException", "security token included in the request is invalid"),
        ("wrong_region", "InvalidSignatureException", "scoped to a valid region, not 'eu-west-3'"),
        ("wrong_service", "InvalidSignatureException", "scoped to correct service: 'bedrock'"),
        ("no_authorization", "UnrecognizedClientException", "Missing Authentication Token"),
        (
            "static_key_with_token",
            "UnrecognizedClientException",
            "security token included in the request is invalid",
        ),
    ],
)
async def test_bad_signatures_are_rejected(
    emulator: Emulator, change: str, error_type: str, reason: str
) -> None:
    """Each way a SigV4 signature can be wrong gets a 403 whose message leaks the account, like AWS."""
    body = json.dumps(BEDROCK_BODY).encode()
    path = f"/model/{MODEL}/invoke"
    changes: dict[str, dict[str, Any]] = {
        "wrong_secret": {"secret_key": "not-the-secret"},
        "stale_date": {"at": datetime.now(UTC) - timedelta(minutes=6)},
        "unknown_key": {"access_key": "AKIDUNKNOWN00000000"},
        "wrong_region": {"region": "eu-west-3"},
        "wrong_service": {"service": "s3"},
        "static_key_with_token": {"token": "IQoJb3JpZ2luX2VjEforged"},
    }
    headers = sigv4_headers("POST", emulator.url + path, body, **changes.get(change, {}))
    if change == "tampered_body":
        body = body.replace(b"hello", b"HELLO")
    if change == "no_authorization":
        del headers["Authorization"]
    response = await emulator.post(path, body, headers)
    assert response.status == 403
    assert response.headers["x-amzn-ErrorType"] == error_type
    message = (await response.json())["message"]
    assert reason in message
    assert ACCOUNT_ID in message and "arn:aws:iam::" in message
    assert emulator.state.requests[-1].verdict.startswith(error_type)


async def test_boto3_sts_assume_role_credentials_sign_bedrock(emulator: Emulator) -> None:
    """boto3's STS client assumes a role; its temporary keys then sign accepted Bedrock calls."""
    emulator.state.allowed_roles[DEFAULT_ROLE_ARN] = "ext-1234"
    sts = emulator.boto(
        "sts",
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
    )
    answer = await asyncio.to_thread(
        sts.assume_role,
        RoleArn=DEFAULT_ROLE_ARN,
        RoleSessionName="gateway-dev",
        ExternalId="ext-1234",
        SourceIdentity="dev@example.com",
        Tags=[{"Key": "user", "Value": "dev@example.com"}],
        DurationSeconds=900,
    )
    creds = answer["Credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")
    assert answer["AssumedRoleUser"]["Arn"].endswith(":assumed-role/EmulatorBedrockRole/gateway-dev")
    assert timedelta(minutes=14) < creds["Expiration"] - datetime.now(UTC) <= timedelta(minutes=15)
    (call,) = emulator.state.assume_role_calls
    assert (call.role_session_name, call.external_id, call.source_identity) == (
        "gateway-dev",
        "ext-1234",
        "dev@example.com",
    )
    assert call.tags == (("user", "dev@example.com"),) and call.granted

    temporary = {"access_key": creds["AccessKeyId"], "secret_key": creds["SecretAccessKey"]}
    assumed = emulator.boto(
        "sts",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )
    whoami = await asyncio.to_thread(assumed.get_caller_identity)
    assert (whoami["Account"], whoami["Arn"]) == (ACCOUNT_ID, answer["AssumedRoleUser"]["Arn"])
    accepted = await invoke(emulator, "invoke", token=creds["SessionToken"], **temporary)
    assert accepted.status == 200, await accepted.text()

    missing_token = await invoke(emulator, "invoke", **temporary)
    wrong_token = await invoke(emulator, "invoke", token="IQoJb3JpZ2luX2VjEwrong", **temporary)
    for refused in (missing_token, wrong_token):
        assert refused.status == 403
        assert refused.headers["x-amzn-ErrorType"] == "UnrecognizedClientException"

    emulator.state.apply_patch({"expire_credentials": True})
    expired = await invoke(emulator, "invoke", token=creds["SessionToken"], **temporary)
    assert expired.status == 403 and expired.headers["x-amzn-ErrorType"] == "ExpiredTokenException"


@pytest.mark.parametrize(
    ("role", "external_id"),
    [(f"arn:aws:iam::{ACCOUNT_ID}:role/NotAllowed", "ext-1234"), (DEFAULT_ROLE_ARN, "wrong-id")],
)
async def test_assume_role_refuses_unknown_role_or_external_id(
    emulator: Emulator, role: str, external_id: str
) -> None:
    """AssumeRole on a role not allowed, or with the wrong ExternalId, fails with AccessDenied."""
    emulator.state.allowed_roles[DEFAULT_ROLE_ARN] = "ext-1234"
    sts = emulator.boto(
        "sts",
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
    )
    with pytest.raises(ClientError) as caught:
        await asyncio.to_thread(sts.assume_role, RoleArn=role, RoleSessionName="s1", ExternalId=external_id)
    assert caught.value.response["Error"]["Code"] == "AccessDenied"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert not emulator.state.assume_role_calls[-1].granted
    assert not emulator.state.temporary_keys


async def test_sts_rejects_bad_signature(emulator: Emulator) -> None:
    """An STS call signed with the wrong secret is refused before any role is assumed."""
    sts = emulator.boto(
        "sts",
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key="wrong",
    )
    with pytest.raises(ClientError) as caught:
        await asyncio.to_thread(sts.assume_role, RoleArn=DEFAULT_ROLE_ARN, RoleSessionName="s1")
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert emulator.state.assume_role_calls == []


async def test_boto3_lists_inference_profiles(emulator: Emulator) -> None:
    """boto3's bedrock client parses the SYSTEM_DEFINED inference profiles the emulator lists."""
    client = emulator.boto(
        "bedrock",
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
    )
    answer = await asyncio.to_thread(client.list_inference_profiles, typeEquals="SYSTEM_DEFINED")
    ids = [profile["inferenceProfileId"] for profile in answer["inferenceProfileSummaries"]]
    assert MODEL in ids and len(ids) >= 2
    assert emulator.state.requests[-1].raw_path == "/inference-profiles?type=SYSTEM_DEFINED"


@pytest.mark.parametrize("key", ["model", "stream"])
async def test_bedrock_rejects_model_and_stream_keys(emulator: Emulator, key: str) -> None:
    """A Bedrock body with ``model`` or ``stream`` gets the service's exact ValidationException."""
    body = json.dumps({**BEDROCK_BODY, key: "x"}).encode()
    path = f"/model/{MODEL}/invoke"
    response = await emulator.post(path, body, sigv4_headers("POST", emulator.url + path, body))
    assert response.status == 400
    assert response.headers["x-amzn-ErrorType"] == "ValidationException"
    assert await response.json() == {
        "message": f"Malformed input request: extraneous key [{key}] is not permitted, please reformat your "
        "input and try again."
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tags": {"team": "a"}}, "Malformed input request: extraneous key [tags] is not permitted"),
        ({"anthropic_beta": ["request-tags-2026-08-21"]}, "invalid beta flag: request-tags-2026-08-21"),
        ({"anthropic_beta": "claude-code-20250219"}, "#/anthropic_beta: expected an array of strings"),
    ],
)
async def test_bedrock_refuses_first_party_only_fields(
    emulator: Emulator, change: dict[str, Any], message: str
) -> None:
    """Bedrock refuses the first-party API's request tags, in the body or as a beta."""
    body = json.dumps({**BEDROCK_BODY, **change}).encode()
    path = f"/model/{MODEL}/invoke"
    response = await emulator.post(path, body, sigv4_headers("POST", emulator.url + path, body))
    assert response.status == 400
    assert message in (await response.json())["message"]


async def test_vertex_refuses_first_party_only_fields(emulator: Emulator, service_account_file: Path) -> None:
    """Vertex refuses a body with tags and the request-tags beta header."""
    token = await google_token(emulator, service_account_file)
    tagged = await vertex(emulator, token, {**VERTEX_BODY, "tags": {"team": "a"}})
    assert tagged.status == 400
    assert (await tagged.json())["error"]["message"] == "tags: Extra inputs are not permitted"
    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": "request-tags-2026-08-21"}
    beta = await emulator.post(vertex_path(), json.dumps(VERTEX_BODY).encode(), headers)
    assert beta.status == 400


@pytest.fixture
def service_account_file(tmp_path: Path) -> Path:
    return tmp_path / "sa.json"


async def google_token(emulator: Emulator, key_path: Path, *, register: bool = True) -> str:
    generate_service_account_key(key_path, token_uri=f"{emulator.url}/token", project_id=DEFAULT_PROJECT)
    if register:
        emulator.state.register_service_account_file(key_path)
    credentials = service_account.Credentials.from_service_account_file(
        str(key_path), scopes=[CLOUD_PLATFORM_SCOPE]
    )
    http = urllib3.PoolManager()
    try:
        await asyncio.to_thread(credentials.refresh, GoogleRequest(http))
    finally:
        http.clear()
    return str(credentials.token)


def vertex_path(
    method: str = "streamRawPredict", model: str = VERTEX_MODEL, project: str = DEFAULT_PROJECT
) -> str:
    return f"/v1/projects/{project}/locations/us-east5/publishers/anthropic/models/{model}:{method}"


async def vertex(
    emulator: Emulator, token: str | None, body: dict[str, Any] = VERTEX_BODY, **path: str
) -> Any:
    headers = {"Content-Type": "application/json", "anthropic-beta": "claude-code-20250219"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await emulator.post(vertex_path(**path), json.dumps(body).encode(), headers)


async def test_google_auth_token_then_vertex_stream(emulator: Emulator, service_account_file: Path) -> None:
    """google-auth's service-account credentials get a token that authorises a Vertex SSE stream."""
    token = await google_token(emulator, service_account_file)
    assert token.startswith("ya29.")
    response = await vertex(emulator, token)
    assert response.status == 200, await response.text()
    assert response.headers["content-type"] == "text/event-stream"
    events = decode_sse(await response.read())
    assert [name for name, _ in events][:2] == ["message_start", "content_block_start"]
    assert events[-1][0] == "message_stop"
    assert events[0][1]["message"]["usage"]["cache_creation"] == {
        "ephemeral_5m_input_tokens": 7,
        "ephemeral_1h_input_tokens": 3,
    }

    raw = await vertex(emulator, token, {**VERTEX_BODY, "stream": False}, method="rawPredict")
    assert raw.status == 200 and (await raw.json())["type"] == "message"
    # count-tokens:rawPredict names no model in its path; the body must.
    body = {"model": "claude-haiku-4-5@20251001", "messages": []}
    counted = await vertex(emulator, token, body, method="rawPredict", model="count-tokens")
    assert await counted.json() == {"input_tokens": 46}
    unnamed = await vertex(emulator, token, {"messages": []}, method="rawPredict", model="count-tokens")
    assert unnamed.status == 400


async def test_vertex_refuses_bad_absent_and_foreign_tokens(emulator: Emulator, tmp_path: Path) -> None:
    """Vertex answers 401 UNAUTHENTICATED without a live token, and /token refuses an unknown key."""
    for token in (None, "ya29.not-issued"):
        response = await vertex(emulator, token)
        assert response.status == 401
        assert (await response.json())["error"]["status"] == "UNAUTHENTICATED"

    with pytest.raises(RefreshError, match="invalid_grant"):
        await google_token(emulator, tmp_path / "foreign.json", register=False)

    token = await google_token(emulator, tmp_path / "sa.json")
    emulator.state.apply_patch({"expire_credentials": True})
    assert (await vertex(emulator, token)).status == 401


async def test_vertex_checks_project_version_and_stream(
    emulator: Emulator, service_account_file: Path
) -> None:
    """Vertex refuses unknown projects, a wrong anthropic_version, and streamRawPredict without stream."""
    token = await google_token(emulator, service_account_file)
    unknown = await vertex(emulator, token, project="someone-elses-project")
    assert unknown.status == 403 and (await unknown.json())["error"]["status"] == "PERMISSION_DENIED"
    wrong_version = await vertex(emulator, token, {**VERTEX_BODY, "anthropic_version": "bedrock-2023-05-31"})
    assert wrong_version.status == 400
    not_streaming = await vertex(emulator, token, {**VERTEX_BODY, "stream": False})
    assert not_streaming.status == 400
    assert (await not_streaming.json())["error"]["type"] == "invalid_request_error"


async def test_token_endpoint_requires_cloud_platform_scope(
    emulator: Emulator, service_account_file: Path
) -> None:
    """A correctly signed assertion without the cloud-platform scope is refused with invalid_scope."""
    generate_service_account_key(service_account_file, token_uri=f"{emulator.url}/token", project_id="p")
    emulator.state.register_service_account_file(service_account_file)
    credentials = service_account.Credentials.from_service_account_file(
        str(service_account_file), scopes=["https://www.googleapis.com/auth/userinfo.email"]
    )
    http = urllib3.PoolManager()
    with pytest.raises(RefreshError, match="invalid_scope"):
        await asyncio.to_thread(credentials.refresh, GoogleRequest(http))
    http.clear()


async def test_scenario_too_long(emulator: Emulator, service_account_file: Path) -> None:
    """too_long gives Bedrock's exact "Input is too long." and Vertex's Anthropic 400 envelope."""
    token = await google_token(emulator, service_account_file)
    emulator.state.apply_patch({"scenario": "too_long"})
    bedrock = await invoke(emulator, "invoke-with-response-stream")
    assert bedrock.status == 400 and bedrock.headers["x-amzn-ErrorType"] == "ValidationException"
    assert await bedrock.json() == {"message": "Input is too long."}
    google = await vertex(emulator, token)
    assert google.status == 400
    assert await google.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 250000 tokens > 200000 maximum",
        },
    }


async def test_scenario_server_error_leaks_account(emulator: Emulator, service_account_file: Path) -> None:
    """server_error answers 500 with a body naming an account ARN on both clouds."""
    token = await google_token(emulator, service_account_file)
    emulator.state.scenario = Scenario.SERVER_ERROR
    bedrock = await invoke(emulator, "invoke")
    google = await vertex(emulator, token)
    for response in (bedrock, google):
        assert response.status == 500
        assert f"arn:aws:iam::{ACCOUNT_ID}:role/" in await response.text()


async def test_scenario_exception_midstream(emulator: Emulator, service_account_file: Path) -> None:
    """exception_midstream sends a few events then a Bedrock exception frame or an SSE overloaded error."""
    token = await google_token(emulator, service_account_file)
    emulator.state.apply_patch({"scenario": "exception_midstream"})
    bedrock = await invoke(emulator, "invoke-with-response-stream")
    assert bedrock.status == 200
    frames = decode_eventstream(await bedrock.read())
    assert [headers[":message-type"] for headers, _ in frames] == ["event"] * 3 + ["exception"]
    assert frames[-1][0][":exception-type"] == "internalServerException"
    events = decode_sse(await (await vertex(emulator, token)).read())
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    assert len(events) == 4


async def test_recorded_requests_show_headers(emulator: Emulator) -> None:
    """GET /_emulator/requests lists every received header lowercased, the body keys and the verdict."""
    extra = {"X-Claude-Code-Session-Id": "sess-1", "anthropic-beta": "context-1m"}
    body = json.dumps(BEDROCK_BODY).encode()
    path = f"/model/{MODEL}/invoke"
    headers = {**sigv4_headers("POST", emulator.url + path, body, extra=extra), "x-app": "cli"}
    assert (await emulator.post(path, body, headers)).status == 200
    async with emulator.http.get(f"{emulator.url}/_emulator/requests") as response:
        (record,) = await response.json()
    assert record["headers"]["x-claude-code-session-id"] == "sess-1"
    assert record["headers"]["x-app"] == "cli"
    assert record["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 ")
    assert record["body_keys"] == sorted(BEDROCK_BODY)
    assert record["body_betas"] == BEDROCK_BODY["anthropic_beta"]
    assert (record["model_id"], record["verdict"], record["status"]) == (MODEL, "ok", 200)
    async with emulator.http.delete(f"{emulator.url}/_emulator/requests") as response:
        assert response.status == 204
    assert not emulator.state.requests


async def test_recorded_usage_is_what_each_answer_reported(
    emulator: Emulator, service_account_file: Path
) -> None:
    """Each record carries the usage its whole answer reported, and none when no whole message was served."""
    token = await google_token(emulator, service_account_file)
    usage = {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 5}
    emulator.state.apply_patch({"usage": usage})
    stream = decode_eventstream(await (await invoke(emulator, "invoke-with-response-stream")).read())
    message = await (await invoke(emulator, "invoke")).json()
    sse = decode_sse(await (await vertex(emulator, token)).read())
    emulator.state.apply_patch({"scenario": "exception_midstream"})
    await (await invoke(emulator, "invoke-with-response-stream")).read()
    await (await vertex(emulator, token)).read()
    async with emulator.http.get(f"{emulator.url}/_emulator/requests") as response:
        records = [r for r in await response.json() if r["route"] != "google.token"]
    served = [r["usage"] for r in records]
    stream_delta = next(p["event"]["usage"] for _, p in stream if p["event"]["type"] == "message_delta")
    sse_delta = next(e["usage"] for t, e in sse if t == "message_delta")
    assert served[0]["output_tokens"] == stream_delta["output_tokens"] == 4
    assert served[1]["input_tokens"] == message["usage"]["input_tokens"] == 3
    assert served[2]["output_tokens"] == sse_delta["output_tokens"] == 4
    assert served[0] == served[1] == served[2]
    assert served[0]["cache_read_input_tokens"] == 5
    assert served[3:] == [None, None]


async def test_control_state_patch_and_reset(emulator: Emulator) -> None:
    """POST /_emulator/state changes usage and deltas, refuses unknown fields, and reset restores defaults."""
    patch = {"usage": {"output_tokens": 7}, "deltas": 2, "text": "ab"}
    async with emulator.http.post(f"{emulator.url}/_emulator/state", json=patch) as response:
        assert (await response.json())["usage"]["output_tokens"] == 7
    frames = decode_eventstream(await (await invoke(emulator, "invoke-with-response-stream")).read())
    deltas = [p["event"]["delta"]["text"] for _, p in frames if p["event"]["type"] == "content_block_delta"]
    assert deltas == ["a", "b"]
    async with emulator.http.post(f"{emulator.url}/_emulator/state", json={"nope": 1}) as response:
        assert response.status == 400
    async with emulator.http.post(f"{emulator.url}/_emulator/state", json={"reset": True}) as response:
        assert (await response.json())["deltas"] == 5
    assert not emulator.state.requests


async def test_failures_fail_the_next_requests_of_a_kind_in_its_own_shape(
    emulator: Emulator, service_account_file: Path
) -> None:
    """fail answers the next `count` inference requests of the named kinds with its status, each
    cloud in its own error shape and after checking the credential; other kinds are served, and
    reset ends it."""
    token = await google_token(emulator, service_account_file)
    patch = {"fail": {"status": 503, "kinds": ["bedrock"], "count": 2}}
    async with emulator.http.post(f"{emulator.url}/_emulator/state", json=patch) as response:
        assert (await response.json())["fail"] == {"status": 503, "kinds": ["bedrock"], "count": 2}
    first, second = await invoke(emulator, "invoke"), await invoke(emulator, "invoke-with-response-stream")
    for failed in (first, second):
        assert failed.status == 503
        assert failed.headers["x-amzn-ErrorType"] == "ServiceUnavailableException"
    assert (await vertex(emulator, token)).status == 200
    assert (await invoke(emulator, "invoke")).status == 200  # the count is spent
    bedrock = [r for r in emulator.state.requests if r.route.startswith("bedrock.")]
    assert [(r.verdict, r.status) for r in bedrock] == [("ok", 503), ("ok", 503), ("ok", 200)]
    emulator.state.apply_patch({"fail": {"status": 529}})
    overloaded = await vertex(emulator, token)
    assert overloaded.status == 529
    assert (await overloaded.json())["error"]["type"] == "overloaded_error"
    assert (await invoke(emulator, "invoke")).status == 529  # every kind, every request
    emulator.state.apply_patch({"reset": True})
    assert (await invoke(emulator, "invoke")).status == 200
    for bad in ({"status": 404}, {"status": 503, "kinds": ["azure"]}, {"status": 503, "count": 0}, {"x": 1}):
        with pytest.raises(ValueError, match="fail"):
            emulator.state.apply_patch({"fail": bad})


async def test_response_headers_are_added_to_answers(emulator: Emulator) -> None:
    """Patched response_headers (an upstream's own anthropic-ratelimit-*) come on every inference
    answer, streamed or not, until a reset."""
    limits = {"anthropic-ratelimit-requests-remaining": "7", "anthropic-ratelimit-unified-status": "allowed"}
    async with emulator.http.post(f"{emulator.url}/_emulator/state", json={"response_headers": limits}) as r:
        assert (await r.json())["response_headers"] == limits
    for action in ("invoke", "invoke-with-response-stream"):
        response = await invoke(emulator, action)
        assert response.status == 200
        assert {k: response.headers.get(k) for k in limits} == limits
    emulator.state.apply_patch({"reset": True})
    assert "anthropic-ratelimit-requests-remaining" not in (await invoke(emulator, "invoke")).headers


async def test_client_disconnect_midstream_is_recorded(emulator: Emulator) -> None:
    """A client that leaves mid-stream stops the stream quietly and the record says it was cut."""
    emulator.state.apply_patch({"delay": 0.02, "deltas": 50})
    response = await invoke(emulator, "invoke-with-response-stream")
    await response.content.readany()
    response.close()
    for _ in range(100):
        if emulator.state.requests[-1].stream_cut:
            break
        await asyncio.sleep(0.02)
    assert emulator.state.requests[-1].stream_cut


async def test_no_verify_serves_unsigned_requests(emulator: Emulator) -> None:
    """With verify off (the benchmark's --no-verify) unsigned Bedrock and Vertex calls are served."""
    emulator.state.verify = False
    body = json.dumps(BEDROCK_BODY).encode()
    bedrock = await emulator.post(f"/model/{MODEL}/invoke", body, {"Content-Type": "application/json"})
    assert bedrock.status == 200
    assert (await vertex(emulator, None)).status == 200
    assert {r.verdict for r in emulator.state.requests} == {"skipped"}


@pytest.mark.parametrize("flag", ["--service-account-key", "--service-account-file"])
async def test_cli_prints_ready_line_and_trusts_keys(tmp_path: Path, flag: str) -> None:
    """The CLI prints EMULATOR_READY with its URL and trusts the key it wrote or was given."""
    key = tmp_path / "sa.json"
    if flag == "--service-account-file":
        # Written before the port is known; the copy below points google-auth at the real port.
        generate_service_account_key(key, token_uri="http://127.0.0.1:9/token", project_id=DEFAULT_PROJECT)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "backends.emulator", "--host", "127.0.0.1", "--port", "0", flag, str(key)),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        marker, url = line.split(" ")
        assert marker == "EMULATOR_READY" and url.startswith("http://127.0.0.1:")
        info = {**json.loads(key.read_text()), "token_uri": f"{url}/token"}
        credentials = service_account.Credentials.from_service_account_info(
            info, scopes=[CLOUD_PLATFORM_SCOPE]
        )
        http = urllib3.PoolManager()
        await asyncio.to_thread(credentials.refresh, GoogleRequest(http))
        http.clear()
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {credentials.token}"}
            async with session.post(url + vertex_path(), json=VERTEX_BODY, headers=headers) as response:
                assert response.status == 200
    finally:
        process.terminate()
        assert await process.wait() == 0
