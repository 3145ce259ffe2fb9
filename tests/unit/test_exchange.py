"""The ext_proc exchange: preparing requests, relaying and metering responses, rewriting upstream
errors, and writing exactly one usage row per request."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest

from authz.billing.pricing import PriceBook
from authz.gateway.exchange import CONTINUE, RECORDED, Continue, Deps, Exchange, Reply
from authz.identity import Caller as Who
from authz.identity import ClientFacts, RequestIdentity
from authz.store.usagerow import UsageRow
from backends.base import Caller, Endpoint, ModelRef, Operation, SignedRequest, Upstream
from backends.emulator.canned import canned_message
from backends.errors import BackendError
from backends.usage import Usage

STREAMS = Path(__file__).parent.parent / "fixtures" / "streams"
T0 = 1_900_000_000.0
ACCOUNT = "123456789012"

SIGNED = SignedRequest(
    authority="bedrock-runtime.us-east-1.amazonaws.com",
    path="/model/us.anthropic.claude-opus-5-5-v2/invoke-with-response-stream",
    headers={
        "x-amz-date": "20300101T000000Z",
        "authorization": "AWS4-HMAC-SHA256 Credential=AKID/20300101/us-east-1/bedrock/aws4_request, ...",
        "x-amz-security-token": "FwoG",
    },
)


class FakeUpstream:
    """An upstream that returns a fixed signature (or raises) and records what it was asked."""

    endpoint = Endpoint.https(SIGNED.authority)

    def __init__(
        self,
        name: str = "bedrock-us",
        *,
        kind: str = "bedrock",
        signed: SignedRequest = SIGNED,
        sign_error: BackendError | None = None,
        path_error: BackendError | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.signed = signed
        self.sign_error = sign_error
        self.path_error = path_error
        self.paths: list[tuple[str, str | None, str]] = []
        self.calls: list[dict[str, object]] = []

    def model_id(self, model: ModelRef) -> str:
        return model.upstream_id

    def path(self, operation: Operation, model_id: str | None, query: str = "") -> str:
        self.paths.append((operation, model_id, query))
        if self.path_error is not None:
            raise self.path_error
        return f"/upstream/{operation}/{model_id}" + (f"?{query}" if query else "")

    async def sign(
        self, *, method: str, path: str, headers: Mapping[str, str], body: bytes, caller: Caller
    ) -> SignedRequest:
        self.calls.append(
            {"method": method, "path": path, "headers": dict(headers), "body": body, "caller": caller}
        )
        if self.sign_error is not None:
            raise self.sign_error
        return self.signed

    async def aclose(self) -> None:
        return None


# Type-checked against the Protocol it stands in for (STYLE.md, habit 7).
_PROTOCOL_CHECK: Upstream = FakeUpstream()


class Clock:
    """A settable clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


BEDROCK_CTX = RequestIdentity(
    request_id="req-1",
    started_at=T0,
    client_format="bedrock",
    operation="stream",
    streaming=True,
    caller=Who(sub="00u-alice", email="alice@example.com", groups=("eng",), session_id="sess-1"),
    client=ClientFacts(
        cc_session_id="cc-1",
        agent_id="agent-7",
        parent_agent_id="agent-1",
        user_agent="claude-cli/2.1.0 (external, cli)",
    ),
    policy="eng",
    upstream="bedrock-us",
    upstream_kind="bedrock",
    requested_model="us.anthropic.claude-opus-5-5",
    model="claude-opus-5-5",
    upstream_model="us.anthropic.claude-opus-5-5-v2",
    regional=True,
    request_bytes=74,
)
VERTEX_CTX = dataclasses.replace(
    BEDROCK_CTX,
    client_format="vertex",
    upstream="vertex-main",
    upstream_kind="vertex",
    requested_model="claude-sonnet-4-5@20250929",
    model="claude-sonnet-4-5-20250929",
    upstream_model="claude-sonnet-4-5@20250929",
    regional=False,
)
BEDROCK_INVOKE_CTX = dataclasses.replace(BEDROCK_CTX, operation="invoke", streaming=False)
COUNT_CTX = dataclasses.replace(
    VERTEX_CTX,
    operation="count_tokens",
    streaming=False,
    model=None,
    requested_model=None,
    upstream_model=None,
)

