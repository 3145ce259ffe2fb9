"""A request with a failover chain: the exchange leaves each attempt to the attempt filter, learns
from the answer which upstream answered and after how many attempts, translates and meters as that
upstream's kind requires, and writes one row; an attempt prepares the request for the upstream
Envoy picked, and answers itself only when it cannot."""

from __future__ import annotations

import dataclasses
import json

from authz.config import loads
from authz.gateway.attempt import Answer, Attempt
from authz.gateway.exchange import CONTINUE, RECORDED, AttemptAnswer, Continue, Exchange, Reply
from authz.identity import ChainUpstream, RequestIdentity
from authz.translate.base import TranslateOptions
from authz.translate.models import CATALOGUE, KnownModel, ModelResolver
from backends.base import SignedRequest
from backends.errors import BackendError
from tests.unit.test_exchange import (
    BEDROCK_CTX,
    BODY,
    MESSAGES_BODY,
    MESSAGES_CTX,
    MESSAGES_HEADERS,
    REQUEST_HEADERS,
    STREAMS,
    FakeUpstream,
    Ticker,
    World,
    _frame_ends,
    _only_row,
    _world,
)

ANSWERED, ATTEMPTS = "x-gateway-answered", "x-gateway-attempts"
EU = SignedRequest(
    authority="bedrock-runtime.eu-west-1.amazonaws.com",
    path="/model/eu.anthropic.claude-opus-5-5/invoke-with-response-stream",
    headers={"authorization": "AWS4-HMAC-SHA256 Credential=AKIDEU/20300101/eu-west-1/bedrock/aws4_request"},
)
VERTEX = SignedRequest(
    authority="aiplatform.googleapis.com",
    path="/v1/projects/acme-claude/locations/global/publishers/anthropic/models/m:streamRawPredict",
    headers={"authorization": "Bearer ya29.vertex"},
)

# A Bedrock-format stream two Bedrock upstreams may serve, each with its own model id.
CHAIN_CTX = dataclasses.replace(
    BEDROCK_CTX,
    chain=(
        ChainUpstream("bedrock-us", "bedrock", "us.anthropic.claude-opus-5-5-v2", regional=True),
        ChainUpstream("bedrock-eu", "bedrock", "eu.anthropic.claude-opus-5-5", regional=True),
    ),
)

CONFIG = """
upstreams:
  bedrock-us: {kind: bedrock, region: us-east-1}
  bedrock-eu: {kind: bedrock, region: eu-west-1}
  vertex-main: {kind: vertex, region: global, project: acme-claude}
policies:
  - name: eng
    groups: [eng]
    models: ["claude-sonnet-*", "claude-opus-5-5*"]
    upstreams: [bedrock-us, vertex-main]
"""
# A Messages request Bedrock or Vertex may serve: its model is in the body.
MESSAGES_CHAIN = dataclasses.replace(
    MESSAGES_CTX, chain=(ChainUpstream("bedrock-us", "bedrock"), ChainUpstream("vertex-main", "vertex"))
)
VERTEX_FIRST = dataclasses.replace(
    MESSAGES_CTX,
    upstream="vertex-main",
    upstream_kind="vertex",
    chain=(ChainUpstream("vertex-main", "vertex"), ChainUpstream("bedrock-us", "bedrock")),
)


def _chain_world(ticker: Ticker | None = None) -> World:
    world = _world()
    world.deps.upstreams = {
        "bedrock-us": world.bedrock,
        "bedrock-eu": FakeUpstream("bedrock-eu", signed=EU),
        "vertex-main": FakeUpstream("vertex-main", kind="vertex", signed=VERTEX),
    }
    world.vertex = world.deps.upstreams["vertex-main"]  # type: ignore[assignment]
    config = loads(CONFIG, {})
    world.deps.policies = {policy.name: policy for policy in config.policies}
    world.deps.models = ModelResolver(config.upstreams)
    world.deps.translate = TranslateOptions(ping_interval=5.0, clock=ticker or Ticker())
    return world


def _signed_anywhere(world: World) -> int:
    return sum(len(up.calls) for up in world.deps.upstreams.values())  # type: ignore[attr-defined]


