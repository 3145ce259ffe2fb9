"""The ext_authz decision: routes, tokens, size, policy, header hygiene, context and denied rows."""

from __future__ import annotations

import base64
import json

import pytest

from authz.config import loads
from authz.configtypes import GatewayConfig, Sessions, SigningKey
from authz.envoy.names import UPSTREAM_HEADER
from authz.errors import TokenError
from authz.gateway.authorize import Allow, Authorizer, CheckInput, Deny, bearer_token
from authz.identity import Caller, ChainUpstream, ClientFacts, RequestIdentity
from authz.signin.tokens import Claims, KeySet, TokenVerifier, generate_signing_key, mint
from authz.store.usagerow import UsageRow

NOW = 1_900_000_000.0
ISSUER = "https://gw.test"
AUDIENCE = "claude-gateway"
SIGNING = generate_signing_key("k1")
# Same kid, different key pair: its signatures must not verify against the configured key.
IMPOSTOR = generate_signing_key("k1")

CONFIG_YAML = f"""
sessions:
  issuer: {ISSUER}
  audience: {AUDIENCE}
  signing_key:
    kid: k1
    algorithm: ES256
    private_key: {json.dumps(SIGNING.private_key)}
upstreams:
  bedrock-us: {{kind: bedrock, region: us-east-1}}
  vertex-main: {{kind: vertex, region: us-east5, project: acme-prod}}
  vertex-global: {{kind: vertex, region: global, project: acme-prod}}
policies:
  - name: eng
    groups: [eng]
    models: ["claude-opus-*", "claude-haiku-*"]
    upstreams: [bedrock-us, vertex-main]
  - name: worldwide
    groups: [global]
    upstreams: [vertex-global]
  - name: contractors
    email_domains: [contractors.example.com]
    upstreams: [bedrock-us]
  - name: two-regions
    groups: [regions]
    upstreams: [vertex-main, vertex-global]
limits:
  max_request_body_bytes: 1000
"""

BEDROCK_STREAM = "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream"
BEDROCK_SONNET = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
VERTEX_INVOKE = (
    "/v1/projects/client-project/locations/global/publishers/anthropic/models/"
    "claude-haiku-4-5@20251001:rawPredict"
)

CLAUDE_CODE_HEADERS = {
    "user-agent": "claude-cli/2.1.0 (external, cli)",
    "x-app": "cli",
    "x-claude-code-session-id": "cc-session-1",
    "x-claude-code-agent-id": "agent-7",
    "x-claude-code-parent-agent-id": "agent-1",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "interleaved-thinking-2025-05-14",
    "content-type": "application/json",
    "content-length": "512",
}


def _config() -> GatewayConfig:
    return loads(CONFIG_YAML, {})


def _authorizer(
    revoked: frozenset[str] = frozenset(),
    seen: list[str] | None = None,
    failover_clusters: frozenset[str] | None = None,
) -> Authorizer:
    config = _config()
    verifier = TokenVerifier(
        KeySet.from_config(config.sessions),
        issuer=config.sessions.issuer,
        audience=config.sessions.audience,
        clock_skew=config.sessions.clock_skew,
    )

    def is_revoked(claims: Claims) -> bool:
        if seen is not None:
            seen.append(claims.sid)
        return claims.sid in revoked

    return Authorizer(config, verifier, is_revoked=is_revoked, failover_clusters=failover_clusters)


def _token(
    *,
    sub: str = "00u-alice",
    email: str = "alice@example.com",
    groups: tuple[str, ...] = ("eng",),
    sid: str = "sess-alice",
    audience: str = AUDIENCE,
    now: float = NOW,
    ttl: int = 900,
    key: SigningKey = SIGNING,
) -> str:
    return mint(
        KeySet.from_config(Sessions(signing_key=key)),
        issuer=ISSUER,
        audience=audience,
        sub=sub,
        email=email,
        groups=groups,
        sid=sid,
        ttl=ttl,
        now=now,
    )


def _alg_none_token() -> str:
    def b64(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "00u-mallory",
        "email": "mallory@example.com",
        "groups": ["eng"],
        "sid": "s",
        "iat": int(NOW),
        "exp": int(NOW) + 900,
        "jti": "j",
    }
    return f"{b64({'alg': 'none', 'kid': 'k1', 'typ': 'at+jwt'})}.{b64(claims)}."


