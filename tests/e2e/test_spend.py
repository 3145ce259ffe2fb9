"""Spend caps and rate limits through the real Envoy, two replicas sharing one PostgreSQL: about ten
answers then the exact 429 in Bedrock and Vertex formats, no overshoot under 200 concurrent
requests, a shared group budget, standing headers (and the upstream's own stripped), `authz spend
show` and `GET /api/oauth/usage` agreeing with the rows, caps changed at run time, rate limits."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import asyncpg
import httpx
import pytest
from anthropic import AnthropicBedrock

from authz.billing.periods import period_end, period_start
from authz.dev.devstack import DEFAULT_PROJECT, Ports, Stack
from authz.store.queries import insert_rows
from authz.store.usagerow import UsageRow
from tests.e2e.conftest import fetch_rows, wait_for

pytestmark = pytest.mark.e2e

U = "anthropic-ratelimit-unified-"
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
SONNET_VERTEX = "claude-sonnet-4-5@20250929"
INVOKE = f"/model/{SONNET}/invoke"
VERTEX_MODELS = f"/v1/projects/{DEFAULT_PROJECT}/locations/us-east5/publishers/anthropic/models"
VERTEX_RAW = f"{VERTEX_MODELS}/{SONNET_VERTEX}:rawPredict"
OUTPUT = 20_000
# Every answer of the emulators: 20,000 output tokens, so a request costs about $0.33 on Sonnet 4.5
# through a regional profile (+10%), and its estimate (max_tokens 20,000) about as much.
USAGE = {"output_tokens": OUTPUT}
BEDROCK_BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": OUTPUT,
    "messages": [{"role": "user", "content": "hi"}],
}
VERTEX_BODY = {**BEDROCK_BODY, "anthropic_version": "vertex-2023-10-16"}
CAP = Decimal("3.35")  # ten answers ($3.30) fit, and ten estimates ($3.30), not eleven
ROOMY = Decimal("10")
POOL = Decimal("0.70")  # two answers of the group's members together
UPSTREAM_LIMITS = {
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-unified-status": "allowed",
    "anthropic-ratelimit-unified-reset": "1",
}


def spend_config() -> dict[str, Any]:
    upstreams = ["bedrock-dev", "vertex-dev"]
    return {
        "policies": [
            {
                "name": "capped",
                "groups": ["capped"],
                "upstreams": upstreams,
                "spend_caps": [{"period": "daily", "usd": str(CAP)}],
            },
            {
                "name": "roomy",
                "groups": ["roomy"],
                "upstreams": upstreams,
                "spend_caps": [{"period": "daily", "usd": str(ROOMY)}],
            },
            {
                "name": "rpm",
                "groups": ["rpm"],
                "upstreams": upstreams,
                "rate_limits": {"requests_per_minute": 3},
            },
            {
                "name": "tpm",
                "groups": ["tpm"],
                "upstreams": upstreams,
                "rate_limits": {"tokens_per_minute": 30_000},
            },
            {"name": "developers", "groups": ["developers", "pooled"], "upstreams": upstreams},
        ],
        "spend": {
            "group_budgets": [{"group": "pooled", "period": "daily", "usd": str(POOL)}],
            "increase_url": "https://it.example.com/claude-budget",
            "sync_interval": 0.2,
            "lease_ttl": 5,
        },
    }


@pytest.fixture(scope="module")
def replicas(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Stack]]:
    """Two gateways (services, Envoy and an emulator each) sharing one PostgreSQL, signing key and
    issuer, with the caps above; every emulator answers with ``USAGE`` and ``UPSTREAM_LIMITS``."""
    a = Stack(root=tmp_path_factory.mktemp("spend-a"), database_url=pg_dsn)
    a.ports = Ports.pick(a.workers)
    a.extra_config = spend_config()
    b_root = tmp_path_factory.mktemp("spend-b")
    started: list[Stack] = []
    try:
        a.start()
        started.append(a)
        (b_root / "keys").mkdir()
        shutil.copy2(a.root / "keys" / "signing-dev-1.pem", b_root / "keys" / "signing-dev-1.pem")
        b = Stack(root=b_root, database_url=pg_dsn)
        b.ports = Ports.pick(b.workers)
        b.extra_config = {**spend_config(), "sessions": {"issuer": a.envoy_url}}
        b.start()
        started.append(b)
        for stack in (a, b):
            stack.emulator("POST", "/_emulator/state", {"usage": USAGE, "response_headers": UPSTREAM_LIMITS})
        yield a, b
    finally:
        for stack in started:
            stack.stop()


def user(tag: str) -> str:
    return f"{tag}-{time.monotonic_ns()}@example.com"


def bedrock(stack: Stack, token: str, body: dict[str, Any] = BEDROCK_BODY) -> httpx.Response:
    return httpx.post(
        f"{stack.envoy_url}{INVOKE}", headers={"authorization": f"Bearer {token}"}, json=body, timeout=30
    )


def vertex_call(stack: Stack, token: str) -> httpx.Response:
    return httpx.post(
        f"{stack.envoy_url}{VERTEX_RAW}",
        headers={"authorization": f"Bearer {token}"},
        json=VERTEX_BODY,
        timeout=30,
    )


def messages_call(stack: Stack, token: str) -> httpx.Response:
    """Claude Code's native format (``POST /v1/messages``), served by the policy's first upstream."""
    body = {"model": "claude-sonnet-4-5-20250929", "max_tokens": OUTPUT, "messages": BEDROCK_BODY["messages"]}
    return httpx.post(
        f"{stack.envoy_url}/v1/messages?beta=true",
        headers={"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"},
        json=body,
        timeout=30,
    )


def written(dsn: str, email: str, n: int) -> list[dict[str, Any]]:
    """Wait until ``email`` has ``n`` answered rows; all of its rows."""
    wait_for(lambda: len(fetch_rows(dsn, "user_email = $1 AND status = 200", email)) >= n, timeout=20)
    return fetch_rows(dsn, "user_email = $1", email)


def day_spend(rows: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))


def authz_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    assert stack.config_path is not None
    return subprocess.run(
        [sys.executable, "-m", "authz.cli", *args, "--config", str(stack.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def usage(stack: Stack, token: str) -> httpx.Response:
    return httpx.get(
        f"{stack.envoy_url}/api/oauth/usage", headers={"authorization": f"Bearer {token}"}, timeout=10
    )


def assert_cap_refusal(response: httpx.Response, *, period: str = "daily", pool: bool = False) -> None:
    """The exact 429 of a spent cap: envelope, retry-after to the reset, the unified headers."""
    assert response.status_code == 429, response.text
    assert response.json()["type"] == "error"
    error = response.json()["error"]
    assert error["type"] == "billing_error"
    reset = period_end(period, datetime.now(UTC))  # type: ignore[arg-type]
    assert reset.strftime("%Y-%m-%d %H:%M UTC") in error["message"]
    assert "https://it.example.com/claude-budget" in error["message"]
    headers = response.headers
    assert headers["x-should-retry"] == "false"
    assert 0 < int(headers["retry-after"]) <= int(reset.timestamp() - time.time()) + 1
    unified = {k: v for k, v in headers.items() if k.startswith(U)}
    expected = {
        f"{U}status": "rejected",
        f"{U}reset": str(int(reset.timestamp())),
        f"{U}overage-reset": str(int(reset.timestamp())),
        f"{U}overage-utilization": "1",
        f"{U}overage-surpassed-threshold": "1",
        f"{U}overage-period": period,
        f"{U}overage-disabled-reason": "out_of_credits",
    }
    if pool:
        expected[f"{U}overage-scope"] = "group_pool"
    assert unified == expected
    assert not [k for k in headers if k.startswith("anthropic-ratelimit-") and not k.startswith(U)]


def test_ten_answers_then_the_exact_refusal_in_every_format(replicas: tuple[Stack, Stack]) -> None:
    """A user capped at $3.35 gets ten $0.33 answers across both replicas (the last through the
    Messages API), then the 429 billing_error shape from either replica in Bedrock, Vertex and
    Messages formats (the SDK sees a RateLimitError it is
    told not to retry); the denied rows name the cap; `authz spend show` and /api/oauth/usage agree
    with the sum of the rows to the cent."""
    a, b = replicas
    email = user("capped")
    token = a.mint(email, groups=("capped",))
    answered = 0
    for i in range(10):
        stack = a if i % 2 == 0 else b
        # The Messages body names the model; its estimate is priced at that model, as the others.
        response = messages_call(stack, token) if i == 9 else bedrock(stack, token)
        assert response.status_code == 200, response.text
        answered += 1
        # Each answer is written (and its reservation settled) before the next request.
        written(a.database_url, email, answered)
    reached = [len(stack.emulator("GET", "/_emulator/requests")) for stack in (a, b)]
    for stack in (a, b):
        assert_cap_refusal(bedrock(stack, token))
        assert_cap_refusal(vertex_call(stack, token))
        assert_cap_refusal(messages_call(stack, token))
    client = AnthropicBedrock(api_key=token, base_url=a.envoy_url, aws_region="us-east-1", max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=SONNET, max_tokens=OUTPUT, messages=[{"role": "user", "content": "hi"}])
    client.close()
    assert caught.value.response.headers["x-should-retry"] == "false"
    # Refused before any upstream.
    assert [len(stack.emulator("GET", "/_emulator/requests")) for stack in (a, b)] == reached

    rows = wait_for(lambda: len(r := fetch_rows(a.database_url, "user_email = $1", email)) == 17 and r)
    denied = [r for r in rows if r["outcome"] == "denied"]
    assert len(denied) == 7 and {r["reason"] for r in denied} == {"spend_cap: user daily 3.35 USD"}
    spent = day_spend(rows)
    assert spent <= CAP
    print(f"\nten answers: spent ${spent} of a ${CAP} cap")

    shown = authz_cli(a, "spend", "show", "--user", email.upper(), "--groups", "capped", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert Decimal(report["spent"]["daily"]["usd"]) == spent
    (cap,) = report["caps"]
    assert (cap["scope"], cap["period"], Decimal(cap["usd"])) == ("user", "daily", CAP)
    assert Decimal(cap["remaining"]) == CAP - spent and cap["source"] == "policy capped"

    for stack in (a, b):
        answer = usage(stack, token)
        assert answer.status_code == 200
        document = answer.json()
        cents = int((spent * 100).quantize(Decimal(1)))
        assert document["extra_usage"]["daily"]["used_credits"] == cents
        assert document["extra_usage"]["daily"]["limit"] == 335
        (limit,) = document["limits"]
        assert limit["used_credits"] == cents and limit["period"] == "daily"
        reset = period_end("daily", datetime.now(UTC))
        assert limit["resets_at"] == reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert limit["percent"] == int(spent * 100 // CAP) and limit["scope"] == {"type": "user"}
    assert usage(a, "not-a-token").status_code == 401


def test_two_hundred_concurrent_requests_do_not_overshoot(replicas: tuple[Stack, Stack]) -> None:
    """200 requests at once, split over both replicas, against a cap covering ten: at most twelve
    are admitted, and what they cost stays within the cap."""
    a, b = replicas
    email = user("burst")
    token = a.mint(email, groups=("capped",))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:

            async def one(i: int) -> int:
                stack = a if i % 2 == 0 else b
                response = await client.post(
                    f"{stack.envoy_url}{INVOKE}",
                    headers={"authorization": f"Bearer {token}"},
                    json=BEDROCK_BODY,
                )
                return response.status_code

            return await asyncio.gather(*(one(i) for i in range(200)))

    statuses = asyncio.run(burst())
    admitted = statuses.count(200)
    assert 1 <= admitted <= 12, sorted(set(statuses))
    assert set(statuses) <= {200, 429}
    rows = written(a.database_url, email, admitted)
    spent = day_spend(rows)
    print(f"\n200 concurrent requests, two replicas: {admitted} admitted, spent ${spent} of a ${CAP} cap")
    assert spent <= CAP


def test_a_shared_group_budget_blocks_every_member(replicas: tuple[Stack, Stack]) -> None:
    """A $0.70 budget shared by a group (set at run time with `authz spend-limits --pooled`): each of
    two members gets an answer, then both are refused with -overage-scope: group_pool on either
    replica."""
    a, b = replicas
    group = f"pool-{time.monotonic_ns()}"
    one, two = user("member1"), user("member2")
    made = authz_cli(
        a, "spend-limits", "set", "--group", group, "--pooled", "--period", "daily", "--usd", "0.70"
    )
    assert made.returncode == 0 and "none -> $0.70" in made.stdout, made.stderr
    tokens = [a.mint(one, groups=("developers", group)), a.mint(two, groups=("developers", group))]
    assert bedrock(a, tokens[0]).status_code == 200
    assert bedrock(b, tokens[1]).status_code == 200
    spent = day_spend(written(a.database_url, one, 1)) + day_spend(written(a.database_url, two, 1))
    assert spent <= POOL
    for stack in (a, b):
        for token in tokens:
            # Within a sync both replicas know the cap set at run time and the rows written.
            refused = wait_for(lambda s=stack, t=token: (r := bedrock(s, t)).status_code == 429 and r)
            assert_cap_refusal(refused, pool=True)
    denied = wait_for(
        lambda: (
            len(r := fetch_rows(a.database_url, "user_email = ANY($1) AND outcome = 'denied'", [one, two]))
            >= 4
            and r
        )
    )
    assert {r["reason"] for r in denied} == {f"spend_cap: group_pool {group} daily 0.70 USD"}
    listed = authz_cli(a, "spend-limits", "list", "--json")
    assert {"scope": "group_pool", "name": group, "usd": "0.70000000"}.items() <= next(
        json.loads(line) for line in listed.stdout.splitlines() if group in line
    ).items()


def test_standing_headers_and_no_upstream_limits(replicas: tuple[Stack, Stack]) -> None:
    """Past 75% and 95% of a cap a user's answers say allowed_warning with the threshold; a user
    without caps gets no unified headers; the upstream's own anthropic-ratelimit-* never arrive."""
    a, _b = replicas

    def prior_spend(email: str, usd: Decimal) -> None:
        # Spend from earlier today, written the way the ledger writes rows (counters included).
        async def go() -> None:
            conn = await asyncpg.connect(a.database_url)
            try:
                await insert_rows(conn, [prior_row(email, usd)])
            finally:
                await conn.close()

        asyncio.run(go())

    # Claude Code's native format reads these headers; the cloud formats carry them too.
    for call in (messages_call, bedrock):
        for share, threshold in (("0.76", "0.75"), ("0.955", "0.95")):
            email = user("standing")
            prior_spend(email, ROOMY * Decimal(share))
            response = call(a, a.mint(email, groups=("roomy",)))
            assert response.status_code == 200, response.text
            reset = str(int(period_end("daily", datetime.now(UTC)).timestamp()))
            assert {k: v for k, v in response.headers.items() if k.startswith("anthropic-ratelimit-")} == {
                f"{U}status": "allowed_warning",
                f"{U}reset": reset,
                f"{U}representative-claim": "overage",
                f"{U}overage-status": "allowed_warning",
                f"{U}overage-utilization": share[:4],
                f"{U}overage-surpassed-threshold": threshold,
                f"{U}overage-reset": reset,
            }
    free = bedrock(a, a.mint(user("free"), groups=("developers",)))
    assert free.status_code == 200
    assert [k for k in free.headers if k.startswith("anthropic-ratelimit-")] == []