BEDROCK_PATH = "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream"
REQUEST_HEADERS = {
    ":method": "POST",
    ":path": BEDROCK_PATH,
    ":authority": "gateway.example.com",
    "content-type": "application/json",
    "accept-encoding": "gzip, br",
    "anthropic-beta": "x",
}
BODY = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":64,"messages":[]}'


@dataclasses.dataclass
class World:
    """Deps wired to fakes, plus handles on them."""

    rows: list[UsageRow]
    clock: Clock
    bedrock: FakeUpstream
    vertex: FakeUpstream
    deps: Deps


def _world(**bedrock: object) -> World:
    rows: list[UsageRow] = []
    clock = Clock(T0 + 0.1)
    up = FakeUpstream("bedrock-us", **bedrock)  # type: ignore[arg-type]
    vertex = FakeUpstream("vertex-main", kind="vertex")
    deps = Deps(
        upstreams={"bedrock-us": up, "vertex-main": vertex},
        prices=PriceBook(),
        record=rows.append,
        clock=clock,
    )
    return World(rows, clock, up, vertex, deps)


@pytest.fixture
def world() -> World:
    return _world()


def _only_row(world: World) -> UsageRow:
    assert len(world.rows) == 1, world.rows
    return world.rows[0]


# --- preparing the upstream request ------------------------------------------------------------


async def test_request_without_body_is_signed_on_headers(world: World) -> None:
    """A bodiless request (GET /inference-profiles) is signed at once, over an empty body, on the
    path the gateway builds (the re-serialised query included)."""
    ctx = dataclasses.replace(
        BEDROCK_CTX,
        operation="list_profiles",
        streaming=False,
        model=None,
        requested_model=None,
        upstream_model=None,
        upstream_query="type=SYSTEM_DEFINED",
    )
    exchange = Exchange(world.deps)
    headers = {
        ":method": "GET",
        ":path": "/inference-profiles?type=SYSTEM_DEFINED&evil=1",
        "accept-encoding": "gzip",
    }

    action = await exchange.on_request_headers(headers, True, ctx)

    assert world.bedrock.paths == [("list_profiles", None, "type=SYSTEM_DEFINED")]
    assert world.bedrock.calls == [
        {
            "method": "GET",
            "path": "/upstream/list_profiles/None?type=SYSTEM_DEFINED",
            "headers": {},
            "body": b"",
            "caller": Caller(sub="00u-alice", email="alice@example.com", groups=("eng",)),
        }
    ]
    assert isinstance(action, Continue)
    assert action.set_headers[:2] == ((":authority", SIGNED.authority), (":path", SIGNED.path))
    assert world.rows == []


async def test_request_with_body_is_signed_on_the_body(world: World) -> None:
    """With a body, headers pass untouched and the body's exact bytes are signed; the answer sets
    :authority, :path and the credential headers (sorted) and removes accept-encoding."""
    exchange = Exchange(world.deps)

    assert await exchange.on_request_headers(REQUEST_HEADERS, False, BEDROCK_CTX) == CONTINUE
    assert world.bedrock.calls == []

    action = await exchange.on_request_body(BODY)

    # The path names the model ext_authz resolved, never the client's path segment.
    assert world.bedrock.paths == [("stream", "us.anthropic.claude-opus-5-5-v2", "")]
    (call,) = world.bedrock.calls
    assert call["method"] == "POST"
    assert call["path"] == "/upstream/stream/us.anthropic.claude-opus-5-5-v2"
    assert call["headers"] == {"content-type": "application/json"}
    assert call["body"] == BODY
    assert action == Continue(
        set_headers=(
            (":authority", SIGNED.authority),
            (":path", SIGNED.path),
            ("authorization", SIGNED.headers["authorization"]),
            ("x-amz-date", "20300101T000000Z"),
            ("x-amz-security-token", "FwoG"),
        ),
        remove_headers=("accept-encoding",),
    )
    assert world.rows == []


