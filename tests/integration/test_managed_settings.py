"""``GET /managed/settings`` on the portal: the caller's policy document, its checksum and ETag,
304 and 404 as Claude Code reads them, and tokens judged as ext_authz judges them.

The portal app runs on port 0 (aiohttp's TestServer) with tokens minted by the gateway's own key;
nothing here needs the database (the pool is opened but never used).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from authz.configtypes import GatewayConfig, Policy, Portal, Sessions
from authz.jsondoc import json_object
from authz.signin.portal import PORTAL, PortalDeps, build_portal
from authz.signin.revocation import RevocationSet
from authz.signin.tokens import KeySet, generate_signing_key, mint
from authz.store.db import Pool, connect_pool

pytestmark = pytest.mark.integration

ISSUER = "https://gateway.test"
NOW = 1_900_000_000.0

ENG_SETTINGS: dict[str, Any] = {
    "permissions": {
        "deny": ["Read(./.env)", "Read(./secrets/**)"],
        "disableBypassPermissionsMode": "disable",
    },
    "env": {"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1", "CLAUDE_CODE_GATEWAY_HINT_HEADERS": "1"},
    "companyAnnouncements": ["Bienvenue — ☕ at 10:00", "😀"],
    "cleanupPeriodDays": 14,
    "model": "claude-sonnet-4-5",
}


def policies(eng: dict[str, Any] = ENG_SETTINGS) -> tuple[Policy, ...]:
    return (
        Policy(name="eng", groups=("eng",), upstreams=("u",), managed_settings=json_object(eng)),
        Policy(name="empty", groups=("empty",), upstreams=("u",), managed_settings=json_object({})),
        Policy(name="plain", groups=("plain",), email_domains=("plain.example",), upstreams=("u",)),
    )


def independent_checksum(settings: Any) -> str:
    """DESIGN.md's rule, computed here with the standard library alone."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Settings:
    """One running portal and a way to call /managed/settings on it."""

    server: TestServer
    config: GatewayConfig
    keyset: KeySet
    revocations: RevocationSet

    def token(self, groups: tuple[str, ...] = ("eng",), **kw: Any) -> str:
        return mint(
            self.keyset,
            issuer=ISSUER,
            audience="claude-gateway",
            sub=kw.pop("sub", "00u-ada"),
            email=kw.pop("email", "ada@example.com"),
            groups=groups,
            sid=kw.pop("sid", "s-ada"),
            ttl=kw.pop("ttl", 900),
            now=kw.pop("now", NOW),
        )

    async def get(
        self, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, CIMultiDict[str], bytes]:
        async with aiohttp.ClientSession() as http:
            response = await http.request(
                method, str(self.server.make_url("/managed/settings")), headers=headers or {}
            )
            return response.status, CIMultiDict(response.headers), await response.read()

    async def fetch(self, token: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
        return await self.get({"Authorization": f"Bearer {token}", **headers})


Factory = Callable[..., Awaitable[Settings]]


@pytest.fixture
async def make_settings(pg_dsn: str) -> AsyncIterator[Factory]:
    pool: Pool = await connect_pool(pg_dsn, min_size=0, max_size=1, timeout=10)
    servers: list[TestServer] = []

    async def factory(configured: tuple[Policy, ...] | None = None) -> Settings:
        sessions = Sessions(issuer=ISSUER, signing_key=generate_signing_key("k1"))
        config = GatewayConfig(
            sessions=sessions,
            portal=Portal(public_url="https://gateway.test"),
            policies=configured if configured is not None else policies(),
        )
        keyset = KeySet.from_config(sessions)
        revocations = RevocationSet()
        deps = PortalDeps(
            config=config,
            pool=pool,
            keyset=keyset,
            oidc=None,
            clock=lambda: datetime.fromtimestamp(NOW, UTC),
            is_revoked=revocations.blocks,
        )
        server = TestServer(build_portal(deps), port=0)
        await server.start_server()
        servers.append(server)
        return Settings(server, config, keyset, revocations)

    yield factory
    for server in servers:
        await server.close()
    await pool.close()


@pytest.fixture
async def portal(make_settings: Factory) -> Settings:
    return await make_settings()


def envelope(body: bytes) -> tuple[str, str]:
    parsed = json.loads(body)
    assert parsed["type"] == "error"
    return parsed["error"]["type"], parsed["error"]["message"]


async def test_settings_come_with_an_independently_verifiable_checksum_and_etag(portal: Settings) -> None:
    """200 carries uuid, checksum and the policy's settings; the checksum is sha256 of the sorted,
    compact settings JSON, and quoted it is the ETag."""
    status, headers, body = await portal.fetch(portal.token())
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    document = json.loads(body)
    assert set(document) == {"uuid", "checksum", "settings"}
    assert document["settings"] == ENG_SETTINGS
    assert document["checksum"] == independent_checksum(ENG_SETTINGS)
    assert headers["ETag"] == f'"{document["checksum"]}"'
    assert uuid.UUID(document["uuid"]).version == 5
    assert headers["Cache-Control"] == "private, no-cache"


async def test_the_checksum_is_the_value_claude_code_computes(portal: Settings) -> None:
    """Node's JSON.stringify over the key-sorted settings (what the client hashes for
    If-None-Match) gives the served checksum, numbers and non-ASCII text included."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: install Node.js 20 or later (make deps-system)")
    _, _, body = await portal.fetch(portal.token())
    script = (
        "const c=require('crypto');let s='';process.stdin.on('data',d=>s+=d).on('end',()=>{"
        "const sort=e=>Array.isArray(e)?e.map(sort):e!==null&&typeof e==='object'?"
        "Object.fromEntries(Object.keys(e).sort().map(k=>[k,sort(e[k])])):e;"
        "const t=JSON.stringify(sort(JSON.parse(s).settings));"
        "process.stdout.write('sha256:'+c.createHash('sha256').update(t).digest('hex'))})"
    )
    result = await asyncio.to_thread(
        subprocess.run, [node, "-e", script], input=body, capture_output=True, check=True, timeout=30
    )
    assert result.stdout.decode() == json.loads(body)["checksum"]


async def test_304_only_for_a_matching_if_none_match(portal: Settings) -> None:
    """A matching If-None-Match (strong, weak or in a list) gets 304 with the ETag and no body; a
    stale one, none, or the `*` probe get the 200 document."""
    token = portal.token()
    _, headers, _ = await portal.fetch(token)
    etag = headers["ETag"]
    for value in (etag, f"W/{etag}", f'"sha256:0000", {etag}'):
        status, h, body = await portal.fetch(token, **{"If-None-Match": value})
        assert (status, body, h["ETag"]) == (304, b"", etag), value
    stale = independent_checksum({"model": "opus"})
    for extra in ({"If-None-Match": f'"{stale}"'}, {}, {"If-None-Match": "*"}):
        status, _, body = await portal.fetch(token, **extra)
        assert status == 200 and json.loads(body)["settings"] == ENG_SETTINGS, extra


async def test_no_managed_policy_is_404_and_an_empty_one_is_200(portal: Settings) -> None:
    """A policy without managed_settings, or no policy at all, is 404; an empty mapping is 200 {}."""
    for token in (
        portal.token(groups=("plain",)),
        portal.token(groups=(), email="bo@plain.example"),
        portal.token(groups=("sales",), email="cy@elsewhere.example"),
    ):
        status, headers, body = await portal.fetch(token)
        assert status == 404 and "ETag" not in headers
        assert envelope(body)[0] == "not_found_error"
    status, headers, body = await portal.fetch(portal.token(groups=("empty",)))
    document = json.loads(body)
    assert status == 200 and document["settings"] == {}
    assert document["checksum"] == "sha256:" + hashlib.sha256(b"{}").hexdigest()
    assert headers["ETag"] == f'"{document["checksum"]}"'


async def test_the_first_matching_policy_decides(portal: Settings) -> None:
    """Someone in both `eng` and `empty` gets `eng`'s settings: the first match, as for inference."""
    status, _, body = await portal.fetch(portal.token(groups=("empty", "eng")))
    assert status == 200 and json.loads(body)["settings"] == ENG_SETTINGS


async def test_uuid_is_stable_per_policy_and_document(make_settings: Factory) -> None:
    """Two replicas serve the same uuid for the same policy and settings; a change to the settings
    changes uuid and checksum, and another policy with the same settings has its own uuid."""
    first, second = await make_settings(), await make_settings()
    a = json.loads((await first.fetch(first.token()))[2])
    b = json.loads((await second.fetch(second.token()))[2])
    assert a == b
    changed = await make_settings(policies({**ENG_SETTINGS, "cleanupPeriodDays": 15}))
    c = json.loads((await changed.fetch(changed.token()))[2])
    assert c["uuid"] != a["uuid"] and c["checksum"] != a["checksum"]
    renamed = await make_settings(tuple(replace(p, name=f"{p.name}-2") for p in policies()))
    d = json.loads((await renamed.fetch(renamed.token()))[2])
    assert d["checksum"] == a["checksum"] and d["uuid"] != a["uuid"]


async def test_bad_tokens_get_401_authentication_error(portal: Settings) -> None:
    """Missing, expired, revoked, foreign-signed or two different tokens: 401 in the Anthropic
    envelope with x-should-retry: false, as ext_authz answers them."""
    other_key = KeySet.from_config(Sessions(issuer=ISSUER, signing_key=generate_signing_key("k1")))
    foreign = Settings(portal.server, portal.config, other_key, portal.revocations).token()
    portal.revocations.add("s-revoked")
    cases = [
        ({}, "Missing gateway access token"),
        ({"Authorization": f"Bearer {portal.token(now=NOW - 3600)}"}, "expired"),
        ({"Authorization": f"Bearer {portal.token(sid='s-revoked')}"}, "revoked"),
        ({"Authorization": f"Bearer {foreign}"}, "not valid"),
        ({"Authorization": "Basic YTpi"}, "exactly one"),
        ({"Authorization": f"Bearer {portal.token()}", "x-api-key": portal.token(sid="s-2")}, "exactly one"),
    ]
    for headers, words in cases:
        status, response_headers, body = await portal.get(headers)
        assert status == 401, headers
        kind, message = envelope(body)
        assert kind == "authentication_error" and words in message, (headers, message)
        assert response_headers["x-should-retry"] == "false"


async def test_the_token_may_come_as_x_api_key_or_both_headers(portal: Settings) -> None:
    """Claude Code with an apiKeyHelper sends the token as x-api-key and as a bearer: accepted."""
    token = portal.token()
    for headers in ({"x-api-key": token}, {"x-api-key": token, "Authorization": f"Bearer {token}"}):
        status, _, body = await portal.get(headers)
        assert status == 200 and json.loads(body)["settings"] == ENG_SETTINGS


async def test_other_methods_are_refused_in_the_envelope(portal: Settings) -> None:
    """A POST is a 405 with Allow and an Anthropic invalid_request_error, not an HTML page."""
    status, headers, body = await portal.get({"Authorization": f"Bearer {portal.token()}"}, method="POST")
    assert status == 405 and "GET" in headers["Allow"]
    assert envelope(body)[0] == "invalid_request_error"


async def test_a_reload_serves_the_new_document_and_its_etag(portal: Settings) -> None:
    """After the portal takes a reloaded configuration, a poll naming the old ETag gets the new
    document (200, new checksum) and a poll naming the new one gets 304; a policy that lost its
    settings answers 404."""
    token = portal.token()
    status, headers, _ = await portal.fetch(token)
    assert status == 200
    old_etag = headers["ETag"]

    changed = {**ENG_SETTINGS, "cleanupPeriodDays": 30}
    reloaded = replace(portal.config, policies=policies(changed))
    portal.server.app[PORTAL].reconfigure(reloaded)

    status, headers, body = await portal.fetch(token, **{"If-None-Match": old_etag})
    assert status == 200
    assert json.loads(body)["checksum"] == independent_checksum(changed)
    assert headers["ETag"] == f'"{independent_checksum(changed)}"' != old_etag
    status, _, _ = await portal.fetch(token, **{"If-None-Match": headers["ETag"]})
    assert status == 304

    without = tuple(replace(p, managed_settings=None) if p.name == "eng" else p for p in policies())
    portal.server.app[PORTAL].reconfigure(replace(portal.config, policies=without))
    status, _, body = await portal.fetch(token)
    assert status == 404