def _input(path: str, headers: dict[str, str], method: str = "POST") -> CheckInput:
    return CheckInput(method=method, path=path, headers=headers, request_id="req-1", now=NOW)


def _check(path: str, headers: dict[str, str], method: str = "POST", **kwargs: object) -> Allow | Deny:
    return _authorizer(**kwargs).check(_input(path, headers, method))  # type: ignore[arg-type]


def _deny(decision: Allow | Deny) -> Deny:
    assert isinstance(decision, Deny), decision
    return decision


def _allow(decision: Allow | Deny) -> Allow:
    assert isinstance(decision, Allow), decision
    return decision


def _envelope(deny: Deny) -> dict[str, str]:
    body = json.loads(deny.reply.body)
    assert body["type"] == "error"
    return body["error"]  # type: ignore[no-any-return]


def _assert_anonymous(row: UsageRow) -> None:
    assert (row.user_sub, row.user_email, row.groups, row.session_id) == (None, None, (), None)


def _assert_alice(row: UsageRow) -> None:
    assert (row.user_sub, row.user_email, row.groups, row.session_id) == (
        "00u-alice",
        "alice@example.com",
        ("eng",),
        "sess-alice",
    )


# --- routes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/model/x/converse"),
        ("GET", BEDROCK_STREAM),
        ("GET", "/v1/messages"),
        ("POST", "/v1/complete"),
        ("POST", "/v1/models"),
    ],
)
def test_unknown_route_is_denied_with_404(method: str, path: str) -> None:
    """A path or method that is no inference route gets a 404 not_found_error; an anonymous caller
    gets no row of its own (anonymous refusals are counted in aggregate)."""
    deny = _deny(_check(path, {"authorization": "Bearer junk"}, method))
    assert deny.reply.status == 404
    assert _envelope(deny)["type"] == "not_found_error"
    assert deny.reason == "unknown_route"
    assert deny.row is None


def test_unknown_route_row_names_a_verified_caller() -> None:
    """A 404 for a caller with a valid token still records who asked."""
    deny = _deny(_check("/model/x/converse", {"authorization": f"Bearer {_token()}"}))
    assert deny.reply.status == 404
    assert deny.row is not None
    assert (deny.row.status, deny.row.outcome, deny.row.ingress_format) == (404, "denied", "unknown")
    _assert_alice(deny.row)


# --- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "token_missing"),
        ({"authorization": "Basic YWxpY2U6cHc="}, "token_ambiguous"),
        ({"authorization": "Bearer "}, "token_ambiguous"),
        ({"authorization": f"Bearer {_token(now=NOW - 7200)}"}, "token_expired"),
        ({"authorization": f"Bearer {_token(key=IMPOSTOR)}"}, "token_bad_signature"),
        ({"authorization": f"Bearer {_token(audience='someone-else')}"}, "token_wrong_audience"),
        ({"authorization": f"Bearer {_alg_none_token()}"}, "token_algorithm_not_allowed"),
        ({"authorization": "Bearer not.a.jwt"}, "token_malformed"),
    ],
    ids=["missing", "basic", "empty", "expired", "bad-signature", "wrong-audience", "alg-none", "garbage"],
)
def test_bad_token_is_401_without_retry_and_no_row(headers: dict[str, str], reason: str) -> None:
    """Every token failure is a 401 authentication_error with x-should-retry: false and a token_*
    reason, and writes no row of its own: a token flood must not load the database."""
    deny = _deny(_check(BEDROCK_STREAM, {**CLAUDE_CODE_HEADERS, **headers}))
    assert deny.reply.status == 401
    assert _envelope(deny)["type"] == "authentication_error"
    assert ("x-should-retry", "false") in deny.reply.headers
    assert ("content-type", "application/json") in deny.reply.headers
    assert deny.reason == reason
    assert deny.row is None


def test_expired_and_missing_tokens_say_what_to_do() -> None:
    """The 401 message says the token expired, or that none was sent and how to get one."""
    expired = _deny(_check(BEDROCK_STREAM, {"authorization": f"Bearer {_token(now=NOW - 7200)}"}))
    assert "expired" in _envelope(expired)["message"]
    missing = _deny(_check(BEDROCK_STREAM, {}))
    assert "authz login" in _envelope(missing)["message"]


