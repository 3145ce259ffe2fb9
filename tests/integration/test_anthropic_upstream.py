"""The ``anthropic`` kind against the emulator's Anthropic API over real HTTP: the upstream built
from config, a request prepared by the pass-through translator and signed by the upstream, sent
with httpx the way Envoy would, and the answer metered by the gateway's own meters."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.config import loads
from authz.gateway.authorize import headers_to_strip
from authz.identity import Caller as Who
from authz.identity import RequestIdentity
from authz.translate.passthrough import PassThrough
from backends.anthropic import AnthropicUpstream
from backends.base import Caller, Upstream
from backends.emulator import TEST_ANTHROPIC_API_KEY, EmulatorState, start_emulator
from backends.kinds import KINDS
from backends.sse import SseMeter
from backends.usage import Usage

pytestmark = pytest.mark.integration

ALICE = Caller(sub="00u-alice", email="alice@example.com", groups=("developers",))
GATEWAY_TOKEN = "eyJhbGciOiJFUzI1NiJ9.gateway-access-token.sig"
MODEL = "claude-opus-5-5"
USAGE = Usage(
    input_tokens=21,
    output_tokens=57,
    cache_creation_input_tokens=9,
    cache_creation_5m_input_tokens=4,
    cache_creation_1h_input_tokens=5,
    cache_read_input_tokens=13,
)
# What a client sends: its gateway token (both ways Claude Code sends it) and its own headers.
CLIENT_HEADERS = {
    ":method": "POST",
    "content-type": "application/json",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "interleaved-thinking-2025-05-14",
    "authorization": f"Bearer {GATEWAY_TOKEN}",
    "x-api-key": GATEWAY_TOKEN,
    "user-agent": "claude-cli/2.1.0 (external, cli)",
}


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[str, EmulatorState]]:
    """The emulator in-process with key checks on, serving USAGE in 6 text deltas."""
    state = EmulatorState(usage=USAGE, deltas=6)
    runner, url = await start_emulator(state=state)
    try:
        yield url, state
    finally:
        await runner.cleanup()


def build(url: str, tmp_path: Path, key: str = TEST_ANTHROPIC_API_KEY) -> Upstream:
    """The upstream exactly as the services build it: YAML with the key in a file, then the kind table."""
    (tmp_path / "anthropic.key").write_text(key + "\n", encoding="utf-8")
    text = f"""
upstreams:
  first-party:
    kind: anthropic
    base_url: {url}
    credentials: {{api_key: "${{file:anthropic.key}}"}}
"""
    section = loads(text, {}, base_dir=tmp_path).upstream("first-party")
    return KINDS[section.kind].build("first-party", section.settings)


def identity(operation: str, *, streaming: bool = False, query: str = "") -> RequestIdentity:
    """What ext_authz would hand ext_proc for a request to the anthropic upstream (no client format
    is routed to this kind, so the pair is put together here)."""
    return RequestIdentity(
        request_id="req-1",
        started_at=0.0,
        client_format="messages",
        operation=operation,
        streaming=streaming,
        caller=Who(sub=ALICE.sub, email=ALICE.email, groups=ALICE.groups, session_id="s1"),
        upstream="first-party",
        upstream_kind="anthropic",
        requested_model=MODEL,
        model=MODEL,
        upstream_model=MODEL,
        upstream_query=query,
    )


async def send(
    upstream: Upstream, translator: PassThrough, body: bytes, method: str = "POST"
) -> tuple[httpx.Response, bytes]:
    """Prepare, sign and send one request the way ext_authz, ext_proc and Envoy would; the upstream's
    response and its raw body bytes.

    ext_authz removes the client's credentials (headers_to_strip), the translator says the path and
    what else to remove, and the signed headers are set last, overwriting.
    """
    headers = {**CLIENT_HEADERS, ":method": method}
    request = translator.request(headers, body)
    signed = await upstream.sign(
        method=method,
        path=request.path,
        headers={"content-type": headers["content-type"]},
        body=body,
        caller=ALICE,
    )
    removed = set(headers_to_strip(headers)) | set(request.remove_headers)
    sent = {k: v for k, v in headers.items() if not k.startswith(":") and k not in removed}
    sent.update(request.set_headers)
    sent.update(signed.headers)
    sent["host"] = signed.authority
    scheme = upstream.endpoint.scheme
    async with httpx.AsyncClient() as client:
        response = await client.request(
            method, f"{scheme}://{signed.authority}{signed.path}", headers=sent, content=body or None
        )
        return response, response.content


def splits(raw: bytes, seed: int) -> Iterator[bytes]:
    """``raw`` in random pieces of 1 to 9 bytes."""
    rng = random.Random(seed)
    i = 0
    while i < len(raw):
        n = rng.randint(1, 9)
        yield raw[i : i + n]
        i += n


def messages_body(**extra: Any) -> bytes:
    return json.dumps(
        {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


async def test_streamed_message_is_signed_and_metered_exactly(
    emulator: tuple[str, EmulatorState], tmp_path: Path
) -> None:
    """A streamed Messages request reaches the emulator with the configured key and no client
    credential; the kind's SSE meter, fed the answer in any chunking, counts what the emulator served."""
    url, state = emulator
    upstream = build(url, tmp_path)
    assert isinstance(upstream, AnthropicUpstream)
    meter = KINDS["anthropic"].meter(True)
    assert isinstance(meter, SseMeter)
    translator = PassThrough(identity("stream", streaming=True), upstream, meter)
    response, raw = await send(upstream, translator, messages_body(stream=True))
    assert response.status_code == 200, raw
    assert response.headers["content-type"].startswith("text/event-stream")

    record = state.requests[-1]
    assert (record.route, record.raw_path, record.verdict) == ("anthropic.messages", "/v1/messages", "ok")
    assert record.headers["x-api-key"] == TEST_ANTHROPIC_API_KEY
    assert "authorization" not in record.headers
    assert GATEWAY_TOKEN not in json.dumps(record.headers)
    assert record.headers["anthropic-beta"] == CLIENT_HEADERS["anthropic-beta"]
    assert record.usage == USAGE

    for chunk in splits(raw, seed=1):
        assert translator.response_chunk(chunk, end=False) is None  # relayed unchanged
    assert translator.response_chunk(b"", end=True) is None
    counted = translator.usage()
    assert counted.complete and counted.malformed is None and counted.error_type is None
    assert counted.usage == USAGE

    one_byte = PassThrough(identity("stream", streaming=True), upstream, KINDS["anthropic"].meter(True))
    for i in range(len(raw)):
        one_byte.response_chunk(raw[i : i + 1], end=False)
    assert one_byte.usage().usage == USAGE and one_byte.usage().complete


