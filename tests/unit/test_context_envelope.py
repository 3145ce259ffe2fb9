"""The ext_authz-to-ext_proc request context (dynamic metadata) and the Anthropic error envelope."""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from google.protobuf import struct_pb2

from authz._generated.claude_gateway.v1 import context_pb2
from authz.gateway.context import CONTEXT_KEY, RESERVATION_KEY, from_metadata, to_metadata
from authz.identity import Caller, ChainUpstream, ClientFacts, RequestIdentity, Reservation
from authz.translate.envelope import STATUS_FOR_TYPE, ErrorReply, error_body, error_reply

CTX = RequestIdentity(
    request_id="req-1",
    started_at=1_900_000_000.25,
    client_format="bedrock",
    operation="stream",
    streaming=True,
    caller=Caller(
        sub="00u-alice", email="alice@example.com", groups=("eng", "platform"), session_id="sess-1"
    ),
    client=ClientFacts(
        cc_session_id="cc-1",
        agent_id="agent-7",
        parent_agent_id=None,
        user_agent="claude-cli/2.1.0 (external, cli)",
    ),
    policy="eng",
    upstream="bedrock-us",
    upstream_kind="bedrock",
    requested_model="arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5",
    model="claude-opus-5-5",
    upstream_model="arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-5-5",
    regional=True,
    upstream_query="",
    request_bytes=61_440,
)

LIST_PROFILES = dataclasses.replace(
    CTX,
    operation="list_profiles",
    streaming=False,
    requested_model=None,
    model=None,
    upstream_model=None,
    policy=None,
    upstream_kind=None,
    caller=Caller(sub="00u-alice", email="alice@example.com", groups=(), session_id=None),
    client=ClientFacts(),
    upstream_query="type=SYSTEM_DEFINED",
    request_bytes=0,
)


# A service token's model patterns travel too: a Messages request's model is checked by ext_proc.
SERVICE = dataclasses.replace(
    CTX,
    client_format="messages",
    caller=Caller(sub="service:ci", email="", groups=("ci",), session_id="svc:1", models=("claude-haiku-*",)),
)
NO_MODELS = dataclasses.replace(
    SERVICE, caller=Caller(sub="service:ci", email="", groups=("ci",), session_id="svc:1", models=())
)


# A failover chain: each upstream with its own model id and pricing; a Messages one names none.
CHAIN = dataclasses.replace(
    CTX,
    chain=(
        ChainUpstream("bedrock-us", "bedrock", CTX.upstream_model, regional=True),
        ChainUpstream("bedrock-eu", "bedrock", "eu.anthropic.claude-opus-5-5", regional=True),
        ChainUpstream("vertex-global", "vertex"),
    ),
)


# --- the request identity as metadata -------------------------------------------------------


@pytest.mark.parametrize(
    "ctx",
    [CTX, LIST_PROFILES, SERVICE, NO_MODELS, CHAIN],
    ids=["full", "sparse", "service-token", "no-models", "chain"],
)
def test_context_round_trips_through_metadata(ctx: RequestIdentity) -> None:
    """to_metadata then from_metadata gives back an equal identity, None fields and tuples included."""
    back = from_metadata(to_metadata(ctx))
    assert back == ctx
    assert back is not None and back.caller is not None and isinstance(back.caller.groups, tuple)


def test_context_round_trips_through_a_protobuf_struct() -> None:
    """The metadata survives Envoy's Struct the way the gRPC edge reads it (string_value per field)."""
    struct = struct_pb2.Struct()
    struct.update(to_metadata(CTX))
    fields = {k: v.string_value for k, v in struct.fields.items()}
    assert from_metadata(fields) == CTX


def test_metadata_is_one_field() -> None:
    """The identity travels as one string field (Envoy copies it into every ext_proc message)."""
    metadata = to_metadata(CTX)
    assert set(metadata) == {CONTEXT_KEY}
    assert isinstance(metadata[CONTEXT_KEY], str)


def test_a_spend_reservation_travels_as_a_second_field() -> None:
    """A reservation (estimate and lease ids) rides in its own field and comes back equal, through
    Envoy's Struct too; without one, nothing more travels."""
    reserved = replace(CTX, reservation=Reservation(Decimal("0.81250000"), ("a1b2", "c3d4")))
    metadata = to_metadata(reserved)
    assert set(metadata) == {CONTEXT_KEY, RESERVATION_KEY}
    assert metadata[RESERVATION_KEY] == "0.81250000 a1b2 c3d4"
    struct = struct_pb2.Struct()
    struct.update(metadata)
    assert from_metadata({k: v.string_value for k, v in struct.fields.items()}) == reserved
    unleased = replace(CTX, reservation=Reservation(Decimal("0.5")))
    assert from_metadata(to_metadata(unleased)) == unleased


@pytest.mark.parametrize("value", ["", "abc lease", "-1 lease", "NaN x"])
def test_a_garbled_reservation_is_dropped(value: str) -> None:
    """A reservation field that is not a finite non-negative amount is ignored (the identity stands)."""
    fields = {**to_metadata(CTX), RESERVATION_KEY: value}
    assert from_metadata(fields) == CTX


def _encoded(message: context_pb2.RequestContext) -> dict[str, str]:
    return {CONTEXT_KEY: base64.b64encode(message.SerializeToString()).decode()}


