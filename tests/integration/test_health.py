"""A real worker (gRPC servers and portal in this process, real PostgreSQL): the gRPC health
protocol, /healthz as liveness only, and /readyz naming what is wrong."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from authz.config import loads
from authz.configtypes import Address, GatewayConfig
from authz.dev.ports import free_port
from authz.ops.health import grpc_serving_async
from authz.service import Worker, start_worker
from authz.signin.tokens import generate_signing_key

pytestmark = pytest.mark.integration

StartWorker = Callable[..., Awaitable[Worker]]

BEDROCK = {
    "kind": "bedrock",
    "region": "us-east-1",
    "base_url": "http://127.0.0.1:9",
    "credentials": {"source": "static", "access_key_id": "AKIDEXAMPLE", "secret_access_key": "x" * 40},
}


def _config(dsn: str, spool: Path, **upstreams: dict[str, Any]) -> GatewayConfig:
    raw = {
        "listen": {"grpc": {"port": 0}, "portal": {"port": free_port()}},
        "sessions": {"signing_key": {"kid": "k1", "private_key": generate_signing_key("k1").private_key}},
        "store": {"url": dsn, "spool_dir": str(spool)},
        "upstreams": upstreams,
        "policies": [{"name": "all", "email_domains": ["example.com"], "upstreams": list(upstreams)}],
    }
    return loads(yaml.safe_dump(raw), {})


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartWorker]:
    """Start workers for a config; stop them (without the drain wait) afterwards."""
    workers: list[Worker] = []

    async def go(config: GatewayConfig) -> Worker:
        worker = await start_worker(config, 0)
        workers.append(worker)
        return worker

    yield go
    for worker in workers:
        if not worker.stopped.is_set():
            await worker.stop(drain=0, grace=0)


async def _get(worker: Worker, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{worker.config.listen.portal.port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def test_ready_worker_serves_health_and_readyz(
    clean_db: str, tmp_path: Path, start: StartWorker
) -> None:
    """A worker with PostgreSQL up and a usable credential answers SERVING and /readyz 200 with
    every check passing; once draining it answers NOT_SERVING and /readyz 503 while /healthz stays 200."""
    worker = await start(_config(clean_db, tmp_path / "spool", bedrock=BEDROCK))
    assert await grpc_serving_async("127.0.0.1", worker.grpc_port, timeout=5)
    status, body = await _get(worker, "/readyz")
    assert status == 200, body
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"postgresql", "revocation_feed", "signing_key", "upstream:bedrock"}
    assert all(c["ok"] for c in body["checks"].values())

    await worker.health.drain()
    assert not await grpc_serving_async("127.0.0.1", worker.grpc_port, timeout=5)
    assert (await _get(worker, "/healthz"))[0] == 200
    status, body = await _get(worker, "/readyz")
    assert (status, body["status"]) == (503, "draining")


async def test_readyz_names_the_broken_parts(clean_db: str, tmp_path: Path, start: StartWorker) -> None:
    """An unobtainable upstream credential and an unreachable PostgreSQL each fail their own
    /readyz check with the reason, while the gRPC health stays SERVING (Envoy keeps using it)."""
    missing = tmp_path / "no-such-key.json"
    vertex = {
        "kind": "vertex",
        "region": "us-east5",
        "project": "acme-project",
        "base_url": "http://127.0.0.1:9",
        "credentials": {"source": "service_account_file", "path": str(missing)},
    }
    config = _config(clean_db, tmp_path / "spool", bedrock=BEDROCK, vertex=vertex)
    worker = await start(config)
    status, body = await _get(worker, "/readyz")
    assert status == 503 and body["status"] == "not_ready"
    assert body["checks"]["upstream:bedrock"]["ok"] is True
    assert body["checks"]["upstream:vertex"]["ok"] is False
    assert str(missing) in body["checks"]["upstream:vertex"]["detail"]

    down = dataclasses.replace(
        config,
        store=dataclasses.replace(
            config.store, url=f"postgresql://nobody@127.0.0.1:{free_port()}/x", connect_timeout=1
        ),
        listen=dataclasses.replace(config.listen, portal=Address(port=free_port())),
        upstreams=tuple((n, u) for n, u in config.upstreams if n == "bedrock"),
    )
    worker = await start(down)
    assert await grpc_serving_async("127.0.0.1", worker.grpc_port, timeout=5)
    status, body = await _get(worker, "/readyz")
    assert status == 503
    assert body["checks"]["postgresql"]["ok"] is False
    assert body["checks"]["revocation_feed"]["ok"] is False
    assert (await _get(worker, "/healthz"))[0] == 200
