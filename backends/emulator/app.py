"""The upstream emulator's HTTP application: Bedrock, STS, Google OAuth, Vertex and the Anthropic
API on one port.

Handlers check credentials as strictly as the clouds (SigV4 through botocore, Google-issued bearer
tokens, API keys), validate bodies the way each service does, then answer from response bytes
precomputed per (route, model) and rebuilt only when the state changes, so the emulator stays cheap
enough to be the near-zero-cost upstream of the benchmark.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import string
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from backends.emulator import anthropic_api, google, sigv4
from backends.emulator.canned import canned_events, canned_message
from backends.emulator.failures import failure
from backends.emulator.state import (
    ACCOUNT_ID,
    DEFAULT_ROLE_ARN,
    TEST_PRINCIPAL_ARN,
    AssumeRoleCall,
    EmulatorState,
    RecordedRequest,
    Scenario,
)
from backends.eventstream import chunk_frame, exception_frame
from backends.sse import sse_event

STATE_KEY = web.AppKey("emulator_state", EmulatorState)
MAX_BODY = 64 * 1024 * 1024  # Bedrock accepts multi-megabyte image bodies; aiohttp's default is 1 MiB.
BEDROCK_VERSION = "bedrock-2023-05-31"
VERTEX_VERSION = "vertex-2023-10-16"
# Claude Code sends the platform versions above; the anthropic SDK 2.x sends the dated Messages API
# version ("2026-10-21") to every platform. Both are accepted; anything else is refused.
_DATED_VERSION = re.compile(r"^20\d\d-\d\d-\d\d$")


def _version_ok(value: object, platform_version: str) -> bool:
    return value == platform_version or (isinstance(value, str) and bool(_DATED_VERSION.match(value)))


EVENTSTREAM = "application/vnd.amazon.eventstream"
# What only the first-party API accepts: Bedrock and Vertex refuse a top-level `tags` and the beta
# that allows it.
FIRST_PARTY_ONLY_FIELDS = ("tags",)
REQUEST_TAGS_BETA = "request-tags-2026-08-21"
# Real error texts name the account and principal; gateways must not pass them on, and the tests
# prove it by looking for these strings.
LEAK = f" (account {ACCOUNT_ID}, principal {DEFAULT_ROLE_ARN})"
_PADDING = string.ascii_lowercase + string.ascii_uppercase + string.digits
_VERTEX_PATH = re.compile(r"/v1/projects/([^/]+)/locations/([^/]+)/publishers/([^/]+)/models/([^/:]+):(\w+)")
_PROFILES = (
    ("us.anthropic.claude-opus-5-5", "US Anthropic Claude Opus 5.5", "anthropic.claude-opus-5-5"),
    ("us.anthropic.claude-sonnet-5", "US Anthropic Claude Sonnet 5", "anthropic.claude-sonnet-5"),
    (
        "us.anthropic.claude-haiku-4-5-20251001-v1:0",
        "US Anthropic Claude Haiku 4.5",
        "anthropic.claude-haiku-4-5-20251001-v1:0",
    ),
)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A response computed once: the pieces written between delays, and all of them joined."""

    parts: tuple[bytes, ...]
    headers: Mapping[str, str]
    body: bytes = b""

    @classmethod
    def of(cls, parts: tuple[bytes, ...], headers: Mapping[str, str]) -> _Prepared:
        return cls(parts, headers, b"".join(parts))


@dataclass(slots=True)
class _Cache:
    version: int = -1
    entries: dict[tuple[str, str], _Prepared] = field(default_factory=dict)


CACHE_KEY = web.AppKey("emulator_cache", _Cache)