async def test_vertex_is_prepared_on_headers_without_the_body(world: World) -> None:
    """A bearer token covers no body, so a Vertex request is prepared as soon as its headers arrive."""
    exchange = Exchange(world.deps)
    action = await exchange.on_request_headers(REQUEST_HEADERS, False, VERTEX_CTX)
    assert isinstance(action, Continue) and action.set_headers
    assert world.vertex.paths == [("stream", "claude-sonnet-4-5@20250929", "")]
    assert world.vertex.calls[0]["body"] == b""


async def test_missing_context_fails_closed_without_calling_upstream(world: World) -> None:
    """Without the ext_authz context the request is answered with a 5xx api_error and never signed."""
    exchange = Exchange(world.deps)
    action = await exchange.on_request_headers(REQUEST_HEADERS, False, None)
    assert isinstance(action, Reply)
    assert action.reply.status >= 500
    assert json.loads(action.reply.body)["error"]["type"] == "api_error"
    exchange.on_close()
    assert world.bedrock.paths == [] and world.bedrock.calls == []
    assert world.rows == []


async def test_signing_failure_is_502_and_an_error_row() -> None:
    """A BackendError while signing answers 502 api_error (no upstream detail) and writes one error row."""
    world = _world(sign_error=BackendError(f"AssumeRole failed for arn:aws:iam::{ACCOUNT}:role/gw"))
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, BEDROCK_CTX)
    world.clock.now = T0 + 0.25

    action = await exchange.on_request_body(BODY)

    assert isinstance(action, Reply)
    assert action.reply.status == 502
    assert json.loads(action.reply.body)["error"]["type"] == "api_error"
    assert ACCOUNT not in action.reply.body.decode()
    exchange.on_close()
    row = _only_row(world)
    assert (row.status, row.outcome) == (502, "error")
    assert row.reason is not None and row.reason.startswith("upstream preparation:")
    assert row.latency_ms == 250.0
    assert row.cost_usd == 0


async def test_unsupported_operation_is_a_502_and_an_error_row() -> None:
    """An operation the upstream has no path for is answered 502, unsigned, with one error row."""
    world = _world(path_error=BackendError("Bedrock has no list_models route"))
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, BEDROCK_CTX)
    action = await exchange.on_request_body(BODY)
    exchange.on_close()
    assert isinstance(action, Reply)
    assert action.reply.status == 502
    assert world.bedrock.calls == []
    row = _only_row(world)
    assert (row.status, row.outcome) == (502, "error")


async def test_unknown_upstream_is_a_reply_and_an_error_row(world: World) -> None:
    """A context naming an upstream this process does not have fails closed with a reply and an error row."""
    exchange = Exchange(world.deps)
    ctx = dataclasses.replace(BEDROCK_CTX, upstream="removed-in-reload")
    try:
        action = await exchange.on_request_headers(REQUEST_HEADERS, False, ctx)
    finally:
        exchange.on_close()
    assert isinstance(action, Reply)
    assert action.reply.status >= 500
    assert [row.outcome for row in world.rows] == ["error"]


# --- streaming responses: metered chunk by chunk ----------------------------------------------