def test_revoked_session_is_401() -> None:
    """A valid token whose sid is in the revocation set is refused as token_revoked."""
    seen: list[str] = []
    token = _token(sid="sess-revoked")
    deny = _deny(
        _check(
            BEDROCK_STREAM,
            {"authorization": f"Bearer {token}"},
            revoked=frozenset({"sess-revoked"}),
            seen=seen,
        )
    )
    assert seen == ["sess-revoked"]
    assert deny.reply.status == 401
    assert ("x-should-retry", "false") in deny.reply.headers
    assert deny.reason == "token_revoked" and deny.row is None
    assert "revoked" in _envelope(deny)["message"]
    other = _check(
        BEDROCK_STREAM, {"authorization": f"Bearer {_token()}"}, revoked=frozenset({"sess-revoked"})
    )
    assert isinstance(other, Allow)


def test_bearer_token_sources() -> None:
    """The token comes from `Authorization: Bearer` (any case) or x-api-key, the same in both
    when both are sent; nothing else."""
    assert bearer_token({"authorization": "Bearer abc"}) == "abc"
    assert bearer_token({"authorization": "bearer  abc "}) == "abc"
    assert bearer_token({"x-api-key": " key "}) == "key"
    assert bearer_token({"authorization": "Bearer key", "x-api-key": "key"}) == "key"
    assert bearer_token({"x-api-key": "  "}) is None
    assert bearer_token({}) is None


@pytest.mark.parametrize(
    ("headers", "repeated"),
    [
        ({"authorization": "Bearer xyz", "x-api-key": "key"}, frozenset()),
        ({"authorization": "Basic abc", "x-api-key": "key"}, frozenset()),
        ({"authorization": "Basic abc"}, frozenset()),
        ({"authorization": "Bearer a b"}, frozenset()),
        ({"authorization": "Bearer "}, frozenset()),
        ({"authorization": "Bearer abc"}, frozenset({"authorization"})),
        ({"x-api-key": "abc"}, frozenset({"x-api-key"})),
    ],
)
def test_more_or_other_than_one_bearer_is_ambiguous(
    headers: dict[str, str], repeated: frozenset[str]
) -> None:
    """Two different tokens, a repeated credential header or a non-bearer Authorization is refused."""
    with pytest.raises(TokenError) as info:
        bearer_token(headers, repeated)
    assert info.value.reason == "ambiguous"


def test_repeated_authorization_is_a_401_even_with_a_valid_first_token() -> None:
    """`Authorization: <valid>` plus a second (even empty) Authorization header is refused."""
    deny = _deny(
        _authorizer().check(
            CheckInput(
                method="POST",
                path=BEDROCK_STREAM,
                headers={"authorization": f"Bearer {_token()}"},
                request_id="req-1",
                now=NOW,
                repeated=frozenset({"authorization"}),
            )
        )
    )
    assert deny.reply.status == 401 and deny.reason == "token_ambiguous"


def test_malformed_header_values_are_400() -> None:
    """A header value the servicer found malformed (control characters, bad UTF-8) is a 400."""
    deny = _deny(
        _authorizer().check(
            CheckInput(
                method="POST",
                path=BEDROCK_STREAM,
                headers={"authorization": f"Bearer {_token()}"},
                request_id="req-1",
                now=NOW,
                malformed="x-note holds a control character",
            )
        )
    )
    assert deny.reply.status == 400
    assert _envelope(deny)["type"] == "invalid_request_error"
    assert deny.row is None


def test_x_api_key_is_accepted_and_stripped() -> None:
    """A gateway token sent as x-api-key (Messages-format clients) is accepted and never forwarded."""
    allow = _allow(_check(BEDROCK_STREAM, {"x-api-key": _token()}))
    assert allow.identity.caller is not None and allow.identity.caller.sub == "00u-alice"
    assert "x-api-key" in allow.remove_headers


# --- size and policy --------------------------------------------------------------------------