# --- the exchange -----------------------------------------------------------------------------------


async def test_the_exchange_signs_nothing_and_meters_as_the_answering_upstream() -> None:
    """A chain's request goes on unsigned (each attempt is signed by the attempt filter); the
    answer of the second upstream is relayed, metered, and its row names that upstream, its model
    id and two attempts; the route's headers never reach the client."""
    world = _chain_world()
    exchange = Exchange(world.deps)
    assert await exchange.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX) == CONTINUE
    assert exchange.chained and _signed_anywhere(world) == 0
    headers = {":status": "200", ANSWERED: "bedrock-eu", ATTEMPTS: "2"}
    assert exchange.on_response_headers(200, headers) == Continue(remove_headers=(ANSWERED, ATTEMPTS))
    data = (STREAMS / "bedrock_basic.eventstream").read_bytes()
    for index in range(len(data)):
        assert exchange.on_response_body(data[index : index + 1], False) == CONTINUE
    assert exchange.on_response_body(b"", True) == RECORDED
    exchange.on_close()
    row = _only_row(world)
    assert (row.outcome, row.upstream, row.upstream_model, row.attempts) == (
        "complete",
        "bedrock-eu",
        "eu.anthropic.claude-opus-5-5",
        2,
    )
    assert (row.input_tokens, row.output_tokens) == (25, 12)


async def test_a_lone_upstream_counts_one_attempt_once_sent() -> None:
    """Without a chain a request sent upstream was tried once; one refused before it, never."""
    world = _world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, BEDROCK_CTX)
    await exchange.on_request_body(BODY)
    exchange.on_response_headers(200, {":status": "200"})
    exchange.on_response_body((STREAMS / "bedrock_basic.eventstream").read_bytes(), True)
    refused = Exchange(world.deps)
    await refused.on_request_headers(REQUEST_HEADERS, False, None)
    assert [row.attempts for row in world.rows] == [1]
    unsent = Exchange(world.deps)
    await unsent.on_request_headers(REQUEST_HEADERS, False, BEDROCK_CTX)
    unsent.on_close()
    assert [row.attempts for row in world.rows] == [1, 0]


async def test_the_last_failure_is_answered_in_the_clients_envelope_with_one_row() -> None:
    """When every upstream failed, the last one's error is rewritten as for a lone upstream, and the
    one row names it and counts every attempt."""
    world = _chain_world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX)
    start = exchange.on_response_headers(503, {":status": "503", ANSWERED: "bedrock-eu", ATTEMPTS: "2"})
    assert start == Continue(remove_headers=(ANSWERED, ATTEMPTS), buffer_response_body=True)
    error = b'{"message":"Service unavailable for arn:aws:bedrock:eu-west-1:123456789012:x"}'
    action = exchange.on_response_body(error, True)
    assert isinstance(action, Reply) and action.recorded
    # Bedrock's 503 is the API's 529 overloaded_error, its text (an account) hidden.
    assert action.reply.status == 529 and b"123456789012" not in action.reply.body
    exchange.on_close()
    row = _only_row(world)
    assert (row.outcome, row.upstream, row.attempts, row.status) == ("upstream_error", "bedrock-eu", 2, 529)


async def test_an_answer_naming_no_upstream_of_the_chain_fails_closed() -> None:
    """An answer naming an upstream outside the request's chain (Envoy and the services disagree
    about the configuration) is a 502 and an error row, never metered as some other kind."""
    world = _chain_world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX)
    action = exchange.on_response_headers(200, {":status": "200", ANSWERED: "vertex-main", ATTEMPTS: "1"})
    assert isinstance(action, Reply) and action.reply.status == 502 and action.recorded
    row = _only_row(world)
    assert row.outcome == "error" and "no upstream of the request's chain" in (row.reason or "")