def create_app(state: EmulatorState | None = None) -> web.Application:
    """Build the emulator application around ``state`` (a fresh default state when None)."""
    app = web.Application(client_max_size=MAX_BODY)
    app[STATE_KEY] = state if state is not None else EmulatorState()
    app[CACHE_KEY] = _Cache()
    app.router.add_post("/model/{tail:.+}", _bedrock_model)
    app.router.add_get("/inference-profiles", _bedrock_profiles)
    app.router.add_post("/", _sts)
    app.router.add_post("/token", _google_token)
    app.router.add_post("/v1/projects/{tail:.+}", _vertex)
    app.router.add_post("/v1/messages", _anthropic_messages)
    app.router.add_post("/v1/messages/count_tokens", _anthropic_count_tokens)
    app.router.add_get("/v1/models", _anthropic_models)
    app.router.add_get("/_emulator/health", _control_health)
    app.router.add_get("/_emulator/state", _control_state)
    app.router.add_post("/_emulator/state", _control_state)
    app.router.add_get("/_emulator/requests", _control_requests)
    app.router.add_delete("/_emulator/requests", _control_requests)
    app.router.add_get("/_emulator/assume-role-calls", _control_assume_role_calls)
    app.router.add_delete("/_emulator/assume-role-calls", _control_assume_role_calls)
    return app


async def start_emulator(
    host: str = "127.0.0.1", port: int = 0, state: EmulatorState | None = None
) -> tuple[web.AppRunner, str]:
    """Serve the emulator on ``host:port`` (0 picks a free port); return the runner and base URL.

    ``state.base_url`` is set to the URL, and the state's current behaviour becomes what
    ``reset`` restores. Stop it with ``await runner.cleanup()``.
    """
    app = create_app(state)
    # No access log: per-request logging would dominate the cost of the benchmark's upstream.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
    app[STATE_KEY].base_url = url
    app[STATE_KEY].keep_as_defaults()
    return runner, url


# --- recording --------------------------------------------------------------------------------------


def _record(request: web.Request, state: EmulatorState, route: str, body: bytes) -> RecordedRequest:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    record = RecordedRequest(
        method=request.method,
        raw_path=request.raw_path,
        route=route,
        headers=headers,
        body_length=len(body),
        body_keys=None,
        time=time.time(),
    )
    state.requests.append(record)
    return record


def _json_object(body: bytes, record: RecordedRequest) -> dict[str, Any] | None:
    """The body as a JSON object (recording its keys), or None when it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    record.body_keys = sorted(document)
    betas = document.get("anthropic_beta")
    if isinstance(betas, list) and all(isinstance(b, str) for b in betas):
        record.body_betas = betas
    return document


def _finish(record: RecordedRequest, response: web.StreamResponse) -> web.StreamResponse:
    record.status = response.status
    return response


# --- Bedrock ----------------------------------------------------------------------------------------


def _aws_error(status: int, error_type: str, message: str) -> web.Response:
    headers = {"x-amzn-ErrorType": error_type, "x-amzn-RequestId": str(uuid.uuid4())}
    return web.json_response({"message": message}, status=status, headers=headers)


def _check_sigv4(request: web.Request, state: EmulatorState, body: bytes, service: str) -> sigv4.AwsIdentity:
    """Verify the request's signature; raises ``SigV4Error``."""
    received = sigv4.ReceivedRequest(
        method=request.method,
        scheme=request.scheme,
        target=request.raw_path,
        headers=list(request.headers.items()),
        body=body,
    )
    return sigv4.verify_sigv4(
        received,
        service=service,
        region=state.aws_region,
        lookup=state.find_aws_identity,
        now=datetime.now(UTC),
    )


def _bedrock_auth(
    request: web.Request, state: EmulatorState, body: bytes, record: RecordedRequest
) -> web.Response | None:
    """None when the caller may proceed, else the 403 Bedrock sends."""
    if not state.verify:
        record.verdict = "skipped"
        return None
    try:
        _check_sigv4(request, state, body, "bedrock")
    except sigv4.SigV4Error as exc:
        record.verdict = f"{exc.error_type}: {exc.message}"
        return _aws_error(403, exc.error_type, exc.message + LEAK)
    record.verdict = "ok"
    return None


def _malformed(detail: str) -> web.Response:
    return _aws_error(
        400,
        "ValidationException",
        f"Malformed input request: {detail}, please reformat your input and try again.",
    )


