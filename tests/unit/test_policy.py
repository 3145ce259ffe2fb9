"""Group policy: which policy applies, which models it allows, which upstream it picks."""

from __future__ import annotations

from dataclasses import replace

from authz.configtypes import Failover, GatewayConfig, Policy, Upstream
from authz.gateway import policy
from authz.gateway.authorize import parse_route
from authz.gateway.policy import PolicyDecision
from authz.identity import Caller
from backends.anthropic import AnthropicConfig, AnthropicCredentials
from backends.bedrock import BedrockConfig
from backends.descriptor import PassThroughRoute
from backends.vertex import VertexConfig

UPSTREAMS = (
    ("bedrock-us", Upstream(kind="bedrock", settings=BedrockConfig(region="us-east-1"))),
    ("bedrock-eu", Upstream(kind="bedrock", settings=BedrockConfig(region="eu-west-1"))),
    ("vertex", Upstream(kind="vertex", settings=VertexConfig(region="us-east5", project="proj-1"))),
)

Route = tuple[str, PassThroughRoute]


def _config(*policies: Policy) -> GatewayConfig:
    return GatewayConfig(upstreams=UPSTREAMS, policies=policies)


def _route(method: str, path: str) -> Route:
    route = parse_route(method, path)
    assert route is not None
    return route


def Identity(sub: str, email: str, groups: tuple[str, ...]) -> Caller:
    return Caller(sub=sub, email=email, groups=groups, session_id=None)


def decide(caller: Caller, route: Route, config: GatewayConfig) -> PolicyDecision:
    return policy.decide(caller, route[1], route[0], config)


BEDROCK_OPUS = _route("POST", "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream")
BEDROCK_HAIKU = _route("POST", "/model/anthropic.claude-haiku-4-5-20251001-v1:0/invoke")
VERTEX_HAIKU = _route(
    "POST",
    "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-haiku-4-5@20251001:streamRawPredict",
)
LIST_PROFILES = _route("GET", "/inference-profiles?type=SYSTEM_DEFINED")
VERTEX_COUNT = _route(
    "POST", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict"
)

ADA = Identity(sub="u1", email="ada@Example.COM", groups=("eng",))


def test_group_member_is_allowed_through_the_matching_upstream() -> None:
    """A user in a listed group gets the first upstream of the route's kind."""
    config = _config(Policy(name="eng", groups=("eng",), upstreams=("vertex", "bedrock-us", "bedrock-eu")))
    assert decide(ADA, BEDROCK_OPUS, config) == PolicyDecision(
        True, None, "eng", "bedrock-us", ("bedrock-us", "bedrock-eu")
    )
    assert decide(ADA, VERTEX_HAIKU, config) == PolicyDecision(True, None, "eng", "vertex", ("vertex",))


def test_no_matching_policy_is_denied() -> None:
    """A user matched by no policy is denied with no policy named."""
    config = _config(Policy(name="ml", groups=("ml",), upstreams=("bedrock-us",)))
    assert decide(ADA, BEDROCK_OPUS, config) == PolicyDecision(
        False, "no policy admits this user", None, None
    )
    assert not decide(ADA, BEDROCK_OPUS, _config()).allowed


def test_group_names_are_exact() -> None:
    """IdP group names compare exactly: 'Eng' does not match 'eng'."""
    config = _config(Policy(name="p", groups=("Eng",), upstreams=("bedrock-us",)))
    assert decide(ADA, BEDROCK_OPUS, config).reason == "no policy admits this user"


def test_email_domain_matches_case_insensitively() -> None:
    """The email domain matches whatever the case on either side."""
    config = _config(Policy(name="corp", email_domains=("EXAMPLE.com",), upstreams=("bedrock-us",)))
    bob = Identity(sub="u2", email="bob@example.com", groups=())
    assert decide(bob, BEDROCK_OPUS, config).allowed
    assert decide(ADA, BEDROCK_OPUS, config).allowed


def test_email_domain_is_exact() -> None:
    """Subdomains and look-alike domains do not match, and an email without a domain never does."""
    config = _config(Policy(name="corp", email_domains=("example.com",), upstreams=("bedrock-us",)))
    for email in ("eve@evil-example.com", "eve@sub.example.com", "example.com", "", "@example.com"):
        assert not decide(Identity("u", email, ()), BEDROCK_OPUS, config).allowed, email