async def test_whole_message_is_metered_as_json(emulator: tuple[str, EmulatorState], tmp_path: Path) -> None:
    """A non-streaming Messages answer goes through the kind's JSON meter to the same usage."""
    url, state = emulator
    upstream = build(url, tmp_path)
    translator = PassThrough(identity("invoke"), upstream, KINDS["anthropic"].meter(False))
    response, raw = await send(upstream, translator, messages_body())
    assert response.status_code == 200, raw
    translator.response_chunk(raw, end=True)
    assert translator.usage().complete
    assert translator.usage().usage == state.requests[-1].usage == USAGE


async def test_count_tokens_and_models_list(emulator: tuple[str, EmulatorState], tmp_path: Path) -> None:
    """count_tokens and the models list reach their API paths with the key (the list keeps its query)."""
    url, state = emulator
    upstream = build(url, tmp_path)
    count = PassThrough(identity("count_tokens"), upstream, KINDS["anthropic"].meter(False))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    response, raw = await send(upstream, count, body)
    assert response.status_code == 200, raw
    assert json.loads(raw) == {"input_tokens": USAGE.total_input_tokens}

    listing = PassThrough(identity("list_models", query="limit=2"), upstream, KINDS["anthropic"].meter(False))
    response, raw = await send(upstream, listing, b"", method="GET")
    assert response.status_code == 200, raw
    assert len(json.loads(raw)["data"]) == 2
    assert [r.raw_path for r in state.requests] == ["/v1/messages/count_tokens", "/v1/models?limit=2"]
    assert {r.verdict for r in state.requests} == {"ok"}


async def test_a_wrong_key_is_refused_and_hidden_from_the_client(
    emulator: tuple[str, EmulatorState], tmp_path: Path
) -> None:
    """With a key the API does not hold the upstream answers 401, and the translator turns that into
    the gateway's generic 502 (the client did nothing wrong) without the upstream's text."""
    url, state = emulator
    upstream = build(url, tmp_path, key="sk-ant-revoked-key-0000")
    translator = PassThrough(identity("stream", streaming=True), upstream, KINDS["anthropic"].meter(True))
    response, raw = await send(upstream, translator, messages_body(stream=True))
    assert response.status_code == 401
    assert json.loads(raw)["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
    assert state.requests[-1].verdict == "authentication_error: invalid x-api-key"

    assert translator.response_headers(401, dict(response.headers)).buffer is True
    mapped = translator.error(401, raw, dict(response.headers))
    assert mapped.reply is not None and mapped.reply.status == 502
    assert json.loads(mapped.reply.body)["error"]["type"] == "api_error"
    assert b"x-api-key" not in mapped.reply.body
    assert mapped.summary == "upstream 401 authentication_error"


async def test_prompt_too_long_reaches_the_client_verbatim(
    emulator: tuple[str, EmulatorState], tmp_path: Path
) -> None:
    """The API's 'prompt is too long' 400, which clients recover on, is passed through unchanged."""
    url, state = emulator
    state.apply_patch({"scenario": "too_long"})
    upstream = build(url, tmp_path)
    translator = PassThrough(identity("invoke"), upstream, KINDS["anthropic"].meter(False))
    response, raw = await send(upstream, translator, messages_body())
    assert response.status_code == 400
    mapped = translator.error(400, raw, dict(response.headers))
    assert mapped.reply is None
    assert "prompt is too long" in mapped.summary
