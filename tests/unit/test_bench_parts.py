"""The benchmark's parts that need no process: canned bodies, arms, the load generator's reader."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from botocore.eventstream import EventStreamBuffer

from authz.config import load
from authz.dev.devstack import Ports, Stack
from authz.envoy.failover import servable
from backends.eventstream import EventStreamMeter
from backends.jsonbody import JsonMeter
from backends.messages import BEDROCK_METRICS_KEY
from backends.sse import SseMeter
from backends.usage import Meter
from tests.bench import stack_overlay
from tests.bench_arms import (
    SCENARIOS,
    VARIANTS,
    merge,
    request_headers,
    request_path,
    select_scenarios,
    select_variants,
)
from tests.bench_load import ProtocolError, read_response
from tests.bench_report import scenario_checks, versus_check
from tests.bench_upstream import (
    CANNED_USAGE,
    STREAM_DELTAS,
    bedrock_stream_body,
    canned_bootstrap,
    message_body,
    upstream_operations,
    vertex_stream_body,
)


def _feed(meter: Meter, body: bytes, size: int) -> Meter:
    for start in range(0, len(body), size):
        meter.feed(body[start : start + size])
    return meter


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20])
def test_bedrock_stream_meters_to_the_canned_usage(size: int) -> None:
    """The canned event-stream body, fed in chunks of any size, meters to the canned counts, complete."""
    result = _feed(EventStreamMeter(), bedrock_stream_body(), size).result()
    assert result.usage == CANNED_USAGE
    assert result.complete and result.error_type is None
    assert result.estimated_output_tokens == STREAM_DELTAS


def test_bedrock_stream_is_framed_as_bedrock_frames_it() -> None:
    """Every frame passes botocore's CRC checks as a chunk event; message_stop carries the metrics."""
    parser = EventStreamBuffer()
    parser.add_data(bedrock_stream_body())
    kinds = []
    for message in parser:
        assert message.headers == {
            ":event-type": "chunk",
            ":content-type": "application/json",
            ":message-type": "event",
        }
        payload = json.loads(message.payload)
        assert set(payload) == {"bytes", "p"}  # Bedrock's padding field is there
        event = json.loads(base64.b64decode(payload["bytes"]))
        kinds.append(event["type"])
        if event["type"] == "message_stop":
            metrics = event[BEDROCK_METRICS_KEY]
            assert metrics["inputTokenCount"] == CANNED_USAGE.input_tokens
            assert metrics["outputTokenCount"] == CANNED_USAGE.output_tokens
        else:
            assert BEDROCK_METRICS_KEY not in event
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * STREAM_DELTAS,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_vertex_stream_meters_to_the_canned_usage(size: int) -> None:
    """The canned SSE body, fed in chunks of any size, meters to the canned counts, complete."""
    result = _feed(SseMeter(), vertex_stream_body(), size).result()
    assert result.usage == CANNED_USAGE
    assert result.complete and result.error_type is None
    assert result.estimated_output_tokens == STREAM_DELTAS


def test_message_body_meters_to_the_canned_usage() -> None:
    """The canned invoke / rawPredict answer meters to the canned counts with the JSON meter."""
    result = _feed(JsonMeter(), message_body(), 100).result()
    assert result.usage == CANNED_USAGE
    assert result.complete and result.error_type is None


def test_canned_routes_carry_each_body_and_content_type() -> None:
    """Each direct_response route holds its answer's bytes and content type, under the raised cap."""
    answers = upstream_operations()
    route_config = canned_bootstrap(1, 2)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]["route_config"]
    # Envoy refuses direct response bodies over this cap (default 4096 bytes).
    assert route_config["max_direct_response_body_size_bytes"] >= max(len(a.body) for a in answers)
    assert max(len(a.body) for a in answers) > 4096
    routes = {r["name"]: r for r in route_config["virtual_hosts"][0]["routes"]}
    for answer in answers:
        route = routes[answer.key]
        assert base64.b64decode(route["direct_response"]["body"]["inline_bytes"]) == answer.body
        headers = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
        assert headers["content-type"] == answer.content_type
    assert {a.key: a.content_type for a in answers} == {
        "bedrock_invoke": "application/json",
        "bedrock_stream": "application/vnd.amazon.eventstream",
        "vertex_raw": "application/json",
        "vertex_stream": "text/event-stream",
    }


def test_every_scenario_ends_on_a_canned_answer_and_has_its_body() -> None:
    """Each scenario names an existing canned answer; the 60 KB ones carry about 60 KB, the others little."""
    answers = {a.key: a for a in upstream_operations()}
    for scenario in SCENARIOS:
        assert scenario.upstream_op in answers
        assert answers[scenario.upstream_op].streaming == scenario.streaming
        size = len(scenario.body())
        assert (size > 55_000) if scenario.body_bytes else (size < 1_000), scenario.key


