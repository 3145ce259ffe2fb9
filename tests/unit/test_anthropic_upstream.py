"""The ``anthropic`` upstream kind: its YAML settings and their errors, the runtime upstream's
endpoint, paths, model ids and signing, its descriptor, and that no client format reaches it."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from authz.config import loads
from authz.configtypes import GatewayConfig, Policy, Upstream
from authz.envoy.upstreams import endpoint as cluster_endpoint
from authz.errors import ConfigError
from authz.gateway import policy
from authz.gateway.authorize import parse_route
from authz.identity import Caller as Who
from authz.translate.registry import TRANSLATORS
from backends.anthropic import (
    AnthropicConfig,
    AnthropicCredentials,
    AnthropicUpstream,
    parse_model_id,
)
from backends.base import Caller, Endpoint, ModelRef, Operation
from backends.bedrock import BedrockConfig
from backends.errors import BackendError, BadModelId
from backends.jsonbody import JsonMeter
from backends.kinds import KINDS, PASS_THROUGH
from backends.sse import SseMeter

KEY = "sk-ant-unit-test-key-0123456789"
ALICE = Caller(sub="00u1alice", email="alice@example.com", groups=("eng",))
OPUS = ModelRef("claude-opus-5-5", "claude-opus-5-5", regional=False)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a network connection (unit tests must not)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def config(**overrides: Any) -> AnthropicConfig:
    values: dict[str, Any] = {"credentials": AnthropicCredentials(api_key=KEY)}
    values.update(overrides)
    return AnthropicConfig(**values)


def load_upstream(section: str, environ: dict[str, str] | None = None, base_dir: Path | None = None) -> Any:
    """The settings of a config whose only upstream ``u`` is ``section``."""
    body = textwrap.indent(textwrap.dedent(section).strip(), "    ")
    return loads(f"upstreams:\n  u:\n{body}\n", environ or {}, base_dir=base_dir).upstream("u")


def config_error(section: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_upstream(section, environ)
    return info.value


# --- configuration --------------------------------------------------------------------------------


def test_config_loads_kind_anthropic_with_the_key_from_a_file(tmp_path: Path) -> None:
    """`kind: anthropic` builds AnthropicConfig; ${file:} supplies the key without its trailing newline."""
    (tmp_path / "anthropic.key").write_text(f"{KEY}\n", encoding="utf-8")
    upstream = load_upstream(
        """
        kind: anthropic
        credentials: {api_key: "${file:anthropic.key}"}
        model_map: {claude-opus-5-5: claude-opus-5-5-20260901}
        connect_timeout: 2.5
        """,
        base_dir=tmp_path,
    )
    assert upstream.kind == "anthropic"
    assert upstream.settings == AnthropicConfig(
        credentials=AnthropicCredentials(api_key=KEY),
        model_map=(("claude-opus-5-5", "claude-opus-5-5-20260901"),),
        connect_timeout=2.5,
    )


def test_no_repr_shows_the_key() -> None:
    """Neither the loaded configuration, its upstream section, nor the runtime upstream prints the key."""
    whole = loads(
        "upstreams:\n  u:\n    kind: anthropic\n    credentials: {api_key: '${KEY}'}\n", {"KEY": KEY}
    )
    upstream = KINDS["anthropic"].build("u", whole.upstream("u").settings)
    for shown in (repr(whole), str(whole.upstream("u")), repr(upstream), str(upstream)):
        assert KEY not in shown
    assert "AnthropicUpstream(name='u'" in repr(upstream)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("kind: anthropic", "upstreams.u.credentials"),
        ("kind: anthropic\ncredentials: {}", "upstreams.u.credentials.api_key"),
        ("kind: anthropic\ncredentials: {api_key: ''}", "upstreams.u.credentials.api_key"),
        ("kind: anthropic\ncredentials: {api_key: '${EMPTY:-}'}", "upstreams.u.credentials.api_key"),
        ("kind: anthropic\ncredentials: {source: static, api_key: k}", "upstreams.u.credentials.source"),
        ("kind: anthropic\nregion: us-east-1\ncredentials: {api_key: k}", "upstreams.u.region"),
        (
            "kind: anthropic\ncredentials: {api_key: k}\nbase_url: http://api.example.com",
            "upstreams.u.base_url",
        ),
        (
            "kind: anthropic\ncredentials: {api_key: k}\nbase_url: https://x.example/v1",
            "upstreams.u.base_url",
        ),
    ],
)
def test_bad_settings_name_their_field(section: str, field: str) -> None:
    """Missing, empty or unknown keys and a bad base_url stop loading with an error naming the field."""
    assert config_error(section).field == field


@pytest.mark.parametrize(
    "key",
    ["sk-ant-has a space", "sk-ant-two\nlines", "sk-ant-tab\tinside", "sk-ant-caf\u00e9", "x" * 513],
)
def test_a_key_that_cannot_be_a_header_value_is_refused_without_repeating_it(key: str) -> None:
    """A key with whitespace or non-ASCII (a damaged key file) is refused, and the message hides it."""
    err = config_error("kind: anthropic\ncredentials: {api_key: '${KEY}'}", {"KEY": key})
    assert err.field == "upstreams.u.credentials.api_key"
    assert key not in str(err) and key[:8] not in err.problem


@pytest.mark.parametrize(
    "target",
    [
        "us.anthropic.claude-opus-5-5",
        "claude-sonnet-4-5@20250929",
        "Claude-Opus-5-5",
        "claude",
        "claude-opus-5-5-",
        "claude--opus",
        "gpt-4o",
    ],
)
def test_model_map_values_must_be_first_party_ids(target: str) -> None:
    """A model_map value outside claude-<words>[-YYYYMMDD] is refused on its own key."""
    err = config_error(
        f"kind: anthropic\ncredentials: {{api_key: k}}\nmodel_map: {{claude-opus-5-5: '{target}'}}"
    )
    assert err.field == "upstreams.u.model_map.claude-opus-5-5"
    assert "first-party model id" in err.problem


@pytest.mark.parametrize(
    "model", ["claude-opus-5-5", "claude-haiku-4-5-20251001", "claude-3-5-sonnet-20241022"]
)
def test_first_party_ids_parse_to_themselves(model: str) -> None:
    """A first-party id is its own canonical and upstream id, never regional."""
    assert parse_model_id(model) == ModelRef(model, model, regional=False)


def test_a_bad_first_party_id_is_a_bad_model_id() -> None:
    """parse_model_id raises BadModelId (a 400 for clients) for anything else."""
    with pytest.raises(BadModelId):
        parse_model_id("claude-opus-5-5\n")


# --- the runtime upstream -------------------------------------------------------------------------


def test_default_endpoint_is_the_public_api() -> None:
    """Without base_url requests go to https://api.anthropic.com:443, which Envoy's cluster dials too."""
    upstream = AnthropicUpstream("first-party", config())
    assert upstream.endpoint == Endpoint("https", "api.anthropic.com", 443)
    assert upstream.authority == "api.anthropic.com"
    assert cluster_endpoint(Upstream(kind="anthropic", settings=config())) == upstream.endpoint


