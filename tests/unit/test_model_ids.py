"""Route and model-id grammars of the Bedrock and Vertex client contracts: exact, decoded once."""

from __future__ import annotations

import urllib.parse

import pytest

from authz.gateway.authorize import parse_route as parse_any_route
from backends.base import ModelRef, model_family
from backends.bedrock import ids as bedrock_ids
from backends.bedrock import profile_geography
from backends.descriptor import PassThroughRoute
from backends.errors import BadModelId
from backends.vertex import ids as vertex_ids

ARN_PROFILE = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5-v1:0"
VERTEX = "/v1/projects/my-proj/locations/{region}/publishers/anthropic/models/{model}"


def canonical_model(raw: str) -> str:
    """The canonical id of a Bedrock or (failing that) Vertex model id."""
    try:
        return bedrock_ids.parse_model_id(raw).canonical
    except BadModelId:
        return vertex_ids.parse_model_id(raw).canonical


def parse_route(method: str, path: str) -> PassThroughRoute | None:
    parsed = parse_any_route(method, path)
    return parsed[1] if parsed else None


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
        ("Claude-Sonnet-5", "claude-sonnet-5"),
    ],
)
def test_canonical_model(raw: str, canonical: str) -> None:
    """Bedrock and Vertex ids normalise to the first-party form, lower-cased."""
    assert canonical_model(raw) == canonical


@pytest.mark.parametrize(
    "raw", ["mistral.mistral-large-2407-v1:0", "something-else", "claude-sonnet-4-5@latest"]
)
def test_ids_outside_the_grammars_are_refused(raw: str) -> None:
    """Other vendors' ids, free text and undated Vertex suffixes match no grammar."""
    with pytest.raises(BadModelId):
        canonical_model(raw)


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
    assert route == PassThroughRoute(
        operation="stream",
        streaming=True,
        model=ModelRef("us.anthropic.claude-opus-5-5", "claude-opus-5-5", regional=True),
    )
    invoke = parse_route("POST", "/model/global.anthropic.claude-haiku-4-5-20251001-v1:0/invoke")
    assert invoke is not None and invoke.model is not None
    assert (invoke.operation, invoke.streaming, invoke.model.regional) == ("invoke", False, False)
    assert invoke.model.canonical == "claude-haiku-4-5-20251001"


def test_bedrock_count_tokens() -> None:
    """POST /model/{id}/count-tokens is the count_tokens operation."""
    route = parse_route("POST", "/model/anthropic.claude-haiku-4-5-20251001-v1:0/count-tokens")
    assert route is not None and route.model is not None
    assert (route.operation, route.streaming) == ("count_tokens", False)
    assert route.model.canonical == "claude-haiku-4-5-20251001"


@pytest.mark.parametrize("prefix", ["us", "eu", "apac", "jp", "au"])
def test_geographic_profiles_are_regional(prefix: str) -> None:
    """Geographic inference profiles are regional endpoints (priced at a premium)."""
    route = parse_route("POST", f"/model/{prefix}.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke")
    assert route is not None and route.model is not None and route.model.regional
    assert route.model.canonical == "claude-sonnet-4-5-20250929"


def test_arn_as_the_sdk_encodes_it() -> None:
    """The anthropic SDK quotes the model with safe=':;', so the ARN's '/' arrives as %2F."""
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5"
    segment = urllib.parse.quote(arn, safe=":;")
    assert (
        segment == "arn:aws:bedrock:us-east-1:123456789012:inference-profile%2Fus.anthropic.claude-opus-5-5"
    )
    route = parse_route("POST", f"/model/{segment}/invoke-with-response-stream")
    assert route is not None and route.model is not None
    assert route.model.upstream_id == arn
    assert route.model.canonical == "claude-opus-5-5"
    assert route.model.regional


def test_fully_encoded_arn_and_global_arn() -> None:
    """%3A decodes to ':' too, and an ARN naming a global profile is not regional."""
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/global.anthropic.claude-opus-5-5-v1:0"
    route = parse_route("POST", f"/model/{urllib.parse.quote(arn, safe='')}/invoke")
    assert route is not None and route.model is not None
    assert route.model.upstream_id == arn
    assert route.model.canonical == "claude-opus-5-5"
    assert not route.model.regional


def test_model_segment_is_decoded_only_once() -> None:
    """A double-encoded %252F decodes to a literal %2F, which no model id contains: refused."""
    with pytest.raises(BadModelId):
        parse_route("POST", "/model/arn:aws:bedrock:us-east-1:123456789012:inference-profile%252Fx/invoke")


