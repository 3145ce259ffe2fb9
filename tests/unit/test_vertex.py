"""Vertex upstream: endpoints, path rewriting onto the configured project, and access-token caching."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.exceptions import RefreshError

from backends.base import Caller, ModelRef
from backends.errors import BackendError
from backends.kinds import KINDS
from backends.vertex import VertexConfig
from backends.vertex.upstream import (
    ApplicationDefault,
    GoogleCredentials,
    ServiceAccountFile,
    VertexSettings,
    VertexUpstream,
)

ALICE = Caller(sub="00u1alice", email="alice@example.com", groups=("eng",))
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
BASE = "/v1/projects/client-project/locations/europe-west1/publishers/anthropic/models"
OURS = "/v1/projects/gateway-prod/locations/us-east5/publishers/anthropic/models"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a network connection (unit tests must not)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def settings(**overrides: Any) -> VertexSettings:
    values: dict[str, Any] = {
        "name": "vertex-main",
        "project": "gateway-prod",
        "region": "us-east5",
        "credentials": ApplicationDefault(),
    }
    values.update(overrides)
    return VertexSettings(**values)


class Clock:
    """A settable clock in seconds since the epoch."""

    def __init__(self, now: datetime.datetime = T0) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now


class FakeCredentials:
    """Stands in for google-auth credentials: each refresh issues a numbered token valid for an hour."""

    def __init__(
        self, clock: Clock, *, lifetime: float | None = 3600, quota_project_id: str | None = None
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None
        self.quota_project_id = quota_project_id
        self.refreshes = 0
        self.threads: list[int] = []
        self.fail = False
        self.gate: threading.Event | None = None

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        self.threads.append(threading.get_ident())
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.fail:
            raise RefreshError("invalid_grant: token endpoint unavailable")  # type: ignore[no-untyped-call]
        self.token = f"ya29.token-{self.refreshes}"
        if self.lifetime is None:
            self.expiry = None
        else:
            # google-auth keeps expiry as a naive UTC datetime.
            when = datetime.datetime.fromtimestamp(self.clock.now + self.lifetime, datetime.UTC)
            self.expiry = when.replace(tzinfo=None)


def upstream_with(fake: FakeCredentials, clock: Clock, **overrides: Any) -> VertexUpstream:
    credentials: GoogleCredentials = fake
    return VertexUpstream(settings(**overrides), credentials=credentials, auth_request=object(), clock=clock)


async def bearer(upstream: VertexUpstream) -> str:
    signed = await upstream.sign(method="POST", path="/p", headers={}, body=b"{}", caller=ALICE)
    return signed.headers["authorization"]


# --- endpoints ------------------------------------------------------------------------------------


def test_regional_endpoint() -> None:
    """A region maps to https://{region}-aiplatform.googleapis.com."""
    upstream = VertexUpstream(settings(region="europe-west1"))
    assert (upstream.endpoint.scheme, upstream.authority) == (
        "https",
        "europe-west1-aiplatform.googleapis.com",
    )
    assert (upstream.kind, upstream.name) == ("vertex", "vertex-main")


def test_global_endpoint() -> None:
    """Region global maps to https://aiplatform.googleapis.com, with no region prefix."""
    assert VertexUpstream(settings(region="global")).authority == "aiplatform.googleapis.com"


def test_base_url_overrides_the_endpoint() -> None:
    """A loopback base_url (the emulator) sets scheme and authority."""
    upstream = VertexUpstream(settings(base_url="http://localhost:8090"))
    assert (upstream.endpoint.scheme, upstream.authority) == ("http", "localhost:8090")


def test_plain_http_to_a_remote_host_is_refused() -> None:
    """http is refused for anything but loopback, so a token never crosses a network in clear text."""
    with pytest.raises(BackendError, match="loopback"):
        VertexUpstream(settings(base_url="http://10.0.0.5:8080"))


@pytest.mark.parametrize(
    ("field", "value"), [("region", "us-east5.evil.com"), ("project", "../other"), ("project", "")]
)
def test_invalid_region_or_project_is_refused(field: str, value: str) -> None:
    """A region or project that could alter the host or path is refused at construction."""
    with pytest.raises(BackendError, match=field):
        VertexUpstream(settings(**{field: value}))