def test_scenario_and_variant_selection() -> None:
    """--only takes keys and globs in table order and rejects unknown names; --variants likewise."""
    assert [s.key for s in select_scenarios("vertex_stream,bedrock_invoke")] == [
        "bedrock_invoke",
        "vertex_stream",
    ]
    assert {s.key for s in select_scenarios("bedrock_*")} == {
        "bedrock_invoke",
        "bedrock_invoke_60k",
        "bedrock_stream",
        "bedrock_stream_60k",
    }
    assert len(select_scenarios(None)) == len(SCENARIOS)
    with pytest.raises(ValueError, match="no scenario matches nope"):
        select_scenarios("bedrock_invoke,nope")
    assert [v.key for v in select_variants("gateway")] == ["gateway"]
    with pytest.raises(ValueError, match="unknown gateway variant"):
        select_variants("gateway,nope")


def test_the_spend_caps_variant_runs_beside_the_plain_gateway() -> None:
    """Selecting the caps variant brings the plain gateway along, so its added p50 is measured in the
    same run, where its p50 may exceed the plain gateway's by 0.3 ms at most."""
    assert [v.key for v in select_variants("gateway_caps")] == ["gateway", "gateway_caps"]
    assert [v.key for v in select_variants("gateway_caps,gateway")] == ["gateway", "gateway_caps"]
    caps = select_variants("gateway_caps")[1]
    assert (caps.versus, caps.max_added_p50_ms) == ("gateway", 0.3)
    by_arm = {"gateway": {"p50_ms": 2.0}, "gateway_caps": {"p50_ms": 2.25}}
    check = versus_check("bedrock_invoke", "gateway_caps", "gateway", by_arm, 0.3)
    assert check.met and check.value == "+0.25 ms"
    assert not versus_check(
        "x", "gateway_caps", "gateway", {**by_arm, "gateway_caps": {"p50_ms": 2.4}}, 0.3
    ).met


def test_the_failover_variant_turns_chains_on_beside_the_plain_gateway(tmp_path: Path) -> None:
    """The bench's stacks run without failover (every request has one upstream, today's path); the
    failover variant, measured beside the plain gateway, makes the Messages policies' two upstreams
    a chain while Bedrock and Vertex requests keep one upstream."""
    assert [v.key for v in select_variants("gateway_failover")] == ["gateway", "gateway_failover"]
    ports = Ports(envoy=41001, admin=41002, grpc=41003, portal=41004, emulator=41005, idp=41006)
    stack = Stack(root=tmp_path, database_url="postgresql://unused", ports=ports)
    base = stack_overlay("http://127.0.0.1:1", stack)
    variant = merge(base, VARIANTS["gateway_failover"].overlay)
    assert base["failover"] == {"max_attempts": 1} and variant["failover"] == {"max_attempts": None}
    for overlay, chained in ((base, False), (variant, True)):
        stack.extra_config = overlay
        config = load(stack.write_config(), {})
        developers = config.policy_for("dev@example.com", ("developers",))
        assert developers is not None
        assert len(servable(config, developers, "messages")) == (2 if chained else 1)
        assert servable(config, developers, "bedrock") == ("bedrock-dev",)


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_read_response_frames_length_and_chunked_bodies() -> None:
    """The load generator reads Content-Length and chunked answers (with trailers) to their last byte."""
    two = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\nT: 1\r\n\r\n"
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    reader = _reader(two)
    assert await read_response(reader) == (200, 5, False)
    assert await read_response(reader) == (200, 5, False)
    assert await read_response(reader) == (503, 0, True)


async def test_read_response_rejects_what_is_not_http() -> None:
    """A reply that is not HTTP/1.x is a protocol error, not a silent success."""
    with pytest.raises(ProtocolError):
        await read_response(_reader(b"SSH-2.0-OpenSSH\r\n\r\n"))


def test_messages_scenarios_reach_the_canned_answers_through_translation() -> None:
    """Messages arms speak the Messages API to the gateway while Envoy alone asks the canned answer's
    own path; a relative target compares a translating arm with the pass-through arm it reaches."""
    by_key = {s.key: s for s in SCENARIOS}
    for key in ("messages_bedrock_invoke", "messages_bedrock_stream_60k", "messages_vertex_stream"):
        scenario = by_key[key]
        assert scenario.client_format == "messages" and not scenario.passthrough
        assert request_path(scenario, baseline=False) == "/v1/messages?beta=true"
        body = json.loads(scenario.body())
        assert body["model"] == "claude-sonnet-4-5" and body.get("stream", False) == scenario.streaming
        baseline = request_path(scenario, baseline=True)
        answer = next(a for a in upstream_operations() if a.key == scenario.upstream_op)
        assert baseline.startswith(answer.path_prefix) and baseline.endswith(answer.path_suffix)
    assert by_key["messages_vertex_stream"].group is not None
    headers = request_headers(by_key["messages_bedrock_stream"], token="t", session="s")
    assert headers["anthropic-version"] == "2023-06-01" and "anthropic-beta" in headers

    invoke = by_key["messages_bedrock_invoke"]
    figures = {"rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
    alone = {**figures, "rps": 1000.0}
    reference = ({**figures, "rps": 120.0}, alone)
    [share] = [
        c for c in scenario_checks(invoke, "gateway", figures, alone, reference) if "vs bedrock" in c.what
    ]
    assert (share.value, share.met) == ("83%", False)
    [share] = [
        c
        for c in scenario_checks(invoke, "gateway", figures, alone, ({**figures, "rps": 105.0}, alone))
        if "vs bedrock" in c.what
    ]
    assert share.met