def test_first_matching_policy_wins_even_when_it_denies() -> None:
    """Policies apply in file order; a later, more generous policy is not consulted."""
    config = _config(
        Policy(name="haiku-only", groups=("eng",), models=("claude-haiku-*",), upstreams=("bedrock-eu",)),
        Policy(name="everything", email_domains=("example.com",), upstreams=("bedrock-us",)),
    )
    assert decide(ADA, BEDROCK_HAIKU, config) == PolicyDecision(
        True, None, "haiku-only", "bedrock-eu", ("bedrock-eu",)
    )
    denied = decide(ADA, BEDROCK_OPUS, config)
    assert denied == PolicyDecision(
        False, "model claude-opus-5-5 is not allowed for your groups", "haiku-only", None
    )
    # Someone only the second policy admits gets it.
    carol = Identity("u3", "carol@example.com", ("sales",))
    assert decide(carol, BEDROCK_OPUS, config).upstreams == ("bedrock-us",)


def test_model_patterns_match_dated_ids_and_families() -> None:
    """Patterns match the canonical id or its family without the snapshot date, case-insensitively."""
    for pattern in ("claude-haiku-4-5", "CLAUDE-HAIKU-*", "claude-haiku-4-5-2025*", "claude-*-4-5"):
        config = _config(Policy(name="p", groups=("eng",), models=(pattern,), upstreams=("bedrock-us",)))
        assert decide(ADA, BEDROCK_HAIKU, config).allowed, pattern
    config = _config(
        Policy(name="p", groups=("eng",), models=("claude-haiku-4-5-2024*",), upstreams=("vertex",))
    )
    assert not decide(ADA, VERTEX_HAIKU, config).allowed


def test_opus_5_pattern_does_not_admit_opus_5_5() -> None:
    """An exact family pattern admits only that family."""
    config = _config(Policy(name="p", groups=("eng",), models=("claude-opus-5",), upstreams=("bedrock-us",)))
    assert not decide(ADA, BEDROCK_OPUS, config).allowed


def test_no_upstream_of_the_route_format() -> None:
    """A Vertex request under a Bedrock-only policy is denied naming the format."""
    config = _config(Policy(name="eng", groups=("eng",), upstreams=("bedrock-us",)))
    assert decide(ADA, VERTEX_HAIKU, config) == PolicyDecision(
        False, "no upstream serves the vertex format for your policy", "eng", None
    )


def test_unknown_upstream_names_are_skipped() -> None:
    """An upstream name missing from the config is skipped, never used (fail closed)."""
    config = _config(Policy(name="eng", groups=("eng",), upstreams=("gone", "bedrock-eu")))
    assert decide(ADA, BEDROCK_OPUS, config).upstream == "bedrock-eu"


def test_listing_and_counting_skip_the_model_check() -> None:
    """list_profiles and count_tokens need no allowed model but still need an upstream of their kind."""
    config = _config(Policy(name="none", groups=("eng",), models=(), upstreams=("bedrock-us",)))
    assert decide(ADA, LIST_PROFILES, config) == PolicyDecision(
        True, None, "none", "bedrock-us", ("bedrock-us",)
    )
    assert decide(ADA, VERTEX_COUNT, config).reason == "no upstream serves the vertex format for your policy"
    assert not decide(ADA, BEDROCK_HAIKU, config).allowed


def test_route_without_a_model_is_denied_for_inference() -> None:
    """An invoke route that somehow carries no model is denied rather than let through."""
    route = ("bedrock", PassThroughRoute(operation="invoke", streaming=False, model=None))
    config = _config(Policy(name="eng", groups=("eng",), upstreams=("bedrock-us",)))
    assert not decide(ADA, route, config).allowed


def test_a_service_tokens_own_models_narrow_the_policy() -> None:
    """A token carrying model patterns (a service token's --models) gets only the models both its
    patterns and its policy allow; without patterns the policy alone decides."""
    config = _config(
        Policy(
            name="ci", groups=("ci",), models=("claude-haiku-*", "claude-sonnet-*"), upstreams=("bedrock-us",)
        )
    )
    limited = Caller(
        sub="service:nightly",
        email="",
        groups=("ci",),
        session_id="svc:tok-1",
        models=("claude-haiku-*", "claude-opus-*"),
    )
    assert decide(limited, BEDROCK_HAIKU, config).allowed
    opus = decide(limited, BEDROCK_OPUS, config)
    assert not opus.allowed and opus.reason == "model claude-opus-5-5 is not allowed for your groups"
    sonnet = _route("POST", "/model/anthropic.claude-sonnet-4-5-20250929-v1:0/invoke")
    denied = decide(limited, sonnet, config)
    assert (
        not denied.allowed
        and denied.reason == "model claude-sonnet-4-5-20250929 is not allowed for this service token"
    )
    unlimited = Caller(sub="service:nightly", email="", groups=("ci",), session_id="svc:tok-1")
    assert decide(unlimited, sonnet, config).allowed
    assert decide(limited, LIST_PROFILES, config).allowed