def _bedrock_body_error(body: dict[str, Any] | None) -> web.Response | None:
    """Bedrock's own validation of an InvokeModel body for Anthropic models."""
    if body is None:
        return _aws_error(
            400, "ValidationException", "Malformed input request, please reformat your input and try again."
        )
    for key in ("model", "stream", *FIRST_PARTY_ONLY_FIELDS):
        if key in body:
            return _malformed(f"extraneous key [{key}] is not permitted")
    betas = body.get("anthropic_beta", [])
    if not isinstance(betas, list) or not all(isinstance(b, str) for b in betas):
        return _malformed("#/anthropic_beta: expected an array of strings")
    if REQUEST_TAGS_BETA in betas:
        return _aws_error(400, "ValidationException", f"invalid beta flag: {REQUEST_TAGS_BETA}")
    for key in ("anthropic_version", "max_tokens", "messages"):
        if key not in body:
            return _malformed(f"#: required key [{key}] not found")
    if not _version_ok(body["anthropic_version"], BEDROCK_VERSION):
        return _malformed(f"#/anthropic_version: {BEDROCK_VERSION} is the only supported value")
    return None


async def _bedrock_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    path = request.raw_path.partition("?")[0]
    encoded_model, _, action = path[len("/model/") :].rpartition("/")
    record = _record(request, state, f"bedrock.{action}", body)
    record.model_id = unquote(encoded_model)
    if action not in ("invoke", "invoke-with-response-stream", "count-tokens") or not encoded_model:
        return _finish(record, _aws_error(404, "UnknownOperationException", "Unknown operation"))
    denied = _bedrock_auth(request, state, body, record)
    if denied is not None:
        return _finish(record, denied)
    document = _json_object(body, record)
    if state.fail is not None and state.fail.take("bedrock"):
        return _finish(record, failure("bedrock", state.fail.status))
    if action == "count-tokens":
        return _finish(record, _bedrock_count_tokens(state, document))
    invalid = _bedrock_body_error(document)
    if invalid is not None:
        return _finish(record, invalid)
    if state.scenario is Scenario.TOO_LONG:
        return _finish(record, _aws_error(400, "ValidationException", "Input is too long."))
    model = record.model_id
    streaming = action == "invoke-with-response-stream"
    if state.scenario is Scenario.SERVER_ERROR or (
        state.scenario is Scenario.EXCEPTION_MIDSTREAM and not streaming
    ):
        arn = f"arn:aws:bedrock:{state.aws_region}:{ACCOUNT_ID}:inference-profile/{model}"
        return _finish(
            record, _aws_error(500, "InternalServerException", f"Internal error invoking {arn}{LEAK}")
        )
    if streaming:
        prepared = _prepared(request.app, "bedrock.stream", model, _bedrock_stream)
        return _finish(record, await _stream(request, record, prepared, state))
    prepared = _prepared(request.app, "bedrock.invoke", model, _bedrock_message)
    if state.first_byte_delay:
        await asyncio.sleep(state.first_byte_delay)
    record.usage = state.usage
    return _finish(record, web.Response(body=prepared.body, headers=prepared.headers))