async def test_envoys_own_reply_after_every_attempt_failed_names_the_last_upstream() -> None:
    """A response no upstream sent (it carries no answered header: Envoy's reply once every attempt
    failed without an answer) is the last upstream's failure after every attempt of the chain."""
    world = _chain_world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX)
    start = exchange.on_response_headers(503, {":status": "503", "content-type": "text/plain"})
    assert start == Continue(remove_headers=(ANSWERED, ATTEMPTS), buffer_response_body=True)
    action = exchange.on_response_body(b"upstream connect error or disconnect/reset before headers", True)
    assert isinstance(action, Reply) and json.loads(action.reply.body)["type"] == "error"
    row = _only_row(world)
    assert (row.upstream, row.attempts, row.outcome) == ("bedrock-eu", 2, "upstream_error")


async def test_an_attempt_that_answered_itself_is_relayed_with_its_reason() -> None:
    """When the attempt could not prepare the request, its own answer passes unchanged and the row
    says what it said, naming its upstream."""
    world = _chain_world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX)
    said = AttemptAnswer("bedrock-eu", "error", "upstream preparation: no credential")
    headers = {":status": "502", ANSWERED: "bedrock-eu", ATTEMPTS: "2"}
    action = exchange.on_response_headers(502, headers, said)
    assert action == Continue(remove_headers=(ANSWERED, ATTEMPTS), recorded=True)
    assert exchange.on_response_body(b'{"type":"error"}', True) == CONTINUE
    row = _only_row(world)
    assert (row.status, row.outcome, row.reason, row.upstream, row.attempts) == (
        502,
        "error",
        "upstream preparation: no credential",
        "bedrock-eu",
        2,
    )


async def test_an_attempts_own_answer_without_the_tag_still_names_its_upstream_and_number() -> None:
    """An attempt's own answer that Envoy relays without the cluster's tag is named by what the
    attempt said: its upstream and its number."""
    world = _chain_world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX)
    said = AttemptAnswer("bedrock-eu", "error", "upstream preparation: no credential", attempts=2)
    action = exchange.on_response_headers(502, {":status": "502"}, said)
    assert isinstance(action, Continue) and action.recorded
    row = _only_row(world)
    assert (row.upstream, row.attempts, row.reason) == (
        "bedrock-eu",
        2,
        "upstream preparation: no credential",
    )


async def test_a_chain_cut_before_any_answer_does_not_know_its_attempts() -> None:
    """A chain's exchange closed before any answer cannot tell how many attempts Envoy made: the
    row leaves them unknown (Envoy's access log supplies them)."""
    world = _chain_world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX)
    exchange.on_close()
    row = _only_row(world)
    assert (row.outcome, row.attempts, row.upstream) == ("client_aborted", None, "bedrock-us")


async def _admitted(world: World, ctx: RequestIdentity, body: bytes = MESSAGES_BODY) -> Exchange:
    exchange = Exchange(world.deps)
    assert await exchange.on_request_headers(MESSAGES_HEADERS, False, ctx) == CONTINUE
    assert await exchange.on_request_body(body) == CONTINUE  # admitted, sent on unchanged
    assert _signed_anywhere(world) == 0
    return exchange


async def test_a_messages_answer_from_vertex_is_relayed_and_metered_as_sse() -> None:
    """A Messages request whose Bedrock attempt failed is answered by Vertex: its SSE passes as it
    came, is metered as SSE, and the row names Vertex with Vertex's model id."""
    world = _chain_world()
    exchange = await _admitted(world, MESSAGES_CHAIN)
    start = exchange.on_response_headers(
        200, {":status": "200", "content-type": "text/event-stream", ANSWERED: "vertex-main", ATTEMPTS: "2"}
    )
    assert start == Continue(remove_headers=(ANSWERED, ATTEMPTS))
    data = (STREAMS / "vertex_basic.sse").read_bytes()
    for index in range(len(data)):
        assert exchange.on_response_body(data[index : index + 1], False) == CONTINUE
    assert exchange.on_response_body(b"", True) == RECORDED
    row = _only_row(world)
    assert (row.upstream, row.upstream_model, row.attempts, row.outcome) == (
        "vertex-main",
        "claude-sonnet-4-5@20250929",
        2,
        "complete",
    )
    assert (row.operation, row.input_tokens, row.output_tokens) == ("stream", 25, 12)


