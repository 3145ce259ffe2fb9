"""The client telemetry relay through the real portal app: the gateway token judged as ext_authz
judges it, the verified sender stamped on what reaches a real OTLP receiver (HTTP and gRPC), and
always a 200 to the client, with every drop counted."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import grpc
import httpx
import pytest
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
)

from authz.config import loads
from authz.configtypes import GatewayConfig
from authz.signin.portal import PortalDeps, build_portal
from authz.signin.revocation import RevocationSet
from authz.signin.tokens import KeySet, TokenVerifier, generate_signing_key, mint
from authz.store.db import connect_pool
from authz.telemetry.relay import Relay
from authz.telemetry.runtime import Telemetry
from tests.otlp_receiver import OtlpReceiver, attributes, grpc_collector, kv

pytestmark = pytest.mark.integration

ISSUER = "https://gateway.test"


class CountingTelemetry(Telemetry):
    """Telemetry that remembers what the relay counted."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def relayed(self, signal: str, result: str) -> None:
        self.counts[signal, result] = self.counts.get((signal, result), 0) + 1


def _config(endpoint: str, protocol: str = "http/protobuf", max_body: int = 65536) -> GatewayConfig:
    return loads(
        f"sessions: {{issuer: '{ISSUER}'}}\n"
        f"telemetry: {{otlp: {{endpoint: '{endpoint}', protocol: {protocol}, headers: {{X-Tenant: acme}}}},"
        f" relay: {{max_body_bytes: {max_body}}}}}",
        {},
    )


class Gateway:
    """A portal app on port 0 with a relay, and tokens for it."""

    def __init__(self, config: GatewayConfig, pg_dsn: str) -> None:
        config = replace(config, sessions=replace(config.sessions, signing_key=generate_signing_key("k1")))
        self.config = config
        self.keyset = KeySet.from_config(config.sessions)
        self.revocations = RevocationSet()
        self.telemetry = CountingTelemetry()
        self.relay = Relay(config.telemetry, self.telemetry)
        self._dsn = pg_dsn
        self._server: TestServer | None = None

    async def __aenter__(self) -> Gateway:
        await self.relay.start()
        pool = await connect_pool(self._dsn, min_size=0, max_size=1, timeout=5)
        verifier = TokenVerifier(self.keyset, issuer=ISSUER, audience="claude-gateway", clock_skew=30)
        app = build_portal(
            PortalDeps(
                config=self.config,
                pool=pool,
                keyset=self.keyset,
                oidc=None,
                verifier=verifier,
                is_revoked=self.revocations.blocks,
                relay=self.relay,
            )
        )
        self._pool = pool
        self._server = TestServer(app)
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.close()
        await self.relay.aclose()
        await self._pool.close()

    def token(self, sid: str = "sid-1", email: str = "alice@example.com") -> str:
        return mint(
            self.keyset,
            issuer=ISSUER,
            audience="claude-gateway",
            sub=f"sub-{email}",
            email=email,
            groups=("developers", "platform"),
            sid=sid,
            ttl=600,
            now=time.time(),
        )

    async def post(self, signal: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        assert self._server is not None
        async with httpx.AsyncClient() as client:
            return await client.post(
                str(self._server.make_url(f"/v1/{signal}")), content=body, headers=headers
            )


def _logs(**resource: str) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    logs = request.resource_logs.add()
    logs.resource.attributes.extend(kv(k, v) for k, v in resource.items())
    logs.scope_logs.add().log_records.add().body.string_value = "claude_code.api_request"
    return request


PROTOBUF = {"content-type": "application/x-protobuf"}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
async def gateway(receiver: OtlpReceiver, pg_dsn: str) -> AsyncIterator[Gateway]:
    async with Gateway(_config(receiver.url), pg_dsn) as g:
        yield g


async def test_a_signed_in_clients_logs_reach_the_collector_with_the_verified_user(
    gateway: Gateway, receiver: OtlpReceiver
) -> None:
    """Protobuf logs with a valid token are forwarded; enduser.id is the token's user, not the client's."""
    body = _logs(**{"service.name": "claude-code", "enduser.id": "mallory@example.com"}).SerializeToString()
    headers = {**PROTOBUF, "authorization": f"Bearer {gateway.token()}"}
    response = await gateway.post("logs", body, headers)
    assert (response.status_code, response.headers["content-type"], response.content) == (
        200,
        "application/x-protobuf",
        b"",
    )
    await gateway.relay.drain()
    (resource,) = receiver.resources("/v1/logs")
    assert resource == {
        "service.name": "claude-code",
        "enduser.id": "alice@example.com",
        "gateway.user.groups": ["developers", "platform"],
        "gateway.session.id": "sid-1",
        "gateway.name": "claude-gateway",
    }
    assert gateway.telemetry.counts == {("logs", "forwarded"): 1}


async def test_gzip_json_metrics_with_an_api_key_header_are_forwarded(
    gateway: Gateway, receiver: OtlpReceiver
) -> None:
    """Claude Code's other shapes: OTLP/JSON, gzipped, the token in x-api-key; the answer is JSON {}."""
    body = {
        "resourceMetrics": [
            {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "cc"}}]}}
        ]
    }
    headers = {
        "content-type": "application/json",
        "content-encoding": "gzip",
        "x-api-key": gateway.token(sid="sid-json"),
    }
    response = await gateway.post("metrics", gzip.compress(json.dumps(body).encode()), headers)
    assert (response.status_code, response.json()) == (200, {})
    await gateway.relay.drain()
    (resource,) = receiver.resources("/v1/metrics")
    assert resource["gateway.session.id"] == "sid-json"
    assert resource["service.name"] == "cc"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no token"),
        ({"authorization": "Bearer not-a-token"}, "bad token"),
        ({"authorization": "Basic abc"}, "another scheme"),
    ],
)
async def test_requests_without_a_valid_token_get_200_and_are_dropped(
    gateway: Gateway, receiver: OtlpReceiver, headers: dict[str, str], reason: str
) -> None:
    """No valid token: still 200 (Claude Code logs errors on anything else), nothing forwarded, counted."""
    response = await gateway.post("traces", b"", {**PROTOBUF, **headers})
    assert response.status_code == 200, reason
    await gateway.relay.drain()
    assert receiver.of("/v1/traces") == []
    assert gateway.telemetry.counts == {("traces", "unauthenticated"): 1}