def test_base_url_replaces_the_endpoint() -> None:
    """base_url (the emulator, a proxy) is the endpoint, port included in the authority."""
    upstream = AnthropicUpstream("first-party", config(base_url="http://127.0.0.1:18081"))
    assert (upstream.endpoint.scheme, upstream.authority) == ("http", "127.0.0.1:18081")


def test_constructing_with_a_bad_key_is_a_backend_error_that_hides_it() -> None:
    """An upstream built around an unusable key fails at start-up without printing the key."""
    with pytest.raises(BackendError) as info:
        AnthropicUpstream("first-party", config(credentials=AnthropicCredentials(api_key="sk ant secret")))
    assert "secret" not in str(info.value)
    assert "credentials.api_key" in str(info.value)


@pytest.mark.parametrize(
    ("operation", "query", "path"),
    [
        ("invoke", "", "/v1/messages"),
        ("stream", "", "/v1/messages"),
        ("invoke", "beta=true", "/v1/messages"),
        ("count_tokens", "", "/v1/messages/count_tokens"),
        ("list_models", "", "/v1/models"),
        ("list_models", "limit=5", "/v1/models?limit=5"),
    ],
)
def test_paths(operation: Operation, query: str, path: str) -> None:
    """Each operation has its fixed API path; the model travels in the body, never in the path."""
    assert AnthropicUpstream("a", config()).path(operation, "claude-opus-5-5", query) == path