def test_kind_table_builds_vertex_upstream() -> None:
    """The vertex kind's descriptor builds a VertexUpstream from its YAML settings."""
    built = KINDS["vertex"].build("vertex-main", VertexConfig(region="us-east5", project="gateway-prod"))
    assert isinstance(built, VertexUpstream) and built.name == "vertex-main"


# --- paths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("operation", "method"), [("invoke", "rawPredict"), ("stream", "streamRawPredict")])
def test_path_uses_configured_project_and_region(operation: str, method: str) -> None:
    """Paths name the configured project and region (a client never picks who is billed)."""
    out = VertexUpstream(settings()).path(operation, "claude-opus-5-5")  # type: ignore[arg-type]
    assert out == f"{OURS}/claude-opus-5-5:{method}"


def test_path_for_global_region() -> None:
    """With region global the path names locations/global."""
    upstream = VertexUpstream(settings(region="global"))
    out = upstream.path("invoke", "claude-haiku-4-5@20251001")
    assert out == "/v1/projects/gateway-prod/locations/global/publishers/anthropic/models/" + (
        "claude-haiku-4-5@20251001:rawPredict"
    )


def test_count_tokens_path_is_rewritten() -> None:
    """count-tokens:rawPredict is built on the configured project and region, with no model."""
    out = VertexUpstream(settings()).path("count_tokens", None)
    assert out == f"{OURS}/count-tokens:rawPredict"


def test_model_map_replaces_the_model() -> None:
    """A model_map entry replaces the canonical model id; unmapped ids keep their parsed form."""
    upstream = VertexUpstream(settings(model_map={"claude-opus-5-5": "claude-opus-5-5@20260101"}))
    assert (
        upstream.model_id(ModelRef("claude-opus-5-5", "claude-opus-5-5", True)) == "claude-opus-5-5@20260101"
    )
    haiku = ModelRef("claude-haiku-4-5@20251001", "claude-haiku-4-5-20251001", True)
    assert upstream.model_id(haiku) == "claude-haiku-4-5@20251001"


@pytest.mark.parametrize("operation", ["list_profiles", "list_models"])
def test_unsupported_operation_is_refused(operation: str) -> None:
    """Operations Vertex has no route for raise BackendError."""
    with pytest.raises(BackendError):
        VertexUpstream(settings()).path(operation, "claude-opus-5-5")  # type: ignore[arg-type]


# --- tokens ---------------------------------------------------------------------------------------


async def test_sign_sets_bearer_token_and_keeps_path() -> None:
    """sign sets authorization: Bearer <token> and returns the upstream's authority and the path."""
    clock = Clock()
    upstream = upstream_with(FakeCredentials(clock), clock)
    path = "/v1/projects/gateway-prod/locations/us-east5/publishers/anthropic/models/m:rawPredict"
    signed = await upstream.sign(
        method="POST", path=path, headers={"authorization": "Bearer gw"}, body=b"", caller=ALICE
    )
    assert signed.headers == {"authorization": "Bearer ya29.token-1"}
    assert (signed.authority, signed.path) == ("us-east5-aiplatform.googleapis.com", path)


async def test_token_is_cached_until_five_minutes_before_expiry() -> None:
    """The access token is reused until 5 minutes before its (naive UTC) expiry, then refreshed."""
    clock = Clock()
    fake = FakeCredentials(clock)
    upstream = upstream_with(fake, clock)

    assert await bearer(upstream) == "Bearer ya29.token-1"
    clock.now = T0.timestamp() + 3600 - 301
    assert await bearer(upstream) == "Bearer ya29.token-1"
    assert fake.refreshes == 1
    clock.now = T0.timestamp() + 3600 - 300
    assert await bearer(upstream) == "Bearer ya29.token-2"
    assert fake.refreshes == 2


async def test_concurrent_signs_share_one_refresh() -> None:
    """Concurrent requests while no token is cached wait on a single refresh."""
    clock = Clock()
    fake = FakeCredentials(clock)
    fake.gate = threading.Event()
    upstream = upstream_with(fake, clock)

    tasks = [asyncio.create_task(bearer(upstream)) for _ in range(10)]
    await asyncio.sleep(0.01)
    fake.gate.set()
    assert set(await asyncio.gather(*tasks)) == {"Bearer ya29.token-1"}
    assert fake.refreshes == 1


