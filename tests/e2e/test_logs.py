"""No secret in a log line: after good, refused and failing requests, neither the gateway's nor
Envoy's log holds a token, an API key or a cloud credential."""

from __future__ import annotations

import time

import httpx
import pytest

from authz.dev.devstack import TEST_SECRET_ACCESS_KEY, Stack
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e

PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "x"}],
}


def test_tokens_and_cloud_secrets_never_reach_the_logs(emulator_reset: Stack, unique_user: str) -> None:
    stack = emulator_reset
    good = stack.mint(unique_user)
    expired = stack.mint(unique_user, ttl=60, now=time.time() - 3600)
    badkey = stack.mint(unique_user, groups=("badkey",))
    forged = good[:-8] + ("A" * 8 if not good.endswith("A" * 8) else "B" * 8)
    sends = [
        {"authorization": f"Bearer {good}"},  # served
        {"x-api-key": good},  # served
        {"authorization": f"Bearer {expired}"},  # 401
        {"authorization": f"Bearer {forged}"},  # 401
        {"authorization": f"Bearer {good}", "x-api-key": expired},  # two credentials: 401
        {"authorization": f"Bearer {badkey}"},  # the cloud refuses the signature: 502
    ]
    statuses = []
    for headers in sends:
        resp = httpx.post(f"{stack.envoy_url}{PATH}", headers=headers, json=BODY, timeout=10)
        statuses.append(resp.status_code)
    assert statuses == [200, 200, 401, 401, 401, 502]
    stack.emulator("POST", "/_emulator/state", {"scenario": "server_error"})
    assert httpx.post(f"{stack.envoy_url}{PATH}", headers=sends[0], json=BODY).status_code >= 500

    log_dir = stack.root / "logs"
    wait_for(lambda: (log_dir / "gateway.log").stat().st_size > 0)
    secrets = {
        "access token": good,
        "expired token": expired,
        "forged token": forged,
        "bad-key upstream's token": badkey,
        "the bedrock secret key": TEST_SECRET_ACCESS_KEY,
    }
    for name in ("gateway.log", "envoy.log"):
        text = (log_dir / name).read_text(encoding="utf-8", errors="replace")
        for what, secret in secrets.items():
            # A token is looked for by its signature, the part that makes it a credential
            # (a log may name a user, which the payload also holds).
            assert secret.rsplit(".", 1)[-1] not in text, f"{what} in {name}"