MESSAGES = _route("POST", "/v1/messages?beta=true")
MODELS = _route("GET", "/v1/models")


def test_messages_go_to_the_first_upstream_of_any_kind() -> None:
    """A Messages request is served by the policy's first upstream whatever its kind, its model
    (named in the body) left to the exchange; the cloud formats keep the first of their own kind."""
    config = _config(
        Policy(name="eng", groups=("eng",), models=("claude-haiku-*",), upstreams=("vertex", "bedrock-us"))
    )
    both = ("vertex", "bedrock-us")
    assert decide(ADA, MESSAGES, config) == PolicyDecision(True, None, "eng", "vertex", both)
    assert decide(ADA, MODELS, config) == PolicyDecision(True, None, "eng", "vertex", both)
    assert decide(ADA, BEDROCK_HAIKU, config) == PolicyDecision(
        True, None, "eng", "bedrock-us", ("bedrock-us",)
    )
    anthropic = GatewayConfig(
        upstreams=(
            ("api", Upstream(kind="anthropic", settings=AnthropicConfig(AnthropicCredentials("sk-ant-x")))),
            *UPSTREAMS,
        ),
        policies=(Policy(name="eng", groups=("eng",), upstreams=("api", "vertex")),),
    )
    assert decide(ADA, MESSAGES, anthropic) == PolicyDecision(True, None, "eng", "api", ("api", "vertex"))
    # The Anthropic API serves no cloud format: Vertex clients still get Vertex.
    assert decide(ADA, VERTEX_HAIKU, anthropic) == PolicyDecision(True, None, "eng", "vertex", ("vertex",))


def test_check_model_is_the_one_model_rule() -> None:
    """check_model applies the policy's patterns (dated id or family) and a token's own patterns."""
    eng = Policy(name="eng", groups=("eng",), models=("claude-sonnet-4-5",), upstreams=("vertex",))
    assert policy.check_model(eng, None, "claude-sonnet-4-5-20250929") is None
    assert (
        policy.check_model(eng, None, "claude-opus-5-5")
        == "model claude-opus-5-5 is not allowed for your groups"
    )
    assert (
        policy.check_model(eng, ("claude-haiku-*",), "claude-sonnet-4-5-20250929")
        == "model claude-sonnet-4-5-20250929 is not allowed for this service token"
    )


def test_policy_for_is_the_first_match_decide_applies() -> None:
    """config.policy_for names the policy decide uses: first in file order, by group or email
    domain, else None."""
    config = _config(
        Policy(name="by-domain", email_domains=("example.com",), upstreams=("vertex",)),
        Policy(name="eng", groups=("eng",), upstreams=("bedrock-us",)),
    )
    chosen = config.policy_for(ADA.email, ADA.groups)
    assert chosen is not None and chosen.name == "by-domain"
    assert decide(ADA, VERTEX_HAIKU, config).policy == "by-domain"
    assert config.policy_for("bo@elsewhere.org", ("eng",)) is config.policies[1]
    assert config.policy_for("cy@elsewhere.org", ("sales",)) is None
    assert config.policy_for("not-an-address", ()) is None


def test_the_chain_is_every_upstream_serving_the_format_up_to_max_attempts() -> None:
    """The upstreams a request may be tried on are the policy's that serve its format, in order,
    each once, at most failover.max_attempts of them; 1 leaves the first alone."""
    eng = Policy(name="eng", groups=("eng",), upstreams=("bedrock-eu", "vertex", "bedrock-us", "bedrock-eu"))
    config = _config(eng)
    assert decide(ADA, BEDROCK_OPUS, config).upstreams == ("bedrock-eu", "bedrock-us")
    assert decide(ADA, MESSAGES, config).upstreams == ("bedrock-eu", "vertex", "bedrock-us")
    two = replace(config, failover=Failover(max_attempts=2))
    assert decide(ADA, MESSAGES, two).upstreams == ("bedrock-eu", "vertex")
    one = replace(config, failover=Failover(max_attempts=1))
    assert decide(ADA, MESSAGES, one) == PolicyDecision(True, None, "eng", "bedrock-eu", ("bedrock-eu",))