async def test_refresh_runs_off_the_event_loop() -> None:
    """credentials.refresh is called from a worker thread, not the event loop's thread."""
    clock = Clock()
    fake = FakeCredentials(clock)
    await bearer(upstream_with(fake, clock))
    assert fake.threads and fake.threads[0] != threading.get_ident()


async def test_failed_refresh_keeps_serving_the_unexpired_token() -> None:
    """If refreshing fails while the old token is still valid, the old token is still used."""
    clock = Clock()
    fake = FakeCredentials(clock)
    upstream = upstream_with(fake, clock)
    await bearer(upstream)

    fake.fail = True
    clock.now = T0.timestamp() + 3600 - 120
    assert await bearer(upstream) == "Bearer ya29.token-1"
    clock.now = T0.timestamp() + 3600
    with pytest.raises(BackendError, match="RefreshError"):
        await bearer(upstream)


async def test_quota_project_is_sent_when_the_credential_names_one() -> None:
    """User credentials with a quota project add x-goog-user-project, as google-auth's apply() does."""
    clock = Clock()
    upstream = upstream_with(FakeCredentials(clock, quota_project_id="billing-proj"), clock)
    signed = await upstream.sign(method="POST", path="/p", headers={}, body=b"", caller=ALICE)
    assert signed.headers["x-goog-user-project"] == "billing-proj"


async def test_token_without_expiry_is_refreshed_after_fifteen_minutes() -> None:
    """A token with no stated expiry is refreshed after 15 minutes less the margin, not trusted forever."""
    clock = Clock()
    fake = FakeCredentials(clock, lifetime=None)
    upstream = upstream_with(fake, clock)
    await bearer(upstream)
    clock.now += 15 * 60 - 301
    await bearer(upstream)
    assert fake.refreshes == 1
    clock.now += 1
    assert await bearer(upstream) == "Bearer ya29.token-2"


class TokenEndpoint:
    """A google.auth.transport.Request stand-in that answers the token endpoint without a socket."""

    class Response:
        def __init__(self, data: bytes) -> None:
            self.status = 200
            self.headers = {"content-type": "application/json"}
            self.data = data

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes]] = []

    def __call__(
        self, url: str, method: str = "GET", body: Any = None, headers: Any = None, **kwargs: Any
    ) -> Any:
        raw = body if isinstance(body, bytes) else str(body).encode()
        self.calls.append((url, method, raw))
        reply = {"access_token": "ya29.from-token-uri", "expires_in": 3600, "token_type": "Bearer"}
        return self.Response(json.dumps(reply).encode())


def write_key_file(tmp_path: Path, token_uri: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "gateway-prod",
        "private_key_id": "test-key-1",
        "private_key": pem,
        "client_email": "gateway@gateway-prod.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path = tmp_path / "key.json"
    path.write_text(json.dumps(info))
    return path


async def test_service_account_key_file_token_uri_is_honoured(tmp_path: Path) -> None:
    """A key file's token_uri receives the JWT grant (scope cloud-platform) and its token is used."""
    token_uri = "http://127.0.0.1:8090/token"
    key_file = write_key_file(tmp_path, token_uri)
    endpoint = TokenEndpoint()
    upstream = VertexUpstream(
        settings(credentials=ServiceAccountFile(str(key_file)), base_url="http://127.0.0.1:8090"),
        auth_request=endpoint,
    )

    assert await bearer(upstream) == "Bearer ya29.from-token-uri"
    [(url, method, body)] = endpoint.calls
    assert (url, method) == (token_uri, "POST")
    assertion = parse_qs(body.decode())["assertion"][0]
    claims = json.loads(base64.urlsafe_b64decode(assertion.split(".")[1] + "=="))
    # google-auth posts to the key's token_uri but keeps Google's endpoint as the JWT audience.
    assert claims["aud"] == "https://oauth2.googleapis.com/token"
    assert claims["iss"] == "gateway@gateway-prod.iam.gserviceaccount.com"
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    await upstream.aclose()


async def test_missing_key_file_is_a_backend_error_naming_the_path(tmp_path: Path) -> None:
    """A missing service-account key file fails with a BackendError that names the file."""
    missing = tmp_path / "absent.json"
    upstream = VertexUpstream(
        settings(credentials=ServiceAccountFile(str(missing))), auth_request=TokenEndpoint()
    )
    with pytest.raises(BackendError, match=r"absent\.json"):
        await bearer(upstream)
