"""The Messages API as a client format: routes, reading a body once, the model catalogue and each
upstream's ids, the models list, and the Vertex and Anthropic API pairs' requests."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from authz.config import loads
from authz.identity import Caller as Who
from authz.identity import RequestIdentity
from authz.translate.base import TranslateOptions
from authz.translate.errors import PROMPT_TOO_LONG, map_messages_error
from authz.translate.messages import InvalidRequest, parse_route, read_request
from authz.translate.messages_to_anthropic import MessagesToAnthropic
from authz.translate.messages_to_vertex import MessagesToVertex
from authz.translate.models import CATALOGUE, ModelResolver, Resolved, canonical, map_key, models_page
from backends.anthropic import AnthropicConfig, AnthropicCredentials, AnthropicUpstream
from backends.vertex.upstream import ApplicationDefault, VertexSettings, VertexUpstream

# --- routes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "operation", "query"),
    [
        ("POST", "/v1/messages", "invoke", ""),
        ("POST", "/v1/messages?beta=true", "invoke", ""),
        ("POST", "/v1/messages/count_tokens?beta=true", "count_tokens", ""),
        ("GET", "/v1/models", "list_models", ""),
        (
            "GET",
            "/v1/models?limit=1000&after_id=claude-opus-5&evil=1&before_id=BAD%2F",
            "list_models",
            "after_id=claude-opus-5&limit=1000",
        ),
    ],
)
def test_messages_routes(method: str, path: str, operation: str, query: str) -> None:
    """The Messages routes name their operation; the models query keeps only known, well-formed
    parameters, re-serialised."""
    route = parse_route(method, path)
    assert route is not None
    assert (route.operation, route.streaming, route.model, route.query) == (operation, False, None, query)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/messages"),
        ("POST", "/v1/models"),
        ("POST", "/v1/messages/batches"),
        ("POST", "/v1/complete"),
    ],
)
def test_other_paths_are_not_messages_routes(method: str, path: str) -> None:
    """Anything else is no Messages route (Envoy's 404)."""
    assert parse_route(method, path) is None


# --- reading the body once -----------------------------------------------------------------------------


def test_read_request_keeps_each_members_exact_text() -> None:
    """Members keep their bytes (spacing, key order, number spelling); rebuild drops and appends."""
    body = b' {"model" : "claude-sonnet-4-5", "x": 1.50e2 ,\n "stream":true, "t":{"b":[1, 2]}} '
    request = read_request(body)
    assert (request.model, request.stream) == ("claude-sonnet-4-5", True)
    assert [m.text for m in request.members] == [
        '"model" : "claude-sonnet-4-5"',
        '"x": 1.50e2',
        '"stream":true',
        '"t":{"b":[1, 2]}',
    ]
    rebuilt = request.rebuild(drop=("model", "stream"), add=[("anthropic_version", "v"), ("b", ["é"])])
    assert rebuilt == '{"x": 1.50e2,"t":{"b":[1, 2]},"anthropic_version":"v","b":["é"]}'.encode()
    assert json.loads(rebuilt)["x"] == 150


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "must be a JSON object"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[1]", "must be a JSON object"),
        (b'{"model":"claude-a",}', "not valid JSON"),
        (b'{"model":"claude-a"} {}', "not valid JSON"),
        (b'{"model":"claude-a","n":NaN}', "NaN is not a JSON number"),
        (b'{"max_tokens":1}', "model: Field required"),
        (b'{"model":["claude-a"]}', "model: Input should be a valid string"),
        (b'{"model":"gpt-4"}', "is not a Claude model id"),
        (b'{"model":"Claude-Sonnet-4-5"}', "is not a Claude model id"),
        (b'{"model":"claude-a","model":"claude-b"}', "the key 'model' appears twice"),
        (b'{"model":"claude-a","m":[{"k":1,"k":2}]}', "the key 'k' appears twice"),
        (b'{"model":"claude-a","stream":"true"}', "stream: Input should be a valid boolean"),
        (b'{"model":"claude-a","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests too deeply"),
    ],
)
def test_read_request_refuses_what_it_cannot_judge(body: bytes, message: str) -> None:
    """Invalid JSON, duplicate keys anywhere, a missing, non-string or non-Claude model are refused
    with a message for the client."""
    with pytest.raises(InvalidRequest) as refused:
        read_request(body)
    assert message in str(refused.value)


def test_count_tokens_ignores_stream() -> None:
    """A count_tokens body's stream field neither streams nor is judged."""
    assert read_request(b'{"model":"claude-a","stream":"x"}', count_tokens=True).stream is False


# --- the model catalogue and each upstream's ids ---------------------------------------------------------

CONFIG = """
upstreams:
  bedrock-us: {kind: bedrock, region: us-east-1}
  bedrock-eu: {kind: bedrock, region: eu-west-1}
  bedrock-sa:
    kind: bedrock
    region: sa-east-1
    model_map: {claude-sonnet-4-5-20250929: global.anthropic.claude-sonnet-4-5-20250929-v1:0}
  vertex: {kind: vertex, region: us-east5, project: acme-claude}
  api:
    kind: anthropic
    credentials: {api_key: sk-ant-test}
    model_map: {claude-opus-5: claude-opus-5-5}
"""