def test_body_over_the_limit_is_413_with_identity() -> None:
    """A content-length above limits.max_request_body_bytes is a 413 request_too_large, row with identity."""
    deny = _deny(_check(BEDROCK_STREAM, {"authorization": f"Bearer {_token()}", "content-length": "1001"}))
    assert deny.reply.status == 413
    assert _envelope(deny)["type"] == "request_too_large"
    assert deny.row.reason == "body_too_large"
    _assert_alice(deny.row)


def test_body_at_the_limit_is_allowed() -> None:
    """Exactly limits.max_request_body_bytes is still accepted."""
    assert isinstance(
        _check(BEDROCK_STREAM, {"authorization": f"Bearer {_token()}", "content-length": "1000"}), Allow
    )


def test_model_outside_policy_is_400_with_identity() -> None:
    """A model the user's policy does not list is a 400 invalid_request_error naming the model."""
    deny = _deny(_check(BEDROCK_SONNET, {"authorization": f"Bearer {_token()}"}))
    assert deny.reply.status == 400
    error = _envelope(deny)
    assert error["type"] == "invalid_request_error"
    assert "claude-sonnet-4-5-20250929" in error["message"]
    assert deny.row.reason is not None and deny.row.reason.startswith("policy: model")
    assert deny.row.requested_model == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    _assert_alice(deny.row)


def test_user_without_policy_is_403_with_identity() -> None:
    """A verified user no policy admits gets a 403 permission_error; the row says who it was."""
    token = _token(sub="00u-bob", email="bob@elsewhere.com", groups=("sales",), sid="sess-bob")
    deny = _deny(_check(BEDROCK_STREAM, {"authorization": f"Bearer {token}"}))
    assert deny.reply.status == 403
    assert _envelope(deny)["type"] == "permission_error"
    assert deny.row.reason == "policy: no policy admits this user"
    assert (deny.row.user_sub, deny.row.user_email, deny.row.groups, deny.row.session_id) == (
        "00u-bob",
        "bob@elsewhere.com",
        ("sales",),
        "sess-bob",
    )


def test_no_upstream_for_the_format_is_403() -> None:
    """A policy whose upstreams do not serve the route's format is a 403, not a model error."""
    token = _token(email="carol@contractors.example.com", groups=())
    deny = _deny(_check(VERTEX_INVOKE, {"authorization": f"Bearer {token}"}))
    assert deny.reply.status == 403
    assert _envelope(deny)["type"] == "permission_error"


# --- allowed requests -------------------------------------------------------------------------

CREDENTIAL_HEADERS = {
    "cookie": "session=abc",
    "proxy-authorization": "Basic eA==",
    "x-amz-security-token": "FwoG",
    "x-amz-date": "20300101T000000Z",
    "x-goog-user-project": "attacker-project",
    "x-gateway-debug": "1",
    "x-envoy-original-path": "/elsewhere",
}


def test_allowed_bedrock_request() -> None:
    """An allowed Bedrock stream picks the upstream cluster, strips every credential, keeps client headers."""
    headers = {"authorization": f"Bearer {_token()}", **CREDENTIAL_HEADERS, **CLAUDE_CODE_HEADERS}
    allow = _allow(_check(BEDROCK_STREAM, headers))

    assert allow.set_headers == ((UPSTREAM_HEADER, "upstream_bedrock-us"),)
    assert allow.remove_headers == tuple(sorted(["authorization", *CREDENTIAL_HEADERS]))
    kept = set(CLAUDE_CODE_HEADERS)
    assert kept.isdisjoint(allow.remove_headers)
    assert allow.identity == RequestIdentity(
        request_id="req-1",
        started_at=NOW,
        client_format="bedrock",
        operation="stream",
        streaming=True,
        caller=Caller(sub="00u-alice", email="alice@example.com", groups=("eng",), session_id="sess-alice"),
        client=ClientFacts(
            cc_session_id="cc-session-1",
            agent_id="agent-7",
            parent_agent_id="agent-1",
            user_agent="claude-cli/2.1.0 (external, cli)",
        ),
        policy="eng",
        upstream="bedrock-us",
        upstream_kind="bedrock",
        requested_model="us.anthropic.claude-opus-5-5",
        model="claude-opus-5-5",
        upstream_model="us.anthropic.claude-opus-5-5",
        regional=True,
        request_bytes=512,
    )


