"""Route and model-id parsing for the Bedrock and Vertex client contracts."""

from __future__ import annotations

import urllib.parse

import pytest

from authz.gateway.models import InferenceRoute, canonical_model, model_family, parse_route

ARN_PROFILE = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5-v1:0"
VERTEX = "/v1/projects/my-proj/locations/{region}/publishers/anthropic/models/{model}"


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("us.anthropic.claude-opus-5-5", "claude-opus-5-5"),
        ("eu.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
        ("apac.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
        ("jp.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5-20251001"),
        ("au.anthropic.claude-opus-4-6-v1", "claude-opus-4-6"),
        ("us-gov.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
        ("anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5-20251001"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet-20241022"),
        ("anthropic.claude-3-sonnet-20240229-v1:0:200k", "claude-3-sonnet-20240229"),
        ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
        ("US.Anthropic.Claude-Opus-5-5", "claude-opus-5-5"),
        (ARN_PROFILE, "claude-opus-5-5"),
        (
            "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/global.anthropic.claude-opus-4-5-20251101-v1:0",
            "claude-opus-4-5-20251101",
        ),
        (
            "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-haiku-4-5-20251001-v1:0",
            "claude-haiku-4-5-20251001",
        ),
        (
            "arn:aws-us-gov:bedrock:us-gov-west-1:123456789012:inference-profile/us-gov.anthropic.claude-sonnet-4-5-v1:0",
            "claude-sonnet-4-5",
        ),
        (
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1B2c3D4e5F6",
            "application-inference-profile/a1b2c3d4e5f6",
        ),
        ("claude-haiku-4-5@20251001", "claude-haiku-4-5-20251001"),
        ("claude-opus-5-5", "claude-opus-5-5"),
        ("claude-sonnet-4-5@latest", "claude-sonnet-4-5"),
        ("Claude-Sonnet-5", "claude-sonnet-5"),
        ("mistral.mistral-large-2407-v1:0", "mistral.mistral-large-2407-v1:0"),
        ("something-else", "something-else"),
    ],
)
def test_canonical_model(raw: str, canonical: str) -> None:
    """Bedrock, Vertex and first-party ids normalise to the first-party form, lower-cased."""
    assert canonical_model(raw) == canonical


@pytest.mark.parametrize(
    ("canonical", "family"),
    [
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-5-5", "claude-opus-5-5"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-opus-4-20250514", "claude-opus-4"),
    ],
)
def test_model_family_drops_the_date(canonical: str, family: str) -> None:
    """model_family removes only a trailing 8-digit snapshot date."""
    assert model_family(canonical) == family


def test_bedrock_invoke_and_stream() -> None:
    """Bedrock invoke and invoke-with-response-stream carry the model in the path."""
    route = parse_route("POST", "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream")
    assert route == InferenceRoute(
        format="bedrock",
        operation="stream",
        streaming=True,
        model_raw="us.anthropic.claude-opus-5-5",
        model_segment="us.anthropic.claude-opus-5-5",
        model="claude-opus-5-5",
        regional=True,
    )
    invoke = parse_route("POST", "/model/global.anthropic.claude-haiku-4-5-20251001-v1:0/invoke")
    assert invoke is not None
    assert (invoke.operation, invoke.streaming, invoke.regional) == ("invoke", False, False)
    assert invoke.model == "claude-haiku-4-5-20251001"


def test_bedrock_count_tokens() -> None:
    """POST /model/{id}/count-tokens is the count_tokens operation."""
    route = parse_route("POST", "/model/anthropic.claude-haiku-4-5-20251001-v1:0/count-tokens")
    assert route is not None
    assert (route.format, route.operation, route.streaming) == ("bedrock", "count_tokens", False)
    assert route.model == "claude-haiku-4-5-20251001"


@pytest.mark.parametrize("prefix", ["us", "eu", "apac", "jp", "au"])
def test_geographic_profiles_are_regional(prefix: str) -> None:
    """Geographic inference profiles are regional endpoints (priced at a premium)."""
    route = parse_route("POST", f"/model/{prefix}.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke")
    assert route is not None and route.regional
    assert route.model == "claude-sonnet-4-5-20250929"


def test_arn_as_the_sdk_encodes_it() -> None:
    """The anthropic SDK quotes the model with safe=':;', so the ARN's '/' arrives as %2F."""
    arn = "arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude-opus-5-5"
    segment = urllib.parse.quote(arn, safe=":;")
    assert segment == "arn:aws:bedrock:us-east-1:123:inference-profile%2Fus.anthropic.claude-opus-5-5"
    route = parse_route("POST", f"/model/{segment}/invoke-with-response-stream")
    assert route is not None
    assert route.model_raw == arn
    assert route.model_segment == segment
    assert route.model == "claude-opus-5-5"
    assert route.regional


def test_fully_encoded_arn_and_global_arn() -> None:
    """%3A decodes to ':' too, and an ARN naming a global profile is not regional."""
    arn = "arn:aws:bedrock:us-east-1:123:inference-profile/global.anthropic.claude-opus-5-5-v1:0"
    route = parse_route("POST", f"/model/{urllib.parse.quote(arn, safe='')}/invoke")
    assert route is not None
    assert route.model_raw == arn
    assert route.model == "claude-opus-5-5"
    assert not route.regional


def test_model_segment_is_decoded_only_once() -> None:
    """A double-encoded %252F stays %2F after decoding: no second round of decoding."""
    route = parse_route("POST", "/model/arn:aws:bedrock:us-east-1:123:inference-profile%252Fx/invoke")
    assert route is not None
    assert route.model_raw == "arn:aws:bedrock:us-east-1:123:inference-profile%2Fx"


def test_inference_profiles_listing_with_any_query() -> None:
    """GET /inference-profiles (Claude Code's start-up probe) is list_profiles with no model."""
    for path in ("/inference-profiles", "/inference-profiles?type=SYSTEM_DEFINED&maxResults=1000"):
        assert parse_route("GET", path) == InferenceRoute("bedrock", "list_profiles", False)


def test_query_string_is_ignored() -> None:
    """A query string does not change the route."""
    route = parse_route("POST", "/model/us.anthropic.claude-opus-5-5/invoke?beta=true")
    assert route is not None and route.operation == "invoke"


def test_vertex_stream_and_raw_predict() -> None:
    """Vertex streamRawPredict and rawPredict name the model; project and region are recorded."""
    route = parse_route(
        "POST", VERTEX.format(region="us-east5", model="claude-haiku-4-5@20251001") + ":streamRawPredict"
    )
    assert route == InferenceRoute(
        format="vertex",
        operation="stream",
        streaming=True,
        model_raw="claude-haiku-4-5@20251001",
        model_segment="claude-haiku-4-5@20251001",
        model="claude-haiku-4-5-20251001",
        regional=True,
        vertex_project="my-proj",
        vertex_region="us-east5",
    )
    raw = parse_route("POST", VERTEX.format(region="global", model="claude-opus-5-5") + ":rawPredict")
    assert raw is not None
    assert (raw.operation, raw.streaming, raw.model, raw.regional) == (
        "invoke",
        False,
        "claude-opus-5-5",
        False,
    )


def test_vertex_encoded_model_is_decoded() -> None:
    """A percent-encoded '@' in the Vertex model segment is decoded once."""
    route = parse_route(
        "POST", VERTEX.format(region="europe-west1", model="claude-opus-4-6%4020260101") + ":rawPredict"
    )
    assert route is not None
    assert route.model_raw == "claude-opus-4-6@20260101"
    assert route.model == "claude-opus-4-6-20260101"


def test_vertex_count_tokens_has_no_model() -> None:
    """models/count-tokens:rawPredict is count_tokens; the model is in the body, not the path."""
    route = parse_route("POST", VERTEX.format(region="us-east5", model="count-tokens") + ":rawPredict")
    assert route == InferenceRoute(
        format="vertex",
        operation="count_tokens",
        streaming=False,
        regional=True,
        vertex_project="my-proj",
        vertex_region="us-east5",
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/model/us.anthropic.claude-opus-5-5/invoke"),
        ("post", "/model/us.anthropic.claude-opus-5-5/invoke"),
        ("POST", "/model//invoke"),
        ("POST", "/model/us.anthropic.claude-opus-5-5/invoke/extra"),
        (
            "POST",
            "/model/arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude-opus-5-5/invoke",
        ),
        ("POST", "/model/us.anthropic.claude-opus-5-5/converse"),
        ("POST", "/model/us.anthropic.claude-opus-5-5"),
        ("POST", "/model/../invoke"),
        ("POST", "/model/%2E%2E/invoke"),
        ("POST", "/model/claude%20opus/invoke"),
        ("POST", "/model/%FF%FE/invoke"),
        ("POST", "/inference-profiles"),
        ("GET", "/inference-profiles/extra"),
        ("GET", "/inference-profiles/"),
        ("POST", "model/us.anthropic.claude-opus-5-5/invoke"),
        ("POST", "//model/us.anthropic.claude-opus-5-5/invoke"),
        ("POST", "/v1/messages"),
        ("POST", "/"),
        ("POST", ""),
        ("GET", VERTEX.format(region="us-east5", model="claude-opus-5-5") + ":rawPredict"),
        ("POST", VERTEX.format(region="us-east5", model="claude-opus-5-5")),
        ("POST", VERTEX.format(region="us-east5", model="claude-opus-5-5") + ":predict"),
        ("POST", VERTEX.format(region="us-east5", model="") + ":rawPredict"),
        ("POST", VERTEX.format(region="us-east5", model="count-tokens") + ":streamRawPredict"),
        ("POST", VERTEX.format(region="", model="claude-opus-5-5") + ":rawPredict"),
        ("POST", VERTEX.format(region="us-east5", model="claude-opus-5-5/extra") + ":rawPredict"),
        ("POST", "/v1/projects/p/locations/us-east5/publishers/google/models/gemini-2.5-pro:rawPredict"),
        ("POST", "/v1/projects/p/locations/us-east5/publishers/meta/models/claude-opus-5-5:streamRawPredict"),
        (
            "POST",
            "/v1beta1/projects/p/locations/us-east5/publishers/anthropic/models/claude-opus-5-5:rawPredict",
        ),
    ],
)
def test_unknown_routes_are_rejected(method: str, path: str) -> None:
    """Anything but the exact Bedrock and Vertex inference routes is None (a 404)."""
    assert parse_route(method, path) is None
