"""A real worker (gRPC servers in this process, real PostgreSQL) reloaded while a request is in
flight: the ext_proc stream opened before the reload finishes, and writes its usage row, under the
configuration it started with, while requests decided after it get the new policy and prices."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from google.rpc import code_pb2

from authz.config import loads
from authz.configtypes import GatewayConfig
from authz.dev.ports import free_port
from authz.gateway.context import METADATA_NAMESPACE
from authz.service import Worker, start_worker
from authz.signin.tokens import KeySet, generate_signing_key, mint
from authz.store.db import connect
from backends.emulator.canned import canned_message
from backends.usage import Usage

pytestmark = pytest.mark.integration

HAIKU = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
BODY = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
KEY = generate_signing_key("k1")


def raw_config(dsn: str, spool: Path, *, models: list[str], usd_per_million: float) -> dict[str, Any]:
    price = dict.fromkeys(
        ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"), usd_per_million
    )
    return {
        "listen": {"grpc": {"port": 0}, "portal": {"port": free_port()}},
        "sessions": {"signing_key": {"kid": "k1", "private_key": KEY.private_key}},
        "store": {"url": dsn, "spool_dir": str(spool)},
        "upstreams": {
            "bedrock": {
                "kind": "bedrock",
                "region": "us-east-1",
                "base_url": "http://127.0.0.1:9",
                "credentials": {
                    "source": "static",
                    "access_key_id": "AKIDEXAMPLE",
                    "secret_access_key": "x" * 40,
                },
            }
        },
        "policies": [{"name": "eng", "groups": ["eng"], "models": models, "upstreams": ["bedrock"]}],
        "pricing": {"models": {"claude-haiku-4-5": price}, "regional_premium": 0},
    }


def config(dsn: str, spool: Path, **kw: Any) -> GatewayConfig:
    return loads(yaml.safe_dump(raw_config(dsn, spool, **kw)), {})


@pytest.fixture
async def worker(clean_db: str, tmp_path: Path) -> AsyncIterator[Worker]:
    started = await start_worker(
        config(clean_db, tmp_path / "spool", models=["claude-haiku-*"], usd_per_million=1.0)
    )
    try:
        yield started
    finally:
        await started.stop(drain=0, grace=0)


def token(worker: Worker) -> str:
    sessions = worker.config.sessions
    keyset = KeySet.from_config(sessions)
    return mint(
        keyset,
        issuer=sessions.issuer,
        audience=sessions.audience,
        sub="ada",
        email="ada@example.com",
        groups=("eng",),
        sid="s-1",
        ttl=600,
        now=time.time(),
    )


async def check(
    channel: grpc.aio.Channel, bearer: str, model: str, request_id: str
) -> external_auth_pb2.CheckResponse:
    """Envoy's ext_authz call for a Bedrock-format invoke of ``model``."""
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path=f"/model/{model}/invoke",
        headers={
            "authorization": f"Bearer {bearer}",
            "content-length": str(len(BODY)),
            "content-type": "application/json",
            "x-request-id": request_id,
        },
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    response: external_auth_pb2.CheckResponse = await stub.Check(request)
    return response


async def wait_rows(dsn: str, request_id: str) -> list[dict[str, Any]]:
    """The usage rows of ``request_id`` once the ledger has written them (10 seconds at most)."""
    conn = await connect(dsn, timeout=10)
    try:
        for _ in range(200):
            rows = await conn.fetch("SELECT * FROM usage_events WHERE request_id = $1", request_id)
            if rows:
                return [dict(r) for r in rows]
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError(f"no usage row for {request_id}")


def _headers(**values: str) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in values.items()
            ]
        )
    )


async def test_a_stream_opened_before_a_reload_finishes_under_its_configuration(
    worker: Worker, clean_db: str, tmp_path: Path
) -> None:
    """Haiku allowed at 1 USD per million tokens; a request's ext_proc stream is opened and its
    body signed; the worker is reloaded (haiku refused, 10 USD per million); the stream then gets
    its answer: its row is complete, under policy eng, at the old price, while a new Check for haiku
    is refused and one for sonnet allowed."""
    bearer = token(worker)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.grpc_port}") as channel:
        allowed = await check(channel, bearer, HAIKU, "req-before")
        assert allowed.status.code == code_pb2.OK
        identity = allowed.dynamic_metadata

        process = external_processor_pb2_grpc.ExternalProcessorStub(channel).Process()
        await process.write(
            ep.ProcessingRequest(
                request_headers=_headers(
                    **{
                        ":method": "POST",
                        ":path": f"/model/{HAIKU}/invoke",
                        "content_type": "application/json",
                    }
                ),
                metadata_context=base_pb2.Metadata(filter_metadata={METADATA_NAMESPACE: identity}),
                protocol_config=ep.ProtocolConfiguration(
                    request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED
                ),
            )
        )
        assert (await process.read()).HasField("request_headers")
        await process.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=BODY, end_of_stream=True)))
        signed = await process.read()
        assert signed.HasField("request_body")

        reloaded = config(clean_db, tmp_path / "spool", models=["claude-sonnet-*"], usd_per_million=10.0)
        worker.apply(dataclasses.replace(reloaded, store=worker.config.store))

        refused = await check(channel, bearer, HAIKU, "req-after")
        assert refused.status.code == code_pb2.PERMISSION_DENIED
        assert refused.denied_response.status.code == 400
        assert (await check(channel, bearer, SONNET, "req-sonnet")).status.code == code_pb2.OK

        answer = canned_message(
            model="claude-haiku-4-5", text="hi", usage=Usage(input_tokens=1000, output_tokens=2000)
        )
        await process.write(
            ep.ProcessingRequest(
                response_headers=_headers(**{":status": "200", "content_type": "application/json"})
            )
        )
        await process.read()
        await process.write(
            ep.ProcessingRequest(
                response_body=ep.HttpBody(body=json.dumps(answer).encode(), end_of_stream=True)
            )
        )
        await process.read()
        await process.done_writing()

    rows = await wait_rows(clean_db, "req-before")
    (row,) = rows
    assert row["outcome"] == "complete" and row["policy"] == "eng"
    # 3000 tokens at 1 USD per million: the price in force when the stream opened, not 10.
    assert row["cost_usd"] == Decimal("0.003")
    denied = await wait_rows(clean_db, "req-after")
    assert denied[0]["outcome"] == "denied" and "not allowed" in denied[0]["reason"]