@pytest.fixture
def resolver() -> ModelResolver:
    return ModelResolver(loads(CONFIG, {}).upstreams)


@pytest.mark.parametrize(
    ("upstream", "requested", "expected"),
    [
        ("bedrock-us", "claude-sonnet-4-5", Resolved("us.anthropic.claude-sonnet-4-5-20250929-v1:0", True)),
        (
            "bedrock-us",
            "claude-sonnet-4-5-20250929",
            Resolved("us.anthropic.claude-sonnet-4-5-20250929-v1:0", True),
        ),
        ("bedrock-us", "claude-haiku-4-5", Resolved("us.anthropic.claude-haiku-4-5-20251001-v1:0", True)),
        ("bedrock-us", "claude-opus-5-5", Resolved("us.anthropic.claude-opus-5-5", True)),
        ("bedrock-eu", "claude-opus-5-5", Resolved("eu.anthropic.claude-opus-5-5", True)),
        ("bedrock-sa", "claude-opus-5-5", Resolved("global.anthropic.claude-opus-5-5", False)),
        (
            "bedrock-sa",
            "claude-sonnet-4-5",
            Resolved("global.anthropic.claude-sonnet-4-5-20250929-v1:0", False),
        ),
        ("vertex", "claude-sonnet-4-5", Resolved("claude-sonnet-4-5@20250929", True)),
        ("vertex", "claude-opus-5-5", Resolved("claude-opus-5-5", True)),
        ("api", "claude-sonnet-4-5", Resolved("claude-sonnet-4-5", False)),
        ("api", "claude-opus-4-1-20250805", Resolved("claude-opus-4-1-20250805", False)),
        ("api", "claude-opus-5", Resolved("claude-opus-5-5", False)),
    ],
)
def test_each_upstream_gets_its_own_id(
    resolver: ModelResolver, upstream: str, requested: str, expected: Resolved
) -> None:
    """Aliases and dated ids map to Claude Code's ids for each kind: Bedrock profiles in the region's
    geography (global outside the US, EU and APAC), Vertex @ ids, first-party ids as named; the
    upstream's model_map wins."""
    assert resolver.resolve(upstream, requested) == expected


@pytest.mark.parametrize("upstream", ["bedrock-us", "vertex"])
def test_unknown_models_have_no_cloud_id(resolver: ModelResolver, upstream: str) -> None:
    """A model the catalogue does not know has no Bedrock or Vertex id until model_map names one; the
    key that would is named."""
    assert resolver.resolve(upstream, "claude-opus-4-1-20250805") is None
    assert (
        map_key(upstream, "claude-opus-4-1-20250805")
        == f"upstreams.{upstream}.model_map.claude-opus-4-1-20250805"
    )
    assert (
        map_key(upstream, "claude-sonnet-4-5") == f"upstreams.{upstream}.model_map.claude-sonnet-4-5-20250929"
    )


def test_canonical_ids_are_the_dated_snapshots() -> None:
    """An alias is judged and priced as its dated snapshot, as Bedrock and Vertex clients name it."""
    assert canonical("claude-sonnet-4-5") == "claude-sonnet-4-5-20250929"
    assert canonical("claude-haiku-4-5-20251001") == "claude-haiku-4-5-20251001"
    assert canonical("claude-opus-5-5") == "claude-opus-5-5"
    assert canonical("claude-unknown-9") == "claude-unknown-9"


def test_catalogue_ids_are_the_api_style_aliases() -> None:
    """Every listed id is claude-{family}-{major}[-{minor}], with a display name and an RFC 3339 date."""
    for model in CATALOGUE:
        family, *version = model.id.removeprefix("claude-").split("-")
        assert family in ("opus", "sonnet", "haiku") and all(v.isdigit() for v in version), model.id
        assert model.display_name.startswith("Claude ")
        time.strptime(model.created_at, "%Y-%m-%dT%H:%M:%SZ")


def test_models_page_shape_and_paging() -> None:
    """The Models API list shape, paged by limit, after_id and before_id."""
    models = list(CATALOGUE[:4])
    ids = [m.id for m in models]
    first = models_page(models, {"limit": "3"})
    assert isinstance(first, dict)
    assert [m["id"] for m in first["data"]] == ids[:3]
    assert (first["has_more"], first["first_id"], first["last_id"]) == (True, ids[0], ids[2])
    assert set(first["data"][0]) == {"type", "id", "display_name", "created_at"}
    rest = models_page(models, {"after_id": ids[2]})
    assert isinstance(rest, dict) and [m["id"] for m in rest["data"]] == ids[3:] and rest["has_more"] is False
    before = models_page(models, {"before_id": ids[3], "limit": "2"})
    assert isinstance(before, dict) and [m["id"] for m in before["data"]] == ids[1:3]
    assert models_page(models, {"limit": "0"}) == "limit: must be an integer between 1 and 1000"
    empty = models_page([], {})
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}


