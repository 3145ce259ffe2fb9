"""What clients see when an upstream answers with an error: verbatim recovery messages, generic rest."""

from __future__ import annotations

import json
import re

import pytest

from authz.translate.envelope import ErrorReply
from authz.translate.errors import MappedError, map_upstream_error

ACCOUNT = "123456789012"
ROLE_ARN = f"arn:aws:sts::{ACCOUNT}:assumed-role/claude-gateway/alice"
BEDROCK_403 = json.dumps(
    {
        "message": f"User: {ROLE_ARN} is not authorized to perform: bedrock:InvokeModelWithResponseStream "
        f"on resource: arn:aws:bedrock:us-east-1:{ACCOUNT}:inference-profile/us.anthropic.claude-opus-5-5"
    }
).encode()


def _reply(mapped: MappedError) -> ErrorReply:
    assert mapped.reply is not None, "expected the gateway to replace the upstream response"
    return mapped.reply


def _error(reply: ErrorReply) -> dict[str, str]:
    body = json.loads(reply.body)
    assert body["type"] == "error"
    return body["error"]  # type: ignore[no-any-return]


def test_bedrock_input_too_long_passes_through() -> None:
    """Bedrock's exact 'Input is too long.' 400 reaches the client unchanged (Claude Code keys on it)."""
    mapped = map_upstream_error(400, b'{"message":"Input is too long."}', {})
    assert mapped.reply is None
    assert "Input is too long." in mapped.summary


def test_anthropic_prompt_too_long_passes_through() -> None:
    """An Anthropic-envelope 400 such as 'prompt is too long' passes through verbatim."""
    body = json.dumps(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 210000 tokens > 200000",
            },
        }
    ).encode()
    mapped = map_upstream_error(400, body, {})
    assert mapped.reply is None
    assert mapped.summary == "upstream 400 invalid_request_error: prompt is too long: 210000 tokens > 200000"


def test_anthropic_envelope_413_passes_through() -> None:
    """A 413 in the Anthropic envelope passes through too."""
    body = (
        b'{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum size"}}'
    )
    assert map_upstream_error(413, body, {}).reply is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"message":"Malformed input request: #: extraneous key [foo] is not permitted"}',
        b'{"message":"Input is too long for account 123456789012."}',
        b'{"error":{"code":400,"message":"Project acme-prod-4411 not allowed","status":"INVALID_ARGUMENT"}}',
        b"<html>Bad Request</html>",
    ],
)
def test_other_400s_become_a_generic_invalid_request(body: bytes) -> None:
    """Any other 400 (Bedrock validation, Google errors, non-JSON) gets a generic invalid_request_error."""
    reply = _reply(map_upstream_error(400, body, {}))
    assert reply.status == 400
    error = _error(reply)
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "The upstream rejected the request."


@pytest.mark.parametrize("status", [401, 403])
def test_credential_refusal_becomes_502_without_account_details(status: int) -> None:
    """A 401/403 naming an account ARN becomes a 502 api_error with no account digits and no ARN."""
    mapped = map_upstream_error(status, BEDROCK_403, {"x-amzn-errortype": "AccessDeniedException"})
    reply = _reply(mapped)
    assert reply.status == 502
    assert _error(reply)["type"] == "api_error"
    text = reply.body.decode()
    assert "arn:" not in text
    assert ACCOUNT not in text
    assert not re.search(r"\d{4,}", text)
    assert mapped.summary == f"upstream {status}"
    assert ACCOUNT not in mapped.summary


def test_429_keeps_an_integer_retry_after() -> None:
    """A 429 stays a 429 rate_limit_error and keeps the upstream's integer retry-after."""
    reply = _reply(map_upstream_error(429, b'{"message":"Too many requests"}', {"retry-after": "17"}))
    assert reply.status == 429
    assert _error(reply)["type"] == "rate_limit_error"
    assert ("retry-after", "17") in reply.headers


@pytest.mark.parametrize("value", [None, "soon", "1.5", "Wed, 21 Oct 2030 07:28:00 GMT"])
def test_429_without_a_usable_retry_after_gets_an_integer_default(value: str | None) -> None:
    """A missing or non-integer retry-after is replaced by an integer, never passed on as is."""
    headers = {} if value is None else {"retry-after": value}
    reply = _reply(map_upstream_error(429, b"", headers))
    (retry_after,) = [v for k, v in reply.headers if k == "retry-after"]
    assert retry_after.isdigit()
    assert int(retry_after) > 0


@pytest.mark.parametrize("status", [503, 529])
def test_overload_becomes_529_overloaded_error(status: int) -> None:
    """503 and 529 upstream answers become 529 overloaded_error, which clients retry."""
    reply = _reply(map_upstream_error(status, b'{"message":"ServiceUnavailableException"}', {}))
    assert reply.status == 529
    assert _error(reply)["type"] == "overloaded_error"


@pytest.mark.parametrize("status", [500, 502, 504, 424, 408])
def test_other_failures_become_502_api_error(status: int) -> None:
    """A 500 (and any other unlisted failure status) becomes a 502 api_error with a generic message."""
    reply = _reply(map_upstream_error(status, BEDROCK_403, {}))
    assert reply.status == 502
    assert _error(reply)["type"] == "api_error"
    assert ACCOUNT not in reply.body.decode()


def test_404_becomes_not_found_without_details() -> None:
    """A 404 stays a not_found_error but with the gateway's own text."""
    body = f'{{"message":"Model arn:aws:bedrock:us-east-1:{ACCOUNT}:foo not found"}}'.encode()
    reply = _reply(map_upstream_error(404, body, {}))
    assert reply.status == 404
    assert _error(reply)["type"] == "not_found_error"
    assert ACCOUNT not in reply.body.decode()


@pytest.mark.parametrize(
    "body", [b"", b"upstream connect error or disconnect/reset", b"\xff\xfe\x00garbage", b"[1, 2]", b"null"]
)
@pytest.mark.parametrize("status", [400, 403, 429, 500, 503])
def test_non_json_bodies_are_handled(status: int, body: bytes) -> None:
    """Empty, plain-text, non-UTF-8 and non-object bodies map without raising, to a generic reply."""
    mapped = map_upstream_error(status, body, {})
    reply = _reply(mapped)
    assert reply.status >= 400
    assert mapped.summary == f"upstream {status}"


def test_google_error_status_names_the_summary() -> None:
    """A Google error body's status (PERMISSION_DENIED) goes into the operator summary."""
    body = (
        b'{"error":{"code":403,"message":"Permission denied on project 4411","status":"PERMISSION_DENIED"}}'
    )
    mapped = map_upstream_error(403, body, {})
    assert mapped.summary == "upstream 403 PERMISSION_DENIED"
    assert "4411" not in _reply(mapped).body.decode()


def test_other_413_stays_a_generic_request_too_large() -> None:
    """A 413 outside the Anthropic envelope keeps its meaning (request_too_large) with generic text."""
    reply = _reply(map_upstream_error(413, b'{"message":"Request of 9000000 bytes for account 4411"}', {}))
    assert reply.status == 413
    assert _error(reply)["type"] == "request_too_large"
    assert "4411" not in reply.body.decode()