async def test_a_messages_answer_from_bedrock_is_translated_to_sse() -> None:
    """The same request with Vertex first, answered by Bedrock: its event stream becomes SSE in
    duplex mode, and the row counts Bedrock's usage under Bedrock's model id."""
    world = _chain_world()
    exchange = await _admitted(world, VERTEX_FIRST)
    start = exchange.on_response_headers(200, {":status": "200", ANSWERED: "bedrock-us", ATTEMPTS: "2"})
    assert isinstance(start, Continue) and start.duplex
    assert ("content-type", "text/event-stream; charset=utf-8") in start.set_headers
    assert {ANSWERED, ATTEMPTS} <= set(start.remove_headers)
    data = (STREAMS / "bedrock_cache_split_padding.eventstream").read_bytes()
    first = exchange.on_response_body(data[: _frame_ends(data)[0]], False)
    assert isinstance(first, Continue) and (first.body or b"").startswith(b"event: message_start\n")
    end = exchange.on_response_body(data[_frame_ends(data)[0] :], True)
    assert isinstance(end, Continue) and end.recorded
    row = _only_row(world)
    assert (row.upstream, row.upstream_model, row.attempts) == (
        "bedrock-us",
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        2,
    )
    assert (row.input_tokens, row.output_tokens, row.cache_read_tokens) == (3, 210, 20000)


async def test_a_messages_model_must_have_an_id_on_every_upstream_of_the_chain() -> None:
    """A model one upstream of the chain cannot name is refused before anything is sent, naming
    the model_map key of that upstream."""
    world = _chain_world()
    config = loads(
        CONFIG.replace(
            "region: us-east-1}",
            "region: us-east-1, model_map: {claude-sonnet-9: anthropic.claude-sonnet-9-v1:0}}",
        ),
        {},
    )
    world.deps.models = ModelResolver(config.upstreams)
    world.deps.policies = {p.name: dataclasses.replace(p, models=("*",)) for p in config.policies}
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(MESSAGES_HEADERS, False, MESSAGES_CHAIN)
    action = await exchange.on_request_body(b'{"model":"claude-sonnet-9","max_tokens":5,"messages":[]}')
    assert isinstance(action, Reply) and action.reply.status == 400
    row = _only_row(world)
    assert row.reason == "unmapped model: upstreams.vertex-main.model_map.claude-sonnet-9"
    assert row.attempts == 0


class _VertexLacksTheNewest(ModelResolver):
    """The catalogue as resolved, but for the newest model, which the Vertex upstream cannot serve."""

    def listed(self, upstream: str) -> list[KnownModel]:
        models = super().listed(upstream)
        return models[1:] if upstream == "vertex-main" else models


async def test_the_models_list_of_a_chain_holds_what_every_upstream_serves() -> None:
    """GET /v1/models lists the policy's models that every upstream of the chain can serve: a model
    the second upstream lacks is left out, as admission would refuse it."""
    world = _chain_world()
    config = loads(CONFIG, {})
    world.deps.models = _VertexLacksTheNewest(config.upstreams)
    world.deps.policies = {p.name: dataclasses.replace(p, models=("claude-*",)) for p in config.policies}
    ctx = dataclasses.replace(MESSAGES_CHAIN, operation="list_models", upstream_query="limit=100")
    action = await Exchange(world.deps).on_request_headers({":method": "GET"}, True, ctx)
    assert isinstance(action, Reply)
    listed = [m["id"] for m in json.loads(action.reply.body)["data"]]
    assert listed == [m.id for m in CATALOGUE[1:]]
    alone = dataclasses.replace(ctx, chain=())
    action = await Exchange(world.deps).on_request_headers({":method": "GET"}, True, alone)
    assert isinstance(action, Reply)
    assert [m["id"] for m in json.loads(action.reply.body)["data"]] == [m.id for m in CATALOGUE]


# --- an attempt -------------------------------------------------------------------------------------