def prior_row(email: str, usd: Decimal) -> UsageRow:
    """An answered request of ``email`` costing ``usd``, a second ago."""
    return UsageRow(
        request_id=f"prior-{time.monotonic_ns()}",
        started_at=max(period_start("daily", datetime.now(UTC)), datetime.now(UTC) - timedelta(seconds=1)),
        user_sub=email,
        user_email=email,
        groups=("roomy",),
        session_id=None,
        cc_session_id=None,
        agent_id=None,
        parent_agent_id=None,
        user_agent=None,
        ingress_format="bedrock",
        operation="invoke",
        upstream="bedrock-dev",
        policy="roomy",
        requested_model=SONNET,
        upstream_model=SONNET,
        status=200,
        outcome="complete",
        reason=None,
        input_tokens=0,
        input_tokens_estimated=False,
        output_tokens=0,
        output_tokens_estimated=False,
        cache_write_tokens=0,
        cache_write_5m_tokens=0,
        cache_write_1h_tokens=0,
        cache_read_tokens=0,
        cost_usd=usd,
        latency_ms=1.0,
        ttfb_ms=None,
    )


def test_requests_per_minute(replicas: tuple[Stack, Stack]) -> None:
    """With 3 requests a minute the fourth on a replica is a 429 rate_limit_error with an integer
    retry-after, and its denied row says which limit."""
    a, _b = replicas
    email = user("rpm")
    token = a.mint(email, groups=("rpm",))
    assert [bedrock(a, token).status_code for _ in range(3)] == [200, 200, 200]
    refused = bedrock(a, token)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    assert "x-should-retry" not in refused.headers
    assert not [k for k in refused.headers if k.startswith("anthropic-ratelimit-")]
    denied = wait_for(lambda: fetch_rows(a.database_url, "user_email = $1 AND outcome = 'denied'", email))
    assert denied[0]["reason"] == "rate_limit: requests_per_minute 3"


def test_tokens_per_minute_blocks_after_the_rows_settle(replicas: tuple[Stack, Stack]) -> None:
    """30,000 tokens a minute: two answers of about 20,000 are admitted (nothing is counted yet);
    once their rows are written the user is refused with rate_limit_error, on either replica."""
    a, b = replicas
    email = user("tpm")
    token = a.mint(email, groups=("tpm",))
    assert bedrock(a, token).status_code == 200
    assert bedrock(b, token).status_code == 200
    written(a.database_url, email, 2)
    for stack in (a, b):
        refused = wait_for(lambda stack=stack: (r := bedrock(stack, token)).status_code == 429 and r)
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert "tokens per minute" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
