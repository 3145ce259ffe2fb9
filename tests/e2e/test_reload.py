"""Live reload through the real Envoy, two replicas sharing PostgreSQL (one with two workers, one
with one): a group's models changed in each replica's file take effect on both within 5 seconds,
in every worker, while streams opened before the change all finish; a file that does not load
changes nothing and the log and ``/readyz`` name the field; SIGHUP rereads the file too."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import yaml
from anthropic import AnthropicBedrock

from authz.dev.devstack import Ports, Stack
from authz.dev.ports import consecutive_free_ports
from tests.e2e.conftest import fetch_rows, wait_for
from tests.prometheus_text import scrape, total

pytestmark = pytest.mark.e2e

GROUP = "reloaders"
HAIKU = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "x"}],
}
# Streams that outlast the reload: 16 pieces half a second apart.
SLOW_STREAM = {"deltas": 16, "delay": 0.5}
STREAMS_PER_REPLICA = 3
# Each worker of a replica must have taken the new policy: enough calls for Envoy to reach both.
PROBES = 6


def policy(models: list[str]) -> list[dict[str, Any]]:
    """The one policy of the test replicas."""
    return [
        {"name": "reloaders", "groups": [GROUP], "models": models, "upstreams": ["bedrock-dev", "vertex-dev"]}
    ]


@pytest.fixture(scope="module")
def replicas(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Stack]]:
    """Replica A (two workers, a Prometheus endpoint each) and replica B (one worker), each with
    its own file, sharing PostgreSQL, the signing key and the issuer; the group may use haiku."""
    a = Stack(root=tmp_path_factory.mktemp("reload-a"), database_url=pg_dsn, workers=2)
    a.ports = Ports.pick(a.workers)
    a.extra_config = {
        "policies": policy(["claude-haiku-*"]),
        "telemetry": {"prometheus": {"enabled": True, "port": consecutive_free_ports(a.workers)}},
    }
    root_b = tmp_path_factory.mktemp("reload-b")
    b = Stack(root=root_b, database_url=pg_dsn)
    b.ports = Ports.pick(b.workers)
    try:
        a.start()
        (root_b / "keys").mkdir()
        shutil.copy2(a.root / "keys" / "signing-dev-1.pem", root_b / "keys" / "signing-dev-1.pem")
        b.extra_config = {"policies": policy(["claude-haiku-*"]), "sessions": {"issuer": a.envoy_url}}
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()


def edit(stack: Stack, change: dict[str, Any], *, rename: bool) -> None:
    """Merge ``change`` into the top level of the replica's file: written in place, or as a new file
    renamed over it (an editor's atomic save, a ConfigMap volume's swap)."""
    assert stack.config_path is not None
    raw = yaml.safe_load(stack.config_path.read_text())
    raw.update(change)
    text = yaml.safe_dump(raw, sort_keys=False)
    if rename:
        tmp = stack.config_path.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, stack.config_path)
    else:
        stack.config_path.write_text(text)


def status(stack: Stack, token: str, model: str) -> int:
    """The status of one Bedrock-format call for ``model``."""
    response = httpx.post(
        f"{stack.envoy_url}/model/{model}/invoke",
        headers={"authorization": f"Bearer {token}"},
        json=BODY,
        timeout=30,
    )
    return response.status_code


def allows(stack: Stack, token: str, allowed: str, refused: str) -> bool:
    """Whether every probe (reaching each worker) answers ``allowed`` and refuses ``refused``."""
    return all(
        status(stack, token, allowed) == 200 and status(stack, token, refused) == 400 for _ in range(PROBES)
    )


def readyz(stack: Stack) -> dict[str, Any]:
    """The replica's /readyz report."""
    assert stack.ports is not None
    report: dict[str, Any] = httpx.get(f"http://127.0.0.1:{stack.ports.portal}/readyz", timeout=10).json()
    return report


def gateway_log(stack: Stack) -> str:
    """What the replica's ``authz serve`` has logged."""
    return (stack.root / "logs" / "gateway.log").read_text(errors="replace")


def file_sha256(stack: Stack) -> str:
    """``sha256sum`` of the replica's configuration file."""
    assert stack.config_path is not None
    return hashlib.sha256(stack.config_path.read_bytes()).hexdigest()


def stream_once(stack: Stack, token: str, started: threading.Barrier) -> dict[str, Any]:
    """One slow haiku stream through Envoy; meets the others at ``started`` once its first text
    arrived, then reads it to the end."""
    client = AnthropicBedrock(api_key=token, base_url=stack.envoy_url, aws_region="us-east-1", max_retries=0)
    text = ""
    try:
        with client.messages.stream(
            model=HAIKU, max_tokens=50, messages=[{"role": "user", "content": "hello"}]
        ) as stream:
            for chunk in stream.text_stream:
                if not text:
                    started.wait(timeout=30)
                text += chunk
            final = stream.get_final_message()
            request_id = stream.response.headers.get("x-request-id")
    finally:
        client.close()
    return {
        "text": text,
        "stop_reason": final.stop_reason,
        "request_id": request_id,
        "ended": time.monotonic(),
    }