async def test_an_attempt_signs_for_the_upstream_envoy_picked() -> None:
    """The attempt on the chain's second Bedrock upstream waits for the body (SigV4 signs it), then
    builds that upstream's path with its own model id and signs with its credential."""
    world = _chain_world()
    attempt = Attempt(world.deps)
    assert (
        await attempt.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX, "bedrock-eu", True) == Continue()
    )
    action = await attempt.on_request_body(BODY)
    assert isinstance(action, Continue)
    assert (":authority", EU.authority) in action.set_headers
    eu = world.deps.upstreams["bedrock-eu"]
    assert isinstance(eu, FakeUpstream)
    (call,) = eu.calls
    assert call["path"] == "/upstream/stream/eu.anthropic.claude-opus-5-5" and call["body"] == BODY
    assert world.bedrock.calls == [] and not attempt.skips_body


async def test_an_attempt_that_needs_no_body_is_prepared_on_its_headers() -> None:
    """A Vertex attempt (a token signs no bytes) is prepared on the headers and tells Envoy to keep
    the body it would have sent."""
    world = _chain_world()
    ctx = dataclasses.replace(
        CHAIN_CTX,
        client_format="vertex",
        chain=(ChainUpstream("vertex-main", "vertex", "claude-opus-5-5"),),
    )
    attempt = Attempt(world.deps)
    action = await attempt.on_request_headers(REQUEST_HEADERS, False, ctx, "vertex-main", True)
    assert isinstance(action, Continue) and (":authority", VERTEX.authority) in action.set_headers
    assert attempt.skips_body


async def test_a_messages_attempt_is_translated_for_its_upstream() -> None:
    """The attempt on Vertex reads the admitted body, maps its model to Vertex's id and sends
    Vertex's body; on Bedrock, Bedrock's."""
    world = _chain_world()
    attempt = Attempt(world.deps)
    assert (
        await attempt.on_request_headers(MESSAGES_HEADERS, False, MESSAGES_CHAIN, "vertex-main", True)
        == Continue()
    )
    action = await attempt.on_request_body(MESSAGES_BODY)
    assert isinstance(action, Continue) and action.body is not None
    assert json.loads(action.body)["anthropic_version"] == "vertex-2023-10-16"
    (call,) = world.vertex.calls
    assert call["path"] == "/upstream/stream/claude-sonnet-4-5@20250929"
    bedrock = Attempt(world.deps)
    await bedrock.on_request_headers(MESSAGES_HEADERS, False, MESSAGES_CHAIN, "bedrock-us", True)
    sent = await bedrock.on_request_body(MESSAGES_BODY)
    assert isinstance(sent, Continue) and sent.body is not None
    assert json.loads(sent.body)["anthropic_version"] == "bedrock-2023-05-31"


async def test_an_attempt_on_an_upstream_outside_the_chain_answers_itself() -> None:
    """An attempt on an upstream the request's chain does not hold, or without the request's
    identity, signs nothing and answers 502 with an error for the row."""
    world = _chain_world()
    for ctx, upstream in ((CHAIN_CTX, "vertex-main"), (None, "bedrock-eu")):
        action = await Attempt(world.deps).on_request_headers(REQUEST_HEADERS, False, ctx, upstream, True)
        assert isinstance(action, Answer) and action.reply.status == 502 and action.outcome == "error"
    assert _signed_anywhere(world) == 0


async def test_an_attempt_whose_credential_fails_answers_502() -> None:
    """A credential that cannot be obtained for the upstream Envoy picked is the attempt's own 502,
    naming the upstream and why."""
    world = _chain_world()
    world.deps.upstreams = {
        **world.deps.upstreams,
        "bedrock-eu": FakeUpstream("bedrock-eu", sign_error=BackendError("STS said no")),
    }
    attempt = Attempt(world.deps, 2)
    await attempt.on_request_headers(REQUEST_HEADERS, False, CHAIN_CTX, "bedrock-eu", True)
    action = await attempt.on_request_body(BODY)
    assert action == Answer(
        action.reply if isinstance(action, Answer) else None,  # type: ignore[arg-type]
        "bedrock-eu",
        "error",
        "upstream preparation: STS said no",
        2,
    )
    assert isinstance(action, Answer) and action.reply.status == 502
