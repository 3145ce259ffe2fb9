"""The model allow-list through the real Envoy: ids that start like an allowed one and name another
are refused before any upstream, and the upstream only ever receives the id the policy checked."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any

import pytest

from authz.dev.devstack import DEFAULT_PROJECT, Stack
from tests.e2e.conftest import rows_for_user, wait_for
from tests.unit.test_model_ids import BYPASSES, HAIKU, OPUS

pytestmark = pytest.mark.e2e

GROUPS = ("haiku-only",)
VERTEX_PATH = "/v1/projects/{project}/locations/us-east5/publishers/anthropic/models/{model}:rawPredict"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "x"}],
}


def _vertex(path: str) -> str:
    """The review's Vertex paths name a placeholder project; the client's own project is ignored."""
    return path.replace("/projects/my-proj/", "/projects/the-clients-own-project/")


# A family around the allowed id, sent as raw bytes on the request line: separators in every
# encoding, dot segments, suffixes a prefix or `$` anchor would have let through.
FAMILY = (
    [
        f"/model/{HAIKU}{sep}{dots}{OPUS}/invoke"
        for sep in ("%2F", "%5C", "%252F", "%255C", "%2f")
        for dots in (f"..{sep}", f".{sep}", "")
    ]
    + [
        f"/model/{HAIKU}{suffix}/invoke"
        for suffix in (
            ":opus",
            "-v1:0:opus",
            "%00",
            "%0a",
            "%0d",
            "%09",
            "%20",
            "%3Bopus",
            "%3Fx",
            "%23opus",
            "@opus",
        )
    ]
    + [
        VERTEX_PATH.format(project="p", model=f"claude-haiku-4-5{tail}claude-opus-5-5")
        for tail in ("%2F..%2F", "@x%2F..%2F", "@20251001%2F..%2F", "%252F..%252F", "%5C..%5C", "%2F")
    ]
)


def send(stack: Stack, path: str, token: str) -> tuple[int, dict[str, Any]]:
    """POST exactly ``path`` (no client-side normalisation) with the user's bearer token."""
    host = urllib.parse.urlsplit(stack.envoy_url)
    conn = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port, timeout=10)
    try:
        body = dict(BODY, anthropic_version="vertex-2023-10-16") if "/publishers/" in path else BODY
        conn.request(
            "POST",
            path,
            body=json.dumps(body),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


@pytest.mark.parametrize("path", [_vertex(p) for p in BYPASSES] + FAMILY)
def test_bypass_ids_are_400_before_any_upstream(emulator_reset: Stack, unique_user: str, path: str) -> None:
    """Every id that starts like haiku and names something else is refused with the Anthropic
    envelope (or not routed at all), and the emulator never sees a request."""
    status, body = send(emulator_reset, path, emulator_reset.mint(unique_user, groups=GROUPS))
    assert status in (400, 404), (status, body)
    assert body["type"] == "error" and body["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert emulator_reset.emulator("GET", "/_emulator/requests") == []


ALLOWED = [
    # (path the client sends, the id the emulator must receive)
    (
        "/model/anthropic.claude-haiku-4-5-20251001-v1:0/invoke",
        "anthropic.claude-haiku-4-5-20251001-v1:0",
    ),
    (f"/model/{HAIKU}-20251001-v1:0/invoke", f"{HAIKU}-20251001-v1:0"),
    ("/model/US.Anthropic.Claude-Haiku-4-5/invoke", HAIKU),
    (
        "/model/arn:aws:bedrock:us-east-1:123456789012:inference-profile%2F" + HAIKU + "/invoke",
        f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{HAIKU}",
    ),
    (
        VERTEX_PATH.format(project="the-clients-own-project", model="claude-haiku-4-5@20251001"),
        "claude-haiku-4-5@20251001",
    ),
    (VERTEX_PATH.format(project="x", model="claude-haiku-4-5"), "claude-haiku-4-5"),
]


@pytest.mark.parametrize(("path", "upstream_id"), ALLOWED)
def test_allowed_ids_reach_the_upstream_canonical(
    emulator_reset: Stack, unique_user: str, path: str, upstream_id: str
) -> None:
    """An allowed id is served, and the upstream receives exactly the gateway's serialisation of
    the id the policy checked (lower-cased, in the configured project), not the client's bytes."""
    status, body = send(emulator_reset, path, emulator_reset.mint(unique_user, groups=GROUPS))
    assert status == 200, body
    (recorded,) = [r for r in emulator_reset.emulator("GET", "/_emulator/requests") if r["model_id"]]
    assert recorded["verdict"] == "ok"
    assert recorded["model_id"] == upstream_id
    if "/publishers/" in path:
        assert f"/projects/{DEFAULT_PROJECT}/" in recorded["raw_path"]
    (row,) = wait_for(lambda: rows_for_user(emulator_reset.database_url, unique_user))
    assert row["outcome"] == "complete" and row["policy"] == "haiku-only"


def test_haiku_only_user_is_refused_opus_outright(emulator_reset: Stack, unique_user: str) -> None:
    """The control: the same user asking for opus by its plain id is a policy refusal with a row."""
    status, body = send(
        emulator_reset, f"/model/{OPUS}/invoke", emulator_reset.mint(unique_user, groups=GROUPS)
    )
    assert status == 400 and "not allowed" in body["error"]["message"]
    assert emulator_reset.emulator("GET", "/_emulator/requests") == []
    (row,) = wait_for(lambda: rows_for_user(emulator_reset.database_url, unique_user))
    assert row["outcome"] == "denied"