def test_models_change_under_streaming_load_on_both_replicas(replicas: tuple[Stack, Stack]) -> None:
    """Haiku streams open on both replicas; each file then swaps haiku for sonnet (one written in
    place, one renamed over): within 5 seconds every worker of both replicas refuses haiku and
    serves sonnet, every stream opened before finishes whole with a complete usage row, each worker
    counts the reload, and /readyz reports the file's hash."""
    a, b = replicas
    email = f"reload-{time.monotonic_ns()}@example.com"
    token = a.mint(email=email, groups=(GROUP,))
    for stack in replicas:
        stack.emulator("POST", "/_emulator/state", {"reset": True, **SLOW_STREAM})
        assert allows(stack, token, HAIKU, SONNET)
    started = threading.Barrier(2 * STREAMS_PER_REPLICA + 1)
    with ThreadPoolExecutor(max_workers=2 * STREAMS_PER_REPLICA) as pool:
        streams = [
            pool.submit(stream_once, stack, token, started)
            for stack in replicas
            for _ in range(STREAMS_PER_REPLICA)
        ]
        started.wait(timeout=30)  # every stream is open and has sent text

        edit(a, {"policies": policy(["claude-sonnet-*"])}, rename=False)
        edit(b, {"policies": policy(["claude-sonnet-*"])}, rename=True)
        for stack in replicas:
            wait_for(lambda stack=stack: allows(stack, token, SONNET, HAIKU), timeout=5.0, interval=0.1)
        applied = time.monotonic()
        results = [future.result(timeout=60) for future in streams]

    for result in results:
        assert result["stop_reason"] == "end_turn", result
        assert len(result["text"]) > 0
        # The stream was still open when both replicas had switched: it crossed the reload.
        assert result["ended"] > applied
    rows = wait_for(
        lambda: (
            (
                r := [
                    row
                    for row in fetch_rows(a.database_url, "user_email = $1", email)
                    if row["request_id"] in {x["request_id"] for x in results}
                ]
            )
            and len(r) == len(results)
            and r
        )
    )
    assert {row["outcome"] for row in rows} == {"complete"}
    assert {row["policy"] for row in rows} == {"reloaders"}

    for stack in replicas:
        config = readyz(stack)["config"]
        assert config["sha256"] == file_sha256(stack)
        assert config["last_error"] is None and config["restart_pending"] == []
        assert "configuration reloaded after the file changed" in gateway_log(stack)
        assert "changed policies[0].models" in gateway_log(stack)
    # Replica A's two workers each applied the reload (each serves its own /metrics).
    assert a.config is not None
    port = a.config.telemetry.prometheus.port
    for worker in range(a.workers):
        samples = scrape(f"http://127.0.0.1:{port + worker}/metrics")
        applied_here = total(
            samples,
            "gateway_config_reloads_total",
            lambda labels: labels.get("gateway_config_reload_result") == "applied",
        )
        assert applied_here >= 1, f"worker {worker} counted no applied reload"


def test_broken_file_changes_nothing_and_names_the_field(replicas: tuple[Stack, Stack]) -> None:
    """A file with an unknown key, then one with a bad value: each is refused by both replicas,
    whose log and /readyz name the field, and requests are decided as before; the corrected file
    applies again."""
    token = replicas[0].mint(email=f"reload-{time.monotonic_ns()}@example.com", groups=(GROUP,))
    for stack in replicas:
        stack.emulator("POST", "/_emulator/state", {"reset": True})
        edit(stack, {"policies": policy(["claude-sonnet-*"])}, rename=True)
        wait_for(lambda stack=stack: allows(stack, token, SONNET, HAIKU), timeout=5.0, interval=0.1)
    broken = [
        (
            {"policies": [{**policy(["claude-haiku-*"])[0], "modelz": ["claude-*"]}]},
            "policies[0].modelz: unknown key",
        ),
        (
            {"policies": policy(["claude-haiku-*"]), "spend": {"org_caps": [{"period": "hourly", "usd": 5}]}},
            "spend.org_caps[0].period: must be one of",
        ),
    ]
    for change, field in broken:
        for stack in replicas:
            edit(stack, change, rename=False)
        for stack in replicas:
            wait_for(
                lambda stack=stack, field=field: field in (readyz(stack)["config"]["last_error"] or ""),
                timeout=5.0,
            )
            assert field in gateway_log(stack)
            assert "configuration not reloaded" in gateway_log(stack)
            assert allows(stack, token, SONNET, HAIKU)  # the running policy, not the file's

    for stack in replicas:
        edit(stack, {"policies": policy(["claude-haiku-*"]), "spend": {}}, rename=True)
    for stack in replicas:
        wait_for(lambda stack=stack: allows(stack, token, HAIKU, SONNET), timeout=5.0, interval=0.1)
        assert readyz(stack)["config"]["last_error"] is None


def test_sighup_rereads_the_file(replicas: tuple[Stack, Stack]) -> None:
    """With watching turned off (``reload.watch_interval: 0``, itself applied by the watcher), a
    changed file is applied when ``authz serve`` gets SIGHUP, and the log says SIGHUP did it."""
    token = replicas[0].mint(email=f"reload-{time.monotonic_ns()}@example.com", groups=(GROUP,))
    for stack in replicas:
        stack.emulator("POST", "/_emulator/state", {"reset": True})
        edit(stack, {"policies": policy(["claude-haiku-*"]), "reload": {"watch_interval": 0}}, rename=True)
        wait_for(lambda stack=stack: "reload.watch_interval" in gateway_log(stack), timeout=5.0)
        assert allows(stack, token, HAIKU, SONNET)

    for stack in replicas:
        edit(stack, {"policies": policy(["claude-sonnet-*"])}, rename=False)
        os.kill(stack.procs["gateway"].pid, signal.SIGHUP)
    for stack in replicas:
        wait_for(lambda stack=stack: allows(stack, token, SONNET, HAIKU), timeout=5.0, interval=0.1)
        assert "configuration reloaded on SIGHUP" in gateway_log(stack)
        assert readyz(stack)["config"]["sha256"] == file_sha256(stack)