def _bedrock_count_tokens(state: EmulatorState, document: dict[str, Any] | None) -> web.Response:
    """CountTokens takes ``{"input": {"invokeModel": {"body": <base64 InvokeModel body>}}}``."""
    inner: Any = document
    if document is not None and "input" in document:
        try:
            encoded = document["input"]["invokeModel"]["body"]
            inner = json.loads(base64.b64decode(encoded, validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error):
            return _malformed("#/input: expected invokeModel with a base64 body")
    if not isinstance(inner, dict) or "messages" not in inner:
        return _malformed("#: required key [messages] not found")
    for key in ("model", "stream", *FIRST_PARTY_ONLY_FIELDS):
        if key in inner:
            return _malformed(f"extraneous key [{key}] is not permitted")
    return web.json_response({"inputTokens": state.usage.total_input_tokens})


async def _bedrock_profiles(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    record = _record(request, state, "bedrock.list_inference_profiles", body)
    denied = _bedrock_auth(request, state, body, record)
    if denied is not None:
        return _finish(record, denied)
    kind = request.query.get("type", "SYSTEM_DEFINED")
    if kind not in ("SYSTEM_DEFINED", "APPLICATION"):
        return _finish(
            record, _aws_error(400, "ValidationException", f"Invalid inference profile type: {kind}")
        )
    region = state.aws_region
    summaries = [
        {
            "inferenceProfileName": name,
            "description": f"Routes requests to {name[3:]} in us-east-1, us-east-2 and us-west-2.",
            "createdAt": "2025-10-01T00:00:00Z",
            "updatedAt": "2025-10-01T00:00:00Z",
            "inferenceProfileArn": f"arn:aws:bedrock:{region}:{ACCOUNT_ID}:inference-profile/{profile_id}",
            "models": [
                {"modelArn": f"arn:aws:bedrock:{model_region}::foundation-model/{model_id}"}
                for model_region in ("us-east-1", "us-east-2", "us-west-2")
            ],
            "inferenceProfileId": profile_id,
            "status": "ACTIVE",
            "type": "SYSTEM_DEFINED",
        }
        for profile_id, name, model_id in _PROFILES
        if kind == "SYSTEM_DEFINED"
    ]
    return _finish(record, web.json_response({"inferenceProfileSummaries": summaries}))


def _bedrock_stream(state: EmulatorState, model: str) -> _Prepared:
    events = canned_events(model=model, text_chunks=state.text_chunks(), usage=state.usage)
    usage = state.usage
    metrics = {
        "inputTokenCount": usage.input_tokens,
        "outputTokenCount": usage.output_tokens,
        "invocationLatency": 120 + int(state.delay * 1000 * len(events)),
        "firstByteLatency": 120,
    }
    if usage.cache_read_input_tokens:
        metrics["cacheReadInputTokenCount"] = usage.cache_read_input_tokens
    if usage.cache_creation_input_tokens:
        metrics["cacheWriteInputTokenCount"] = usage.cache_creation_input_tokens
    if state.scenario is Scenario.EXCEPTION_MIDSTREAM:
        frames = [chunk_frame(event, padding=_padding(i)) for i, event in enumerate(events[:3])]
        frames.append(
            exception_frame(
                "internalServerException",
                "The system encountered an unexpected error during processing. Try your request again.",
            )
        )
    else:
        frames = [
            chunk_frame(
                event,
                invocation_metrics=metrics if event["type"] == "message_stop" else None,
                padding=_padding(i),
            )
            for i, event in enumerate(events)
        ]
    headers = {
        "Content-Type": EVENTSTREAM,
        "x-amzn-bedrock-content-type": "application/json",
        "x-amzn-RequestId": "emulator-request",
    }
    return _Prepared.of(tuple(frames), headers)


def _padding(index: int) -> str:
    # Bedrock pads each chunk with a prefix of this alphabet of varying length so that frame sizes
    # do not reveal token lengths; a fixed pattern keeps the emulator deterministic.
    return _PADDING[: 1 + (index * 7) % len(_PADDING)]


def _bedrock_message(state: EmulatorState, model: str) -> _Prepared:
    usage = state.usage
    message = canned_message(model=model, text="".join(state.text_chunks()), usage=usage)
    headers = {
        "Content-Type": "application/json",
        "x-amzn-RequestId": "emulator-request",
        "X-Amzn-Bedrock-Input-Token-Count": str(usage.input_tokens),
        "X-Amzn-Bedrock-Output-Token-Count": str(usage.output_tokens),
        "X-Amzn-Bedrock-Invocation-Latency": "120",
        "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": str(usage.cache_read_input_tokens),
        "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": str(usage.cache_creation_input_tokens),
    }
    return _Prepared.of((json.dumps(message, separators=(",", ":")).encode(),), headers)


# --- STS --------------------------------------------------------------------------------------------


def _sts_error(status: int, code: str, message: str, request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=sigv4.sts_error_response(code, message, request_id),
        content_type="text/xml",
        headers={"x-amzn-RequestId": request_id},
    )


async def _sts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    record = _record(request, state, "sts", body)
    request_id = str(uuid.uuid4())
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    record.body_keys = sorted(form)
    caller: sigv4.AwsIdentity | None = None
    if state.verify:
        try:
            caller = _check_sigv4(request, state, body, "sts")
        except sigv4.SigV4Error as exc:
            record.verdict = f"{exc.error_type}: {exc.message}"
            code = sigv4.STS_ERROR_CODES.get(exc.error_type, "SignatureDoesNotMatch")
            return _finish(record, _sts_error(403, code, exc.message + LEAK, request_id))
        record.verdict = "ok"
    else:
        record.verdict = "skipped"
    action, version = form.get("Action"), form.get("Version")
    if version != "2011-06-15":
        return _finish(
            record,
            _sts_error(
                400, "InvalidAction", f"Could not find operation {action} for version {version}", request_id
            ),
        )
    if action == "GetCallerIdentity":
        identity = caller or sigv4.AwsIdentity("AKIDUNVERIFIED", "", TEST_PRINCIPAL_ARN)
        return _finish(record, _xml(sigv4.caller_identity_response(identity, request_id), request_id))
    if action != "AssumeRole":
        return _finish(
            record,
            _sts_error(
                400, "InvalidAction", f"Could not find operation {action} for version {version}", request_id
            ),
        )
    try:
        params = sigv4.parse_assume_role(form, max_duration=state.max_session_duration)
    except sigv4.StsError as exc:
        return _finish(record, _sts_error(exc.status, exc.code, exc.message, request_id))
    required = state.allowed_roles.get(params.role_arn, "")
    # "" marks an unknown role; None a known role that needs no ExternalId.
    granted = not state.verify or (required is None or (required != "" and required == params.external_id))
    state.assume_role_calls.append(
        _assume_role_call(params, caller.access_key_id if caller else None, granted=granted)
    )
    if not granted:
        principal = caller.principal_arn if caller else DEFAULT_ROLE_ARN
        message = (
            f"User: {principal} is not authorized to perform: sts:AssumeRole on resource: {params.role_arn}"
        )
        return _finish(record, _sts_error(403, "AccessDenied", message, request_id))
    identity = sigv4.issue_temporary_identity(
        params.role_arn, params.role_session_name, time.time() + params.duration_seconds
    )
    state.add_temporary_key(identity)
    return _finish(record, _xml(sigv4.assume_role_response(identity, params, request_id), request_id))


def _assume_role_call(
    params: sigv4.AssumeRoleRequest, caller: str | None, *, granted: bool
) -> AssumeRoleCall:
    return AssumeRoleCall(
        role_arn=params.role_arn,
        role_session_name=params.role_session_name,
        external_id=params.external_id,
        source_identity=params.source_identity,
        tags=params.tags,
        duration_seconds=params.duration_seconds,
        caller_access_key_id=caller,
        granted=granted,
        time=time.time(),
    )


def _xml(body: bytes, request_id: str) -> web.Response:
    return web.Response(body=body, content_type="text/xml", headers={"x-amzn-RequestId": request_id})


# --- Google OAuth and Vertex ------------------------------------------------------------------------


async def _google_token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    record = _record(request, state, "google.token", body)
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    record.body_keys = sorted(form)
    now = time.time()
    audiences = {f"{request.scheme}://{request.host}/token", f"{state.base_url}/token"}
    audiences.update(key.token_uri for key in state.service_accounts.values())
    try:
        if state.verify:
            email = google.verify_jwt_bearer_grant(
                form, keys=state.service_accounts, audiences=audiences, now=now
            )
        else:
            email = "unverified@emulator.invalid"
    except google.TokenGrantError as exc:
        record.verdict = f"{exc.error}: {exc.description}"
        return _finish(record, web.json_response(exc.to_json(), status=400))
    record.verdict = "ok" if state.verify else "skipped"
    token = google.new_access_token()
    state.issue_access_token(token, email, now + google.ACCESS_TOKEN_LIFETIME)
    answer = {"access_token": token, "expires_in": google.ACCESS_TOKEN_LIFETIME, "token_type": "Bearer"}
    return _finish(record, web.json_response(answer, headers={"Cache-Control": "no-store"}))


def _google_error(
    code: int, status: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "status": status}}, status=code, headers=headers
    )