def test_listing_inference_profiles_is_not_served() -> None:
    """list_profiles (a Bedrock operation) has no route here: a BackendError, not a guessed path."""
    with pytest.raises(BackendError, match="no list_profiles route"):
        AnthropicUpstream("a", config()).path("list_profiles", None)


def test_model_id_is_the_mapped_or_canonical_id() -> None:
    """model_map wins for its canonical id; otherwise the canonical first-party id is sent."""
    upstream = AnthropicUpstream("a", config(model_map=(("claude-opus-5-5", "claude-opus-5-5-20260901"),)))
    assert upstream.model_id(OPUS) == "claude-opus-5-5-20260901"
    bedrock_haiku = ModelRef("us.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5-20251001", True)
    assert upstream.model_id(bedrock_haiku) == "claude-haiku-4-5-20251001"


async def test_sign_sets_exactly_the_configured_key() -> None:
    """sign() answers the endpoint's authority, the path, and x-api-key with the configured key only,
    whatever credentials the request headers carried."""
    upstream = AnthropicUpstream("a", config())
    signed = await upstream.sign(
        method="POST",
        path="/v1/messages",
        headers={"content-type": "application/json", "authorization": "Bearer client", "x-api-key": "client"},
        body=b'{"model":"claude-opus-5-5"}',
        caller=ALICE,
    )
    assert (signed.authority, signed.path, signed.headers) == (
        "api.anthropic.com",
        "/v1/messages",
        {"x-api-key": KEY},
    )
    await upstream.aclose()


# --- the descriptor and the rest of the gateway --------------------------------------------------


def test_kind_table_builds_the_anthropic_upstream() -> None:
    """The kind's descriptor builds an AnthropicUpstream from its settings, named as configured."""
    kind = KINDS["anthropic"]
    assert kind.settings_type is AnthropicConfig
    upstream = kind.build("first-party", config())
    assert isinstance(upstream, AnthropicUpstream)
    assert (upstream.name, upstream.kind) == ("first-party", "anthropic")
    assert kind.endpoint(config()) == upstream.endpoint


def test_descriptor_facts() -> None:
    """The key does not cover the body; streams meter as SSE, answers as JSON; no regional premium;
    no client format is relayed to it byte for byte."""
    kind = KINDS["anthropic"]
    assert kind.signs_body is False
    assert isinstance(kind.meter(True), SseMeter)
    assert isinstance(kind.meter(False), JsonMeter)
    assert kind.regional(config(), OPUS) is False
    assert kind.regional(config(), None) is False
    assert kind.passthrough is None
    assert "anthropic" not in {k.name for k in PASS_THROUGH.values()}
    assert not [pair for pair in TRANSLATORS if pair[1] == "anthropic"]


def test_policies_never_send_a_client_format_to_an_anthropic_upstream() -> None:
    """A policy listing an anthropic upstream first still sends Bedrock clients to its Bedrock one,
    and with only the anthropic upstream the request is denied."""
    upstreams = (
        ("first-party", Upstream(kind="anthropic", settings=config())),
        ("bedrock-us", Upstream(kind="bedrock", settings=BedrockConfig(region="us-east-1"))),
    )
    route = parse_route("POST", "/model/us.anthropic.claude-opus-5-5/invoke")
    assert route is not None
    ada = Who(sub="u1", email="ada@example.com", groups=("eng",), session_id=None)
    both = GatewayConfig(
        upstreams=upstreams,
        policies=(Policy(name="eng", groups=("eng",), upstreams=("first-party", "bedrock-us")),),
    )
    only = GatewayConfig(
        upstreams=upstreams, policies=(Policy(name="eng", groups=("eng",), upstreams=("first-party",)),)
    )
    assert policy.decide(ada, route[1], route[0], both).upstream == "bedrock-us"
    assert policy.decide(ada, route[1], route[0], only).upstream is None