def _random_chunks(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    chunks: list[bytes] = []
    start = 0
    while start < len(data):
        size = rng.choice([0, 1, 2, 3, 7, 64, rng.randint(1, 700)])
        chunks.append(data[start : start + size])
        start += size
    return chunks


def _frame_ends(data: bytes) -> list[int]:
    """Offsets just past each event-stream frame (the first 4 bytes of a frame are its length)."""
    ends, offset = [], 0
    while offset < len(data):
        (total,) = struct.unpack_from(">I", data, offset)
        offset += total
        ends.append(offset)
    return ends


CACHE_USAGE = Usage(
    input_tokens=3,
    output_tokens=210,
    cache_creation_input_tokens=1500,
    cache_creation_5m_input_tokens=1000,
    cache_creation_1h_input_tokens=500,
    cache_read_input_tokens=20000,
)
STREAM_CASES = [
    # Opus 5.5 on a regional (us.) profile: (25 * 4 + 12 * 20) / 1e6 * 1.10.
    ("bedrock_basic.eventstream", BEDROCK_CTX, Usage(25, 12), Decimal("0.00037400")),
    # Sonnet 4.5 on global Vertex: 3*3 + 210*15 + 1000*3.75 + 500*6 + 20000*0.30 = 15909 per 1e6.
    (
        "bedrock_cache_split_padding.eventstream",
        dataclasses.replace(
            VERTEX_CTX, client_format="bedrock", upstream="bedrock-us", upstream_kind="bedrock"
        ),
        CACHE_USAGE,
        Decimal("0.01590900"),
    ),
    ("vertex_basic.sse", VERTEX_CTX, Usage(25, 12), Decimal("0.00025500")),
    ("vertex_cache.sse", VERTEX_CTX, CACHE_USAGE, Decimal("0.01590900")),
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("name", "ctx", "usage", "cost"), STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
async def test_streamed_response_writes_exactly_one_complete_row(
    name: str, ctx: RequestIdentity, usage: Usage, cost: Decimal, seed: int
) -> None:
    """A 2xx stream fed in random chunks is relayed unchanged and written as one 'complete' row
    with the exact usage, cost and timings."""
    world = _world()
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, ctx)
    await exchange.on_request_body(BODY)

    world.clock.now = T0 + 0.5
    response = {":status": "200", "content-type": "application/vnd.amazon.eventstream"}
    assert exchange.on_response_headers(200, response) == CONTINUE  # no buffering: the body flows
    for chunk in _random_chunks((STREAMS / name).read_bytes(), seed):
        assert exchange.on_response_body(chunk, False) == CONTINUE  # relayed unchanged
    assert world.rows == []
    world.clock.now = T0 + 2.0
    assert exchange.on_response_body(b"", True) == RECORDED
    exchange.on_close()

    row = _only_row(world)
    assert (row.status, row.outcome, row.reason) == (200, "complete", None)
    assert row.input_tokens == usage.input_tokens
    assert row.output_tokens == usage.output_tokens
    assert row.output_tokens_estimated is False
    assert row.input_tokens_estimated is False
    assert row.cache_write_tokens == usage.cache_creation_input_tokens
    assert row.cache_write_5m_tokens == usage.cache_creation_5m_input_tokens
    assert row.cache_write_1h_tokens == usage.cache_creation_1h_input_tokens
    assert row.cache_read_tokens == usage.cache_read_input_tokens
    assert row.cost_usd == cost
    assert (row.ttfb_ms, row.latency_ms) == (500.0, 2000.0)
    assert (row.request_id, row.user_sub, row.upstream, row.requested_model, row.policy) == (
        "req-1",
        "00u-alice",
        ctx.upstream,
        ctx.requested_model,
        "eng",
    )


async def _streaming(world: World, ctx: RequestIdentity) -> Exchange:
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, ctx)
    await exchange.on_request_body(BODY)
    exchange.on_response_headers(200, {":status": "200"})
    return exchange


async def test_row_names_the_upstream_model_ext_authz_resolved(world: World) -> None:
    """upstream_model is the id ext_authz resolved (model_map's entry, or the parsed id)."""
    for ctx in (BEDROCK_CTX, VERTEX_CTX):
        exchange = await _streaming(world, ctx)
        exchange.on_response_body((STREAMS / "vertex_basic.sse").read_bytes(), True)
    assert [row.upstream_model for row in world.rows] == [
        "us.anthropic.claude-opus-5-5-v2",
        "claude-sonnet-4-5@20250929",
    ]