def test_allowed_vertex_request() -> None:
    """An allowed Vertex rawPredict goes to the vertex upstream with the canonical model."""
    headers = {"authorization": f"Bearer {_token()}", "x-goog-api-client": "gl-python", "user-agent": "sdk"}
    allow = _allow(_check(VERTEX_INVOKE, headers))
    assert allow.set_headers == ((UPSTREAM_HEADER, "upstream_vertex-main"),)
    assert allow.remove_headers == ("authorization", "x-goog-api-client")
    ctx = allow.identity
    assert (ctx.client_format, ctx.operation, ctx.streaming, ctx.upstream) == (
        "vertex",
        "invoke",
        False,
        "vertex-main",
    )
    assert (ctx.requested_model, ctx.model) == ("claude-haiku-4-5@20251001", "claude-haiku-4-5-20251001")
    assert ctx.upstream_model == "claude-haiku-4-5@20251001"
    assert (ctx.client.user_agent, ctx.client.cc_session_id, ctx.client.agent_id) == ("sdk", None, None)


def test_vertex_regional_flag_follows_the_configured_upstream() -> None:
    """Vertex pricing is regional when the chosen upstream's region is, whatever location the path names."""
    regional_path = VERTEX_INVOKE.replace("/locations/global/", "/locations/us-east5/")
    eng = _allow(_check(VERTEX_INVOKE, {"authorization": f"Bearer {_token()}"}))
    assert (eng.identity.upstream, eng.identity.regional) == ("vertex-main", True)
    token = _token(groups=("global",))
    worldwide = _allow(_check(regional_path, {"authorization": f"Bearer {token}"}))
    assert (worldwide.identity.upstream, worldwide.identity.regional) == ("vertex-global", False)


def test_forged_upstream_header_is_overwritten_not_removed() -> None:
    """A client's own x-gateway-upstream is replaced by the set header and kept off the removal list.

    Envoy applies headers_to_remove after the headers it sets, so removing it would drop ours too.
    """
    headers = {
        "authorization": f"Bearer {_token()}",
        UPSTREAM_HEADER: "upstream_evil",
        "x-gateway-other": "1",
    }
    allow = _allow(_check(BEDROCK_STREAM, headers))
    assert allow.set_headers == ((UPSTREAM_HEADER, "upstream_bedrock-us"),)
    assert UPSTREAM_HEADER not in allow.remove_headers
    assert "x-gateway-other" in allow.remove_headers


def test_a_request_two_upstreams_serve_goes_to_their_failover_cluster() -> None:
    """When the policy lists two upstreams serving the client's format, ext_authz names their
    failover cluster and hands ext_proc both, in order, each with its model id and pricing; the
    first is the request's upstream until another answers."""
    token = _token(groups=("regions",))
    allow = _allow(_check(VERTEX_INVOKE, {"authorization": f"Bearer {token}"}))
    assert allow.set_headers == ((UPSTREAM_HEADER, "failover2_vertex-main__vertex-global"),)
    ctx = allow.identity
    assert ctx.chain == (
        ChainUpstream("vertex-main", "vertex", "claude-haiku-4-5@20251001", regional=True),
        ChainUpstream("vertex-global", "vertex", "claude-haiku-4-5@20251001", regional=False),
    )
    assert (ctx.upstream, ctx.upstream_kind, ctx.regional) == ("vertex-main", "vertex", True)
    # A Messages request of the eng policy may go to either kind; its model is in the body.
    messages = _allow(_check("/v1/messages", {"authorization": f"Bearer {_token()}"}))
    assert messages.set_headers == ((UPSTREAM_HEADER, "failover2_bedrock-us__vertex-main"),)
    assert [(c.upstream, c.kind, c.upstream_model) for c in messages.identity.chain] == [
        ("bedrock-us", "bedrock", None),
        ("vertex-main", "vertex", None),
    ]


def test_a_request_one_upstream_serves_keeps_its_cluster_and_no_chain() -> None:
    """A Bedrock request of the eng policy has one Bedrock upstream: its own cluster, no chain."""
    allow = _allow(_check(BEDROCK_STREAM, {"authorization": f"Bearer {_token()}"}))
    assert allow.set_headers == ((UPSTREAM_HEADER, "upstream_bedrock-us"),)
    assert allow.identity.chain == ()