async def test_a_revoked_session_is_dropped(gateway: Gateway, receiver: OtlpReceiver) -> None:
    """A token whose session is in the revocation set is refused like ext_authz refuses it."""
    token = gateway.token(sid="sid-revoked")
    gateway.revocations.add("sid-revoked")
    response = await gateway.post(
        "logs", _logs().SerializeToString(), {**PROTOBUF, "authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    await gateway.relay.drain()
    assert receiver.of("/v1/logs") == []
    assert gateway.telemetry.counts == {("logs", "unauthenticated"): 1}


async def test_oversized_and_malformed_bodies_are_dropped_and_counted(
    gateway: Gateway, receiver: OtlpReceiver
) -> None:
    """Past relay.max_body_bytes, or not an export request: 200, nothing forwarded, each counted by reason."""
    auth = {"authorization": f"Bearer {gateway.token()}"}
    assert (await gateway.post("logs", b"\0" * 70_000, {**PROTOBUF, **auth})).status_code == 200
    assert (await gateway.post("logs", b"\xff\xff", {**PROTOBUF, **auth})).status_code == 200
    # A few kilobytes of gzip that would inflate to a megabyte: bounded by the inflated size.
    bomb = {**PROTOBUF, **auth, "content-encoding": "gzip"}
    assert (await gateway.post("logs", gzip.compress(b"\0" * 1_000_000), bomb)).status_code == 200
    await gateway.relay.drain()
    assert receiver.of("/v1/logs") == []
    assert gateway.telemetry.counts == {("logs", "too_large"): 2, ("logs", "malformed"): 1}


async def test_without_an_endpoint_everything_is_answered_and_dropped(pg_dsn: str) -> None:
    """No telemetry.otlp.endpoint: 200 and counted as no_endpoint."""
    async with Gateway(loads(f"sessions: {{issuer: '{ISSUER}'}}", {}), pg_dsn) as gateway:
        headers = {**PROTOBUF, "authorization": f"Bearer {gateway.token()}"}
        response = await gateway.post("metrics", b"", headers)
        assert response.status_code == 200
        assert gateway.telemetry.counts == {("metrics", "no_endpoint"): 1}


async def test_grpc_collectors_receive_the_stamped_request(pg_dsn: str) -> None:
    """With protocol grpc the relay calls the collector's LogsService/Export with the stamped request
    and the configured headers as metadata."""
    received: list[tuple[Any, dict[str, str]]] = []
    server = grpc.aio.server()
    port = grpc_collector(server, "logs", received)
    await server.start()
    try:
        async with Gateway(_config(f"http://127.0.0.1:{port}", "grpc"), pg_dsn) as gateway:
            headers = {**PROTOBUF, "authorization": f"Bearer {gateway.token()}"}
            assert (await gateway.post("logs", _logs().SerializeToString(), headers)).status_code == 200
            await asyncio.wait_for(gateway.relay.drain(), 10)
            assert gateway.telemetry.counts == {("logs", "forwarded"): 1}
    finally:
        await server.stop(None)
    ((request, metadata),) = received
    assert attributes(request.resource_logs[0].resource.attributes)["enduser.id"] == "alice@example.com"
    assert metadata["x-tenant"] == "acme"