async def test_meter_closed_mid_stream_writes_client_aborted_with_estimate(world: World) -> None:
    """A stream cut after four text deltas records client_aborted with output estimated from them."""
    data = (STREAMS / "bedrock_basic.eventstream").read_bytes()
    # Frames: message_start, content_block_start, four deltas, then stop/delta/stop; cut after the
    # deltas plus half of the next frame.
    ends = _frame_ends(data)
    cut = ends[5] + (ends[6] - ends[5]) // 2
    meter = await _streaming(world, BEDROCK_CTX)
    for chunk in _random_chunks(data[:cut], 1):
        meter.on_response_body(chunk, False)
    meter.on_close()
    meter.on_close()

    row = _only_row(world)
    assert (row.status, row.outcome) == (200, "client_aborted")
    assert (row.input_tokens, row.output_tokens, row.output_tokens_estimated) == (25, 4, True)
    assert row.input_tokens_estimated is False  # the upstream reported the input
    # Opus 5.5 regional: (25 * 4 + 4 * 20) / 1e6 * 1.10.
    assert row.cost_usd == Decimal("0.00019800")


@pytest.mark.parametrize(
    ("name", "ctx", "reason", "input_tokens", "output_tokens"),
    [
        (
            "bedrock_exception_midstream.eventstream",
            BEDROCK_CTX,
            "in-stream modelStreamErrorException: The model stream was interrupted.",
            40,
            3,
        ),
        ("vertex_error.sse", VERTEX_CTX, "in-stream overloaded_error: Overloaded", 17, 2),
    ],
)
async def test_in_stream_error_writes_upstream_error(
    world: World, name: str, ctx: RequestIdentity, reason: str, input_tokens: int, output_tokens: int
) -> None:
    """An exception frame or SSE error event ends the row as upstream_error, usage so far estimated."""
    meter = await _streaming(world, ctx)
    for chunk in _random_chunks((STREAMS / name).read_bytes(), 3):
        meter.on_response_body(chunk, False)
    meter.on_response_body(b"", True)
    meter.on_close()

    row = _only_row(world)
    assert (row.status, row.outcome, row.reason) == (200, "upstream_error", reason)
    assert (row.input_tokens, row.output_tokens, row.output_tokens_estimated) == (
        input_tokens,
        output_tokens,
        True,
    )


async def test_stream_ending_without_message_stop_is_an_upstream_error(world: World) -> None:
    """A stream that ends cleanly but before message_stop is recorded as upstream_error."""
    data = (STREAMS / "vertex_basic.sse").read_bytes()
    meter = await _streaming(world, VERTEX_CTX)
    meter.on_response_body(data[: data.index(b"event: message_delta")], True)
    row = _only_row(world)
    assert (row.outcome, row.reason) == ("upstream_error", "the response ended before its final event")


def _bad_crc_after_two_deltas(data: bytes) -> tuple[bytes, int]:
    """bedrock_basic with the third delta's message CRC broken, and where that frame starts."""
    ends = _frame_ends(data)
    broken = bytearray(data)
    broken[ends[4] - 1] ^= 0x01
    return bytes(broken), ends[3]


def _bad_sse_event(data: bytes) -> bytes:
    """vertex_basic with an event whose data is not JSON just before message_delta."""
    at = data.index(b"event: message_delta")
    return data[:at] + b"event: message_start\r\ndata: {oops\r\n\r\n" + data[at:]


async def test_malformed_stream_is_an_upstream_error_with_the_tokens_seen(world: World) -> None:
    """A stream with a bad frame or event is recorded as upstream_error naming the malformation,
    with the tokens counted around it (the final message_delta included)."""
    bedrock = (STREAMS / "bedrock_basic.eventstream").read_bytes()
    broken, position = _bad_crc_after_two_deltas(bedrock)
    cases = [
        (BEDROCK_CTX, broken, f"event-stream frame at byte {position} fails its message CRC"),
        (
            VERTEX_CTX,
            _bad_sse_event((STREAMS / "vertex_basic.sse").read_bytes()),
            "SSE message_start event could not be decoded (JSONDecodeError)",
        ),
    ]
    for seed, (ctx, data, malformed) in enumerate(cases):
        meter = await _streaming(world, ctx)
        for chunk in _random_chunks(data, seed):
            meter.on_response_body(chunk, False)
        meter.on_response_body(b"", True)
        meter.on_close()
        row = world.rows[-1]
        assert (row.status, row.outcome, row.reason) == (
            200,
            "upstream_error",
            f"malformed upstream response: {malformed}",
        )
        assert (row.input_tokens, row.output_tokens, row.output_tokens_estimated) == (25, 12, False)
    assert len(world.rows) == 2