def test_inference_profiles_listing_keeps_only_known_query_parameters() -> None:
    """GET /inference-profiles (Claude Code's start-up probe) is list_profiles with no model; its
    query is re-serialised from the parameters Bedrock defines, never forwarded raw."""
    assert parse_route("GET", "/inference-profiles") == PassThroughRoute("list_profiles", False, None)
    route = parse_route("GET", "/inference-profiles?type=SYSTEM_DEFINED&maxResults=1000&x=%0d")
    assert route == PassThroughRoute("list_profiles", False, None, "maxResults=1000&type=SYSTEM_DEFINED")


def test_query_string_is_ignored() -> None:
    """A query string does not change the route."""
    route = parse_route("POST", "/model/us.anthropic.claude-opus-5-5/invoke?beta=true")
    assert route is not None and route.operation == "invoke" and route.query == ""


def test_vertex_stream_and_raw_predict() -> None:
    """Vertex streamRawPredict and rawPredict name the model; the id is rebuilt from its parts."""
    route = parse_route(
        "POST", VERTEX.format(region="us-east5", model="claude-haiku-4-5@20251001") + ":streamRawPredict"
    )
    assert route == PassThroughRoute(
        operation="stream",
        streaming=True,
        model=ModelRef("claude-haiku-4-5@20251001", "claude-haiku-4-5-20251001", regional=True),
    )
    raw = parse_route("POST", VERTEX.format(region="global", model="claude-opus-5-5") + ":rawPredict")
    assert raw is not None and raw.model is not None
    assert (raw.operation, raw.streaming, raw.model.canonical) == ("invoke", False, "claude-opus-5-5")


def test_vertex_encoded_model_is_decoded() -> None:
    """A percent-encoded '@' in the Vertex model segment is decoded once."""
    route = parse_route(
        "POST", VERTEX.format(region="europe-west1", model="claude-opus-4-6%4020260101") + ":rawPredict"
    )
    assert route is not None and route.model is not None
    assert route.model.upstream_id == "claude-opus-4-6@20260101"
    assert route.model.canonical == "claude-opus-4-6-20260101"


def test_vertex_count_tokens_has_no_model() -> None:
    """models/count-tokens:rawPredict is count_tokens; the model is in the body, not the path."""
    route = parse_route("POST", VERTEX.format(region="us-east5", model="count-tokens") + ":rawPredict")
    assert route == PassThroughRoute("count_tokens", False, None)


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
        ("POST", "/inference-profiles"),
        ("GET", "/inference-profiles/extra"),
        ("GET", "/inference-profiles/"),
        ("POST", "model/us.anthropic.claude-opus-5-5/invoke"),
        ("POST", "//model/us.anthropic.claude-opus-5-5/invoke"),
        ("GET", "/v1/messages"),
        ("POST", "/v1/messages/batches"),
        ("POST", "/v1/models"),
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
    """Anything but the exact Bedrock, Vertex and Messages inference routes is None (a 404)."""
    assert parse_route(method, path) is None


@pytest.mark.parametrize("segment", ["..", "%2E%2E", "claude%20opus", "%FF%FE", "%", "%2", "%zz"])
def test_routes_with_malformed_model_segments_are_bad_model_ids(segment: str) -> None:
    """A Bedrock route whose model segment is not a model id is a 400, not a guess."""
    with pytest.raises(BadModelId):
        parse_route("POST", f"/model/{segment}/invoke")


HAIKU = "us.anthropic.claude-haiku-4-5"
OPUS = "us.anthropic.claude-opus-5-5"
# The adversarial review's bypass ids: each starts like an allowed haiku id and names something else.
BYPASSES = [
    f"/model/{HAIKU}%2F..%2F{OPUS}/invoke",
    f"/model/{HAIKU}%5C..%5C{OPUS}/invoke",
    f"/model/{HAIKU}%252F..%252F{OPUS}/invoke",
    f"/model/{HAIKU}-v1:0:opus/invoke",
    f"/model/anthropic.claude-haiku-4-5:arn:aws:bedrock:us-east-1:1:inference-profile%2F{OPUS}/invoke",
    f"/model/{HAIKU}%0a/invoke",
    VERTEX.format(region="us-east5", model="claude-haiku-4-5@x%2F..%2Fclaude-opus-5-5") + ":rawPredict",
    VERTEX.format(region="us-east5", model="claude-haiku-4-5%2F..%2Fclaude-opus-5-5") + ":rawPredict",
]