# --- Vertex and the Anthropic API --------------------------------------------------------------------


def _identity(kind: str, operation: str, requested: str, upstream_model: str) -> RequestIdentity:
    return RequestIdentity(
        request_id="r",
        started_at=1.0,
        client_format="messages",
        operation=operation,
        streaming=operation == "stream",
        caller=Who(sub="u", email="u@example.com", groups=(), session_id=None),
        upstream=kind,
        upstream_kind=kind,
        requested_model=requested,
        model=canonical(requested),
        upstream_model=upstream_model,
    )


VERTEX = VertexUpstream(
    VertexSettings(name="vertex", project="acme-claude", region="us-east5", credentials=ApplicationDefault())
)
API = AnthropicUpstream("api", AnthropicConfig(credentials=AnthropicCredentials(api_key="sk-ant-test")))
BODY = b'{"model":"claude-sonnet-4-5","stream":true,"max_tokens":9,"tags":{"a":"b"},"messages":[]}'


def _vertex(operation: str, body: bytes = BODY) -> MessagesToVertex:
    identity = _identity("vertex", operation, "claude-sonnet-4-5", "claude-sonnet-4-5@20250929")
    request = read_request(body, count_tokens=operation == "count_tokens")
    return MessagesToVertex(identity, VERTEX, request, TranslateOptions())


def test_vertex_request_goes_to_the_configured_project() -> None:
    """stream keeps stream and gains Vertex's anthropic_version; model and tags go; the betas stay a
    header, without request tags."""
    headers = {"anthropic-beta": "request-tags-2026-08-21,x-2030-01-01"}
    request = _vertex("stream").request(headers, BODY)
    assert request.path == (
        "/v1/projects/acme-claude/locations/us-east5/publishers/anthropic/models/"
        "claude-sonnet-4-5@20250929:streamRawPredict"
    )
    assert (
        request.body
        == b'{"stream":true,"max_tokens":9,"messages":[],"anthropic_version":"vertex-2023-10-16"}'
    )
    assert ("anthropic-beta", "x-2030-01-01") in request.set_headers
    only_tags = _vertex("stream").request({"anthropic-beta": "request-tags-2026-08-21"}, BODY)
    assert "anthropic-beta" in only_tags.remove_headers
    untouched = _vertex("stream").request({"anthropic-beta": "x"}, BODY)
    assert not any(name == "anthropic-beta" for name, _ in untouched.set_headers)
    assert "anthropic-beta" not in untouched.remove_headers


def test_vertex_count_tokens_names_the_model_in_the_body() -> None:
    """count-tokens:rawPredict takes the Vertex id in the body."""
    body = b'{"model":"claude-sonnet-4-5","messages":[]}'
    request = _vertex("count_tokens", body).request({}, body)
    assert request.path.endswith("/models/count-tokens:rawPredict")
    assert json.loads(request.body or b"") == {
        "model": "claude-sonnet-4-5@20250929",
        "messages": [],
        "anthropic_version": "vertex-2023-10-16",
    }


def test_anthropic_request_is_the_clients_bytes() -> None:
    """The API gets the body byte for byte on its own path; a mapped model replaces model only."""
    identity = _identity("anthropic", "stream", "claude-sonnet-4-5", "claude-sonnet-4-5")
    request = MessagesToAnthropic(identity, API, read_request(BODY), TranslateOptions()).request({}, BODY)
    assert (request.path, request.body) == ("/v1/messages", None)
    mapped = _identity("anthropic", "count_tokens", "claude-opus-5", "claude-opus-5-5")
    body = b'{"model":"claude-opus-5","messages":[]}'
    request = MessagesToAnthropic(
        mapped, API, read_request(body, count_tokens=True), TranslateOptions()
    ).request({}, body)
    assert request.path == "/v1/messages/count_tokens"
    assert json.loads(request.body or b"") == {"messages": [], "model": "claude-opus-5-5"}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, {"message": "Input is too long."}, PROMPT_TOO_LONG),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "Request payload size exceeds the limit: 31457280 bytes.",
                    "status": "INVALID_ARGUMENT",
                }
            },
            PROMPT_TOO_LONG,
        ),
        (
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "prompt is too long: 3 tokens > 2 maximum",
                },
            },
            None,
        ),
        (
            400,
            {"message": "Malformed input for arn:aws:iam::123456789012:role/x"},
            "The upstream rejected the request.",
        ),
    ],
)
def test_messages_errors_are_anthropic_envelopes(
    status: int, body: dict[str, Any], expected: str | None
) -> None:
    """Bedrock's "Input is too long." and Vertex's oversized payload become the API's "prompt is too
    long"; an Anthropic envelope passes as is (None); other wording is hidden."""
    mapped = map_messages_error(status, json.dumps(body).encode(), {})
    if expected is None:
        assert mapped.reply is None
        return
    assert mapped.reply is not None
    error = json.loads(mapped.reply.body)["error"]
    assert (mapped.reply.status, error["type"], error["message"]) == (400, "invalid_request_error", expected)