async def test_malformed_stream_cut_early_is_an_upstream_error(world: World) -> None:
    """A stream closed after a bad frame is the upstream's failure, not the client's: upstream_error
    with the output estimated from the deltas counted on both sides of the bad frame."""
    data, position = _bad_crc_after_two_deltas((STREAMS / "bedrock_basic.eventstream").read_bytes())
    meter = await _streaming(world, BEDROCK_CTX)
    meter.on_response_body(data[: _frame_ends(data)[5]], False)
    meter.on_close()
    row = _only_row(world)
    assert (row.outcome, row.reason) == (
        "upstream_error",
        f"malformed upstream response: event-stream frame at byte {position} fails its message CRC",
    )
    assert (row.input_tokens, row.output_tokens, row.output_tokens_estimated) == (25, 3, True)


async def test_streaming_error_is_buffered_and_rewritten(world: World) -> None:
    """An error status on a streaming route switches the body to BUFFERED so it can be rewritten."""
    exchange = Exchange(world.deps)
    await exchange.on_request_headers(REQUEST_HEADERS, False, BEDROCK_CTX)
    await exchange.on_request_body(BODY)
    assert exchange.on_response_headers(403, {":status": "403"}) == Continue(buffer_response_body=True)


# --- buffered responses ------------------------------------------------------------------------


async def _signed(world: World, ctx: RequestIdentity) -> Exchange:
    handler = Exchange(world.deps)
    await handler.on_request_headers(REQUEST_HEADERS, False, ctx)
    await handler.on_request_body(BODY)
    return handler


async def test_non_streaming_json_answer_is_buffered_and_counted(world: World) -> None:
    """A 2xx JSON answer is buffered and written as one complete row with the body's usage."""
    handler = await _signed(world, BEDROCK_INVOKE_CTX)
    world.clock.now = T0 + 1.0
    # Non-streaming routes are BUFFERED by configuration: nothing to switch.
    assert (
        handler.on_response_headers(200, {":status": "200", "content-type": "application/json"}) == CONTINUE
    )
    usage = Usage(input_tokens=30, output_tokens=9, cache_read_input_tokens=100)
    body = json.dumps(canned_message(model="claude-opus-5-5", text="hi", usage=usage)).encode()
    world.clock.now = T0 + 1.5

    # The answer that ends the request says its row is written (Envoy's access log skips it).
    assert handler.on_response_body(body, True) == RECORDED
    handler.on_close()

    row = _only_row(world)
    assert (row.status, row.outcome, row.reason) == (200, "complete", None)
    assert (row.input_tokens, row.output_tokens, row.cache_read_tokens) == (30, 9, 100)
    # Opus 5.5 regional: (30 * 4 + 9 * 20 + 100 * 0.20) / 1e6 * 1.10.
    assert row.cost_usd == Decimal("0.00035200")
    assert (row.ttfb_ms, row.latency_ms) == (1000.0, 1500.0)


async def test_count_tokens_costs_nothing(world: World) -> None:
    """A count_tokens answer is recorded as complete at zero cost, the count kept in the reason."""
    handler = await _signed(world, COUNT_CTX)
    handler.on_response_headers(200, {":status": "200"})
    handler.on_response_body(b'{"input_tokens": 1234}', True)
    row = _only_row(world)
    assert (row.outcome, row.cost_usd) == ("complete", Decimal(0))
    assert row.reason == "counted 1234 input tokens"


async def test_non_json_success_body_is_an_upstream_error(world: World) -> None:
    """A 2xx non-streaming answer that is not JSON is recorded as upstream_error, not as complete."""
    handler = await _signed(world, BEDROCK_INVOKE_CTX)
    handler.on_response_headers(200, {":status": "200", "content-type": "application/json"})
    assert handler.on_response_body(b"<html>upstream proxy</html>", True) == RECORDED
    handler.on_close()
    row = _only_row(world)
    assert (row.status, row.outcome, row.reason) == (
        200,
        "upstream_error",
        "malformed upstream response: response body is not JSON (JSONDecodeError)",
    )
    assert (row.input_tokens, row.output_tokens) == (0, 0)


