"""``authz doctor`` against real parts: a good config passes every check (PostgreSQL, the real
test IdP, a credential, Envoy's validate mode); each broken part gives a failing line naming the
field and the fix."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.dev.ports import free_port
from authz.ops.doctor import doctor
from authz.signin.secretbox import generate_key
from authz.signin.tokens import generate_signing_key
from tests.idp_fixture import TestIdp

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real test IdP (npm oidc-provider) with one confidential client."""
    server = TestIdp()
    client = {
        "client_id": "gw",
        "client_secret": "doctor-secret",
        "redirect_uris": ["http://127.0.0.1:8080/oauth/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }
    url = server.start(tmp_path_factory.mktemp("idp"), [client], {})
    try:
        yield url
    finally:
        server.stop()


def write_config(root: Path, dsn: str, issuer: str, **changes: Any) -> Path:
    """A production-shaped config under ``root`` (key files beside it), with ``changes`` merged in."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "signing.pem").write_text(generate_signing_key("k1").private_key or "")
    ports = iter(free_port() for _ in range(4))
    raw: dict[str, Any] = {
        "listen": {
            name: {"address": "127.0.0.1", "port": next(ports)}
            for name in ("envoy", "envoy_admin", "grpc", "portal")
        },
        "sessions": {
            "issuer": "https://gateway.example.com",
            "signing_key": {"kid": "k1", "private_key": "${file:signing.pem}"},
            "encryption_key": generate_key(),
        },
        "oidc": {"issuer": issuer, "client_id": "gw", "client_secret": "doctor-secret"},
        "store": {"url": dsn},
        "upstreams": {
            "bedrock-us": {
                "kind": "bedrock",
                "region": "us-east-1",
                "credentials": {
                    "source": "static",
                    "access_key_id": "AKIDEXAMPLE",
                    "secret_access_key": "x" * 40,
                },
            }
        },
        "policies": [{"name": "eng", "groups": ["eng"], "upstreams": ["bedrock-us"]}],
    }
    for section, value in changes.items():
        raw[section] = {**raw[section], **value} if isinstance(value, dict) else value
    path = root / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(path: Path, envoy: bool = True) -> tuple[int, list[str]]:
    """``authz doctor``'s exit status and lines."""
    out = io.StringIO()
    status = doctor(path, {}, out, envoy=envoy)
    return status, out.getvalue().splitlines()


def failing(lines: list[str]) -> list[str]:
    """The FAIL lines."""
    return [line for line in lines if line.startswith("FAIL")]


def test_a_good_config_passes_every_check(clean_db: str, issuer: str, tmp_path: Path) -> None:
    """Config, keys, PostgreSQL and migrations, IdP discovery, the upstream credential and Envoy's
    validate mode all pass, one line each."""
    status, lines = run(write_config(tmp_path, clean_db, issuer))
    assert status == 0, "\n".join(lines)
    assert failing(lines) == []
    names = [line.split(" [")[0].removeprefix("ok   ") for line in lines[:-1]]
    assert names == [
        "config",
        "session keys",
        "encryption key",
        "postgresql",
        "migrations",
        "IdP discovery",
        "upstream bedrock-us",
        "envoy config",
    ]
    assert lines[-1] == "all 8 checks passed"


def test_unreachable_postgresql_names_store_url(clean_db: str, issuer: str, tmp_path: Path) -> None:
    """A store.url nothing listens on fails the postgresql check naming store.url and the fix."""
    path = write_config(
        tmp_path, f"postgresql://gw@127.0.0.1:{free_port()}/gw", issuer, store={"connect_timeout": 2}
    )
    status, lines = run(path, envoy=False)
    assert status == 1
    (line,) = failing(lines)
    assert line.startswith("FAIL postgresql [store.url]:")
    assert "fix: check the host, port" in line


def test_wrong_idp_url_names_oidc_issuer(clean_db: str, issuer: str, tmp_path: Path) -> None:
    """An issuer URL that is not the IdP's (a trailing path) fails IdP discovery naming oidc.issuer."""
    path = write_config(tmp_path, clean_db, issuer, oidc={"issuer": issuer.rstrip("/") + "/wrong"})
    status, lines = run(path, envoy=False)
    assert status == 1
    (line,) = failing(lines)
    assert line.startswith("FAIL IdP discovery [oidc.issuer]:")
    assert "fix: set oidc.issuer to the exact issuer" in line


def test_unparseable_key_names_the_key_field(clean_db: str, issuer: str, tmp_path: Path) -> None:
    """A signing key file that is not PEM fails the session-keys check naming the field; the
    other checks still run."""
    path = write_config(tmp_path, clean_db, issuer)
    (tmp_path / "signing.pem").write_text(
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    )
    status, lines = run(path, envoy=False)
    assert status == 1
    (line,) = failing(lines)
    assert line.startswith("FAIL session keys [sessions.signing_key]:")
    assert "not an unencrypted PEM private key" in line and "fix:" in line
    assert any(line.startswith("ok   postgresql") for line in lines)


def test_a_config_that_does_not_load_stops_at_the_first_line(tmp_path: Path) -> None:
    """An unknown key fails the config check naming it, and nothing else is tried."""
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {envoy: {adress: 0.0.0.0}}\n")
    status, lines = run(path)
    assert status == 1
    assert lines[0].startswith("FAIL config [listen.envoy.adress]: unknown key")
    assert lines[1:] == ["1 of 1 checks failed"]