@pytest.mark.parametrize("path", BYPASSES)
def test_allow_list_bypass_ids_are_refused(path: str) -> None:
    """Every id from the review's allow-list bypass is refused by the exact grammars."""
    with pytest.raises(BadModelId):
        parse_route("POST", path)


def _variants(model: str) -> list[str]:
    """A generated family of encodings and suffixes around an allowed id that name another id."""
    out = []
    for sep in ("/", "\\", "%2F", "%5C", "%252F", "%255C", "%2f", "%5c"):
        for tail in ("..", ".", ""):
            out.append(f"{model}{sep}{tail}{sep}{OPUS}" if tail else f"{model}{sep}{OPUS}")
    for suffix in (
        ":opus",
        ":0:opus",
        "-v1:0:opus",
        "-v1:0:0:200k",
        "%00",
        "%0a",
        "%0d",
        "%09",
        "%20",
        "\n",
        ".",
        "..",
        "@opus",
        "#opus",
        "?opus",
        ";opus",
        "%3Bopus",
        "%3Fx",
        "+opus",
        "*",
    ):
        out.append(model + suffix)
    for prefix in ("..%2F", "%2F", "./", "x.", " ", "%20"):
        out.append(prefix + model)
    return out


@pytest.mark.parametrize("segment", _variants(HAIKU) + _variants("claude-haiku-4-5@20251001"))
def test_generated_bypass_family_never_parses_as_another_model(segment: str) -> None:
    """No encoding or suffix around an allowed id yields a route naming any model but the allowed
    one: either the whole id is refused, or Envoy's router would never match it (None)."""
    for path in (
        f"/model/{segment}/invoke",
        VERTEX.format(region="us-east5", model=segment) + ":rawPredict",
    ):
        try:
            route = parse_route("POST", path)
        except BadModelId:
            continue
        assert route is None or route.model is None or "opus" not in route.model.upstream_id, path


@pytest.mark.parametrize(
    ("raw", "rebuilt"),
    [
        ("US.Anthropic.Claude-Opus-5-5", "us.anthropic.claude-opus-5-5"),
        ("anthropic.claude-3-sonnet-20240229-v1:0:200k", "anthropic.claude-3-sonnet-20240229-v1:0:200k"),
        (
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/A1B2C3D4E5F6",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6",
        ),
    ],
)
def test_the_upstream_id_is_rebuilt_not_copied(raw: str, rebuilt: str) -> None:
    """The id sent upstream is the gateway's own serialisation of what it parsed."""
    assert bedrock_ids.parse_model_id(raw).upstream_id == rebuilt


def test_request_paths_are_built_from_the_parsed_id() -> None:
    """Bedrock paths percent-encode the id as botocore does; Vertex paths use the configured place."""
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5"
    assert bedrock_ids.request_path("stream", arn) == (
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-opus-5-5"
        "/invoke-with-response-stream"
    )
    assert vertex_ids.request_path("ours", "us-east5", "invoke", "claude-haiku-4-5@20251001") == (
        "/v1/projects/ours/locations/us-east5/publishers/anthropic/models/claude-haiku-4-5@20251001:rawPredict"
    )


@pytest.mark.parametrize(
    ("model_id", "foundation"),
    [
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ("global.anthropic.claude-haiku-4-5-20251001-v1:0", "anthropic.claude-haiku-4-5-20251001-v1:0"),
        ("anthropic.claude-opus-4-6-v1", "anthropic.claude-opus-4-6-v1"),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.anthropic.claude-opus-4-5-20251101-v1:0",
            "anthropic.claude-opus-4-5-20251101-v1:0",
        ),
        (
            "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-opus-4-6-v1",
            "anthropic.claude-opus-4-6-v1",
        ),
        ("us.anthropic.claude-opus-5-5", None),
        ("arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abcdef123456", None),
    ],
)
def test_foundation_model_behind_a_bedrock_id(model_id: str, foundation: str | None) -> None:
    """CountTokens takes the foundation model behind a profile; a profile of an inference-profile-only
    model (no version) or an application profile has none that the id reveals."""
    assert bedrock_ids.foundation_model_id(model_id) == foundation


@pytest.mark.parametrize(
    ("region", "geography"),
    [
        ("us-east-1", "us"),
        ("us-gov-west-1", "us-gov"),
        ("eu-central-1", "eu"),
        ("ap-northeast-1", "apac"),
        ("sa-east-1", "global"),
        ("me-central-1", "global"),
    ],
)
def test_profile_geography_follows_the_region(region: str, geography: str) -> None:
    """Default Bedrock ids keep requests in the upstream region's geography, else use global."""
    assert profile_geography(region) == geography