def test_a_chain_envoy_was_not_started_with_is_served_by_its_first_upstream() -> None:
    """After a reload gave a policy a chain Envoy has no cluster for, its first upstream serves
    alone (its own cluster, no chain) rather than naming a cluster Envoy would not find."""
    token = _token(groups=("regions",))
    decided = _allow(
        _check(VERTEX_INVOKE, {"authorization": f"Bearer {token}"}, failover_clusters=frozenset())
    )
    assert decided.set_headers == ((UPSTREAM_HEADER, "upstream_vertex-main"),)
    assert decided.identity.chain == () and decided.identity.upstream == "vertex-main"


def test_list_profiles_needs_no_model() -> None:
    """GET /inference-profiles is allowed for a user with a Bedrock upstream, with no model in context."""
    allow = _allow(
        _check("/inference-profiles?type=SYSTEM_DEFINED", {"authorization": f"Bearer {_token()}"}, "GET")
    )
    assert (allow.identity.operation, allow.identity.model, allow.identity.upstream) == (
        "list_profiles",
        None,
        "bedrock-us",
    )


def test_malformed_model_id_is_400_before_any_upstream() -> None:
    """A route naming a model outside the kind's grammar is a 400 with a row naming the caller."""
    path = "/model/us.anthropic.claude-haiku-4-5%2F..%2Fus.anthropic.claude-opus-5-5/invoke"
    deny = _deny(_check(path, {"authorization": f"Bearer {_token()}"}))
    assert deny.reply.status == 400
    assert _envelope(deny)["type"] == "invalid_request_error"
    assert deny.row is not None and deny.row.reason == "bad_model_id"
    _assert_alice(deny.row)


def test_denied_rows_name_the_policy_that_refused() -> None:
    """A model refusal records the policy whose allow-list refused it."""
    deny = _deny(_check(BEDROCK_SONNET, {"authorization": f"Bearer {_token()}"}))
    assert deny.row is not None and deny.row.policy == "eng"


# --- service identities ---------------------------------------------------------------------------


def _service_token(models: tuple[str, ...] | None) -> str:
    return mint(
        KeySet.from_config(Sessions(signing_key=SIGNING)),
        issuer=ISSUER,
        audience=AUDIENCE,
        sub="service:ci-nightly",
        email="",
        groups=("eng",),
        sid="svc:tok-1",
        ttl=900,
        now=NOW,
        jti="tok-1",
        models=models,
    )


def test_service_token_models_narrow_its_policy_and_rows_name_it() -> None:
    """A service token limited to claude-haiku-* is allowed haiku and refused opus (which its policy
    allows) with a 400; both the refusal's row and the finished row name the service identity."""
    from authz.billing.accounting import usage_row
    from authz.billing.pricing import PriceBook
    from authz.configtypes import Pricing

    headers = {"authorization": f"Bearer {_service_token(('claude-haiku-*',))}"}
    deny = _deny(_check(BEDROCK_STREAM, headers))
    assert deny.reply.status == 400
    assert "not allowed for this service token" in _envelope(deny)["message"]
    assert deny.row is not None and deny.row.service_identity == "ci-nightly"
    allow = _allow(_check(VERTEX_INVOKE, headers))
    row = usage_row(
        allow.identity,
        status=200,
        outcome="complete",
        reason=None,
        prices=PriceBook(Pricing()),
        ended_at=NOW + 1,
    )
    assert (row.service_identity, row.session_id, row.user_sub) == (
        "ci-nightly",
        "svc:tok-1",
        "service:ci-nightly",
    )
    person = _deny(_check(BEDROCK_SONNET, {"authorization": f"Bearer {_token()}"}))
    assert person.row is not None and person.row.service_identity is None


def test_revoked_service_token_is_401() -> None:
    """A service token whose sid (svc:<id>) is in the revocation set is refused like a revoked session."""
    headers = {"authorization": f"Bearer {_service_token(None)}"}
    assert isinstance(_check(BEDROCK_STREAM, headers), Allow)
    deny = _deny(_check(BEDROCK_STREAM, headers, revoked=frozenset({"svc:tok-1"})))
    assert deny.reply.status == 401 and deny.reason == "token_revoked"