def _without(name: str) -> dict[str, str]:
    message = context_pb2.RequestContext()
    message.ParseFromString(base64.b64decode(to_metadata(CTX)[CONTEXT_KEY]))
    message.ClearField(name)
    return _encoded(message)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"email": "alice@example.com"},
        {CONTEXT_KEY: None},
        {CONTEXT_KEY: 42},
        {CONTEXT_KEY: ""},
        {CONTEXT_KEY: "not base64!"},
        {CONTEXT_KEY: base64.b64encode(b"\xff\xff\xff").decode()},
        {CONTEXT_KEY: '{"request_id": "r"}'},
        _encoded(context_pb2.RequestContext()),
        _without("upstream"),
        _without("request_id"),
        _without("sub"),
    ],
    ids=[
        "absent",
        "only-flat-fields",
        "none",
        "number",
        "empty",
        "bad-base64",
        "bad-protobuf",
        "json",
        "empty-message",
        "missing-upstream",
        "missing-request-id",
        "missing-caller",
    ],
)
def test_garbage_metadata_gives_none(fields: dict[str, Any]) -> None:
    """Absent, unreadable or incomplete metadata yields None (the caller fails closed), never raises."""
    assert from_metadata(fields) is None


def test_a_context_without_email_round_trips() -> None:
    """A service identity has no email: its identity still travels (email reads back empty)."""
    assert CTX.caller is not None
    service = replace(
        CTX, caller=replace(CTX.caller, email="", sub="service:ci-nightly", session_id="svc:tok-1")
    )
    assert from_metadata(to_metadata(service)) == service


def test_context_fields_match_the_proto() -> None:
    """The identity's dataclasses and protos/claude_gateway/v1/context.proto name the same fields."""
    proto_fields = {f.name for f in context_pb2.RequestContext.DESCRIPTOR.fields}
    # A spend reservation travels as a metadata field of its own (authz.gateway.context.RESERVATION_KEY).
    flat = {f.name for f in dataclasses.fields(RequestIdentity)} - {"caller", "client", "reservation"}
    flat |= {f.name for f in dataclasses.fields(ClientFacts)}
    flat |= {f.name for f in dataclasses.fields(Caller)}
    assert proto_fields == flat
    chain_fields = {f.name for f in context_pb2.ChainUpstream.DESCRIPTOR.fields}
    assert chain_fields == {f.name for f in dataclasses.fields(ChainUpstream)} - {"kind"} | {"upstream_kind"}


def test_answered_by_takes_the_chain_upstreams_fields() -> None:
    """The identity answered by a chain's second upstream carries that upstream's kind, model id and
    pricing; an upstream outside the chain gives None."""
    second = CHAIN.answered_by("vertex-global")
    assert second is not None
    assert (second.upstream, second.upstream_kind, second.upstream_model, second.regional) == (
        "vertex-global",
        "vertex",
        None,
        False,
    )
    assert second.chain == CHAIN.chain
    assert CHAIN.answered_by("bedrock-eu") == replace(
        CHAIN, upstream="bedrock-eu", upstream_model="eu.anthropic.claude-opus-5-5"
    )
    assert CHAIN.answered_by("anthropic-dev") is None


# --- the Anthropic error envelope -------------------------------------------------------------


def test_error_body_is_the_compact_anthropic_envelope() -> None:
    """error_body writes exactly {"type":"error","error":{"type":...,"message":...}}, compact."""
    assert (
        error_body("permission_error", "no")
        == b'{"type":"error","error":{"type":"permission_error","message":"no"}}'
    )


def test_error_body_escapes_the_message() -> None:
    """Quotes, newlines and non-ASCII in a message survive as valid JSON."""
    message = 'model "x"\nnot allowed \u2014 ask #help'
    assert json.loads(error_body("invalid_request_error", message))["error"]["message"] == message


@pytest.mark.parametrize(("error_type", "status"), sorted(STATUS_FOR_TYPE.items()))
def test_each_error_type_travels_with_its_status(error_type: str, status: int) -> None:
    """Each Anthropic error type gets its documented HTTP status and a JSON content type."""
    reply = error_reply(error_type, "m")
    assert reply == ErrorReply(status, (("content-type", "application/json"),), error_body(error_type, "m"))


def test_documented_statuses() -> None:
    """The table matches DESIGN.md: 401/403/400/404/413/429/429/500/529."""
    assert STATUS_FOR_TYPE == {
        "invalid_request_error": 400,
        "authentication_error": 401,
        "permission_error": 403,
        "not_found_error": 404,
        "request_too_large": 413,
        "rate_limit_error": 429,
        "billing_error": 429,
        "api_error": 500,
        "overloaded_error": 529,
    }


def test_explicit_status_and_unknown_type() -> None:
    """An explicit status wins over the table; an unknown type defaults to 500."""
    assert error_reply("api_error", "m", status=502).status == 502
    assert error_reply("teapot_error", "m").status == 500


@pytest.mark.parametrize(
    ("should_retry", "header"),
    [(False, [("x-should-retry", "false")]), (True, [("x-should-retry", "true")]), (None, [])],
)
def test_should_retry_header(should_retry: bool | None, header: list[tuple[str, str]]) -> None:
    """should_retry adds x-should-retry true/false; left unset, no header is sent."""
    reply = error_reply("authentication_error", "m", should_retry=should_retry)
    assert list(reply.headers) == [("content-type", "application/json"), *header]


def test_extra_headers_follow_the_standard_ones() -> None:
    """headers (a spend refusal's unified headers) come after content-type, x-should-retry and
    retry-after, in the order given."""
    extra = (("anthropic-ratelimit-unified-status", "rejected"), ("anthropic-ratelimit-unified-reset", "9"))
    reply = error_reply("billing_error", "cap", should_retry=False, retry_after=5, headers=extra)
    assert reply.headers[3:] == extra and reply.status == 429


def test_retry_after_is_an_integer_header() -> None:
    """retry_after becomes an integer retry-after header, after x-should-retry."""
    reply = error_reply("billing_error", "cap", should_retry=False, retry_after=30)
    assert reply.headers == (
        ("content-type", "application/json"),
        ("x-should-retry", "false"),
        ("retry-after", "30"),
    )