def _anthropic_error(status: int, error_type: str, message: str) -> web.Response:
    return web.json_response(
        {"type": "error", "error": {"type": error_type, "message": message}}, status=status
    )


_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
    "other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


async def _vertex(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    match = _VERTEX_PATH.fullmatch(unquote(request.raw_path.partition("?")[0]))
    method = match.group(5) if match else "unknown"
    record = _record(request, state, f"vertex.{method}", body)
    if match is None or match.group(3) != "anthropic" or method not in ("rawPredict", "streamRawPredict"):
        return _finish(
            record, _google_error(404, "NOT_FOUND", "The requested URL was not found on this server.")
        )
    project, region, _, model, _ = match.groups()
    record.model_id = model
    if state.verify:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        owner = state.access_token_owner(token, time.time()) if scheme.lower() == "bearer" else None
        if owner is None:
            record.verdict = "UNAUTHENTICATED"
            challenge = {
                "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'
            }
            return _finish(record, _google_error(401, "UNAUTHENTICATED", _UNAUTHENTICATED, challenge))
        if project not in state.projects:
            record.verdict = "PERMISSION_DENIED"
            resource = (
                f"//aiplatform.googleapis.com/projects/{project}/locations/{region}"
                f"/publishers/anthropic/models/{model}"
            )
            message = (
                f"Permission 'aiplatform.endpoints.predict' denied on resource '{resource}' "
                "(or it may not exist)."
            )
            return _finish(record, _google_error(403, "PERMISSION_DENIED", message))
        record.verdict = "ok"
    else:
        record.verdict = "skipped"
    document = _json_object(body, record)
    if state.fail is not None and state.fail.take("vertex"):
        return _finish(record, failure("vertex", state.fail.status))
    if document is None:
        return _finish(
            record, _anthropic_error(400, "invalid_request_error", "Request body is not a JSON object.")
        )
    header_betas = [b.strip() for b in request.headers.get("anthropic-beta", "").split(",")]
    if REQUEST_TAGS_BETA in header_betas:
        message = f"anthropic-beta: {REQUEST_TAGS_BETA} is not supported on Vertex AI"
        return _finish(record, _anthropic_error(400, "invalid_request_error", message))
    for key in FIRST_PARTY_ONLY_FIELDS:
        if key in document:
            message = f"{key}: Extra inputs are not permitted"
            return _finish(record, _anthropic_error(400, "invalid_request_error", message))
    if model == "count-tokens":
        # The model to count for travels in the body (Vertex's path names none).
        counted = document.get("model")
        if not isinstance(counted, str) or not counted.startswith("claude-"):
            message = "model: Field required"
            return _finish(record, _anthropic_error(400, "invalid_request_error", message))
        record.model_id = counted
        return _finish(record, web.json_response({"input_tokens": state.usage.total_input_tokens}))
    if not _version_ok(document.get("anthropic_version"), VERTEX_VERSION):
        message = f"anthropic_version: Input should be '{VERTEX_VERSION}'"
        return _finish(record, _anthropic_error(400, "invalid_request_error", message))
    streaming = document.get("stream") is True
    if method == "streamRawPredict" and not streaming:
        message = 'streamRawPredict requires "stream": true in the request body'
        return _finish(record, _anthropic_error(400, "invalid_request_error", message))
    if state.scenario is Scenario.TOO_LONG:
        message = "prompt is too long: 250000 tokens > 200000 maximum"
        return _finish(record, _anthropic_error(400, "invalid_request_error", message))
    if state.scenario is Scenario.SERVER_ERROR or (
        state.scenario is Scenario.EXCEPTION_MIDSTREAM and not streaming
    ):
        message = (
            f"Internal error encountered for projects/{ACCOUNT_ID}/locations/{region} serving {model}, "
            f"service account {google.default_client_email(project)}{LEAK}"
        )
        return _finish(record, _google_error(500, "INTERNAL", message))
    if streaming:
        prepared = _prepared(request.app, "vertex.stream", model, _vertex_stream)
        return _finish(record, await _stream(request, record, prepared, state))
    prepared = _prepared(request.app, "vertex.message", model, _vertex_message)
    if state.first_byte_delay:
        await asyncio.sleep(state.first_byte_delay)
    record.usage = state.usage
    return _finish(record, web.Response(body=prepared.body, headers=prepared.headers))


def _vertex_stream(state: EmulatorState, model: str) -> _Prepared:
    events = canned_events(model=model, text_chunks=state.text_chunks(), usage=state.usage)
    if state.scenario is Scenario.EXCEPTION_MIDSTREAM:
        events = [
            *events[:3],
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ]
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    return _Prepared.of(tuple(sse_event(event) for event in events), headers)


def _vertex_message(state: EmulatorState, model: str) -> _Prepared:
    message = canned_message(model=model, text="".join(state.text_chunks()), usage=state.usage)
    return _Prepared.of(
        (json.dumps(message, separators=(",", ":")).encode(),), {"Content-Type": "application/json"}
    )


# --- the Anthropic API ------------------------------------------------------------------------------

# The API names every answer; a fixed id keeps the emulator's responses byte-identical.
_REQUEST_ID = {"request-id": "req_emulator"}


def _api_error(error: anthropic_api.ApiError) -> web.Response:
    return web.json_response(
        {"type": "error", "error": {"type": error.type, "message": error.message}},
        status=error.status,
        headers=_REQUEST_ID,
    )


def _anthropic_auth(
    request: web.Request, state: EmulatorState, record: RecordedRequest
) -> anthropic_api.ApiError | None:
    """None when the caller may proceed: the API key first (unless ``verify`` is off), then the
    version header."""
    if state.verify:
        denied = anthropic_api.check_key(request.headers, state.anthropic_api_keys)
        if denied is not None:
            record.verdict = f"{denied.type}: {denied.message}"
            return denied
    record.verdict = "ok" if state.verify else "skipped"
    return anthropic_api.check_version(request.headers)


async def _anthropic_messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    record = _record(request, state, "anthropic.messages", body)
    document = _json_object(body, record)
    error = _anthropic_auth(request, state, record) or anthropic_api.check_body(document, count_tokens=False)
    if error is not None:
        return _finish(record, _api_error(error))
    if state.fail is not None and state.fail.take("anthropic"):
        return _finish(record, failure("anthropic", state.fail.status))
    assert document is not None  # check_body refuses a body that is not a JSON object
    model = record.model_id = document["model"]
    streaming = document.get("stream") is True
    if state.scenario is Scenario.TOO_LONG:
        too_long = anthropic_api.ApiError(
            400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"
        )
        return _finish(record, _api_error(too_long))
    if state.scenario is Scenario.SERVER_ERROR or (
        state.scenario is Scenario.EXCEPTION_MIDSTREAM and not streaming
    ):
        return _finish(record, _api_error(anthropic_api.ApiError(500, "api_error", "Internal server error")))
    if streaming:
        prepared = _prepared(request.app, "anthropic.stream", model, _anthropic_stream)
        return _finish(record, await _stream(request, record, prepared, state))
    prepared = _prepared(request.app, "anthropic.message", model, _anthropic_message)
    record.usage = state.usage
    return _finish(record, web.Response(body=prepared.body, headers=prepared.headers))


async def _anthropic_count_tokens(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    record = _record(request, state, "anthropic.count_tokens", body)
    document = _json_object(body, record)
    error = _anthropic_auth(request, state, record) or anthropic_api.check_body(document, count_tokens=True)
    if error is not None:
        return _finish(record, _api_error(error))
    if state.fail is not None and state.fail.take("anthropic"):
        return _finish(record, failure("anthropic", state.fail.status))
    assert document is not None
    record.model_id = document["model"]
    answer = {"input_tokens": state.usage.total_input_tokens}
    return _finish(record, web.json_response(answer, headers=_REQUEST_ID))


async def _anthropic_models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await request.read()
    record = _record(request, state, "anthropic.models", body)
    error = _anthropic_auth(request, state, record)
    page = anthropic_api.models_page(request.query) if error is None else error
    if isinstance(page, anthropic_api.ApiError):
        return _finish(record, _api_error(page))
    return _finish(record, web.json_response(page, headers=_REQUEST_ID))


def _anthropic_stream(state: EmulatorState, model: str) -> _Prepared:
    events = anthropic_api.stream_events(
        model=model,
        text_chunks=state.text_chunks(),
        usage=state.usage,
        cut_by_error=state.scenario is Scenario.EXCEPTION_MIDSTREAM,
    )
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **_REQUEST_ID}
    return _Prepared.of(tuple(sse_event(event) for event in events), headers)


def _anthropic_message(state: EmulatorState, model: str) -> _Prepared:
    message = canned_message(model=model, text="".join(state.text_chunks()), usage=state.usage)
    headers = {"Content-Type": "application/json", **_REQUEST_ID}
    return _Prepared.of((json.dumps(message, separators=(",", ":")).encode(),), headers)


# --- shared response machinery ----------------------------------------------------------------------


def _prepared(
    app: web.Application, kind: str, model: str, build: Callable[[EmulatorState, str], _Prepared]
) -> _Prepared:
    """The cached response for (kind, model), rebuilt when the state's version changed."""
    state, cache = app[STATE_KEY], app[CACHE_KEY]
    if cache.version != state.version or len(cache.entries) > 256:
        # Model ids come from clients; the bound keeps a stream of distinct ids from growing memory.
        cache.version, cache.entries = state.version, {}
    prepared = cache.entries.get((kind, model))
    if prepared is None:
        prepared = build(state, model)
        if state.response_headers:
            prepared = _Prepared(
                prepared.parts, {**prepared.headers, **state.response_headers}, prepared.body
            )
        cache.entries[(kind, model)] = prepared
    return prepared


async def _stream(
    request: web.Request, record: RecordedRequest, prepared: _Prepared, state: EmulatorState
) -> web.StreamResponse:
    """Write a prepared stream with ``state.delay`` seconds between events, noting a client that left.

    A stream written to the end in the normal scenario served a whole message: its usage is recorded.
    """
    response = web.StreamResponse(headers=prepared.headers)
    response.enable_chunked_encoding()
    delay, usage = state.delay, state.usage
    complete = state.scenario is Scenario.NORMAL
    cut = state.scenario is Scenario.CUT_MIDSTREAM
    try:
        if state.first_byte_delay:
            await asyncio.sleep(state.first_byte_delay)
        await response.prepare(request)
        parts = prepared.parts[: len(prepared.parts) // 2] if cut else prepared.parts
        if delay <= 0 and not cut:
            await response.write(prepared.body)
        else:
            for index, part in enumerate(parts):
                if index and delay > 0:
                    await asyncio.sleep(delay)
                # write() waits for the transport to drain (StreamResponse.drain is deprecated).
                await response.write(part)
        if cut:
            # Drop the connection mid-body: the chunked stream never ends.
            assert request.transport is not None
            request.transport.close()
            record.stream_cut = True
            return response
        await response.write_eof()
        if complete:
            record.usage = usage
    except ConnectionError:
        record.stream_cut = True
    except asyncio.CancelledError:
        record.stream_cut = True
        raise
    return response


# --- control endpoints ------------------------------------------------------------------------------


async def _control_health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def _control_state(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        try:
            patch = await request.json()
            if not isinstance(patch, dict):
                raise ValueError("the state patch must be a JSON object")
            state.apply_patch(patch)
        except (ValueError, OSError, KeyError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.describe())


async def _control_requests(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if request.method == "DELETE":
        state.requests.clear()
        return web.Response(status=204)
    prefix = request.query.get("route", "")
    return web.json_response([r.to_json() for r in state.requests if r.route.startswith(prefix)])


async def _control_assume_role_calls(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if request.method == "DELETE":
        state.assume_role_calls.clear()
        return web.Response(status=204)
    return web.json_response([call.to_json() for call in state.assume_role_calls])