async def test_upstream_403_with_arn_becomes_502_and_an_upstream_error_row(world: World) -> None:
    """An upstream 403 naming an ARN is replaced by a 502 with no account detail; one upstream_error row."""
    handler = await _signed(world, BEDROCK_CTX)
    headers = {":status": "403", "content-type": "application/json"}
    assert handler.on_response_headers(403, headers) == Continue(buffer_response_body=True)
    body = json.dumps(
        {"message": f"User: arn:aws:sts::{ACCOUNT}:assumed-role/gw/alice is not authorized"}
    ).encode()

    action = handler.on_response_body(body, True)
    handler.on_close()

    assert isinstance(action, Reply)
    assert action.reply.status == 502
    assert ACCOUNT not in action.reply.body.decode() and "arn:" not in action.reply.body.decode()
    row = _only_row(world)
    assert (row.status, row.outcome, row.reason) == (502, "upstream_error", "upstream 403")


async def test_recoverable_upstream_400_passes_through_with_a_row(world: World) -> None:
    """Bedrock's 'Input is too long.' reaches the client untouched and is recorded with its 400."""
    handler = await _signed(world, BEDROCK_INVOKE_CTX)
    handler.on_response_headers(400, {":status": "400"})
    assert handler.on_response_body(b'{"message":"Input is too long."}', True) == RECORDED
    row = _only_row(world)
    assert (row.status, row.outcome) == (400, "upstream_error")
    assert row.reason is not None and "Input is too long." in row.reason


# --- aborts and the one-row rule ---------------------------------------------------------------


async def test_close_before_any_response_estimates_the_input_it_sent(world: World) -> None:
    """A client gone before the upstream's first byte leaves one client_aborted 499 row whose input
    is estimated from the body the upstream received (a 400 KB prompt is not free)."""
    handler = await _signed(world, dataclasses.replace(BEDROCK_CTX, request_bytes=400_000))
    world.clock.now = T0 + 3.0
    handler.on_close()
    handler.on_close()
    row = _only_row(world)
    assert (row.status, row.outcome, row.ttfb_ms, row.latency_ms) == (499, "client_aborted", None, 3000.0)
    assert (row.input_tokens, row.input_tokens_estimated, row.output_tokens) == (100_000, True, 0)
    # Opus 5.5 regional: 100000 * 4 / 1e6 * 1.10.
    assert row.cost_usd == Decimal("0.44000000")


async def test_close_before_the_body_arrived_writes_one_499_row(world: World) -> None:
    """Closed after the request headers but before the body (nothing sent upstream): one 499 row
    with nothing estimated, since no upstream saw the prompt."""
    handler = Exchange(world.deps)
    await handler.on_request_headers(REQUEST_HEADERS, False, BEDROCK_CTX)
    handler.on_close()
    assert world.bedrock.calls == []
    assert [(r.status, r.outcome, r.input_tokens) for r in world.rows] == [(499, "client_aborted", 0)]


async def test_never_two_rows_for_one_request(world: World) -> None:
    """A duplicate end and a close after the end leave exactly one row."""
    data = (STREAMS / "bedrock_basic.eventstream").read_bytes()
    exchange = await _streaming(world, BEDROCK_CTX)
    exchange.on_response_body(data, True)
    exchange.on_response_body(data, True)  # a duplicate end is ignored
    exchange.on_close()
    assert [r.outcome for r in world.rows] == ["complete"]

    world.rows.clear()
    sign = await _signed(world, BEDROCK_INVOKE_CTX)
    sign.on_response_headers(200, {":status": "200"})
    sign.on_response_body(b'{"usage":{"input_tokens":1,"output_tokens":1}}', True)
    sign.on_response_body(b'{"usage":{"input_tokens":1,"output_tokens":1}}', True)
    sign.on_close()
    assert [r.outcome for r in world.rows] == ["complete"]
