"""A back-channel logout sent while PostgreSQL is stopped: the real IdP's logout reaches replica A
through its Envoy and is answered 200 from the local journal; replica A (both of its workers) and
replica B, which shares A's journal directory (``store.logout_spool_dir``) but not its processes,
refuse the session within 2 seconds through their own Envoys; once PostgreSQL is back the journal
is written through and the session stays revoked for good.

The stack runs on a PostgreSQL server of its own, since this test stops it.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from authz.dev.devstack import Ports, Stack
from authz.signin.secretbox import generate_key
from authz.store.embedded import EmbeddedPostgres
from tests.e2e.conftest import shared_stack_config, wait_for
from tests.e2e.signin.conftest import ACCOUNTS, CLIENT_ID, password
from tests.e2e.signin.flows import (
    assert_refused,
    audit_rows,
    invoke,
    refresh,
    session_row,
    sign_in,
    unique_ua,
    wait_refused,
)
from tests.idp_fixture import TestIdp

pytestmark = pytest.mark.e2e

ACCOUNT = "judy"


@dataclass
class OutageEnv:
    """Two replicas, their IdP and the PostgreSQL server they share (stoppable)."""

    pg: EmbeddedPostgres
    idp: TestIdp
    a: Stack
    b: Stack
    journal: Path


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageEnv]:
    """Replica A (two workers) registered at the IdP for back-channel logout, replica B (one worker)
    with A's keys and configuration, both with the same journal directory and a quick replay."""
    pg = EmbeddedPostgres()
    # Outside pytest's basetemp for the reason given in conftest.pg_dsn.
    pg_dir = Path(tempfile.mkdtemp(prefix="authz-pg-"))
    dsn = pg.start(pg_dir / "data")
    journal = tmp_path_factory.mktemp("shared-logout-journal")
    a = Stack(root=tmp_path_factory.mktemp("outage-a"), database_url=dsn, workers=2)
    a.ports = Ports.pick(a.workers)
    client_secret = secrets.token_urlsafe(32)
    client = {
        "client_id": CLIENT_ID,
        "client_secret": client_secret,
        "redirect_uris": [f"{a.envoy_url}/oauth/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
        "backchannel_logout_uri": f"{a.envoy_url}/oauth/backchannel-logout",
        "backchannel_logout_session_required": True,
    }
    idp = TestIdp()
    b: Stack | None = None
    try:
        issuer = idp.start(tmp_path_factory.mktemp("outage-idp"), [client], {ACCOUNT: ACCOUNTS[ACCOUNT]})
        a.extra_config = {
            **shared_stack_config(a.emulator_url),
            "oidc": {
                "issuer": issuer,
                "client_id": CLIENT_ID,
                "client_secret": client_secret,
                "allowed_groups": ["developers"],
            },
            "portal": {"public_url": a.envoy_url},
            "sessions": {"encryption_key": generate_key()},
            "store": {"logout_spool_dir": str(journal), "replay_interval": 0.5, "connect_timeout": 1.0},
        }
        a.start()
        root = tmp_path_factory.mktemp("outage-b")
        (root / "keys").mkdir()
        # Stack.write_config keeps an existing key file: B signs and verifies with A's key.
        shutil.copy2(a.root / "keys" / "signing-dev-1.pem", root / "keys" / "signing-dev-1.pem")
        b = Stack(root=root, database_url=dsn)
        b.ports = Ports.pick(b.workers)
        b.extra_config = {**a.extra_config, "sessions": {**a.extra_config["sessions"], "issuer": a.envoy_url}}
        b.start()
        yield OutageEnv(pg, idp, a, b, journal)
    finally:
        for stack in (b, a):
            if stack is not None:
                stack.stop()
        idp.stop()
        pg.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)


def test_logout_while_postgres_is_stopped_reaches_both_replicas_and_survives_the_restart(
    outage: OutageEnv, browser: Browser
) -> None:
    """The IdP's logout during the outage gets 200; both replicas refuse the session's token within
    2 seconds and cannot refresh it; after PostgreSQL restarts the journal is written through: the
    session is revoked in PostgreSQL with a spooled audit row, and refresh answers invalid_grant."""
    env = outage
    issuer = env.idp.issuer
    assert issuer is not None
    ua = unique_ua("logout-outage")
    tokens = sign_in(browser, env.a.envoy_url, issuer, ACCOUNT, password(ACCOUNT), ua=ua)
    for url in (env.a.envoy_url, env.b.envoy_url):
        assert invoke(url, tokens.access_token).status_code == 200

    env.pg.stop_server()
    try:
        # The database is not on the request path: the session still works until the logout.
        assert invoke(env.b.envoy_url, tokens.access_token).status_code == 200
        assert env.idp.backchannel_logout(ACCOUNT) == [200]
        done = time.monotonic()
        for url in (env.a.envoy_url, env.b.envoy_url):
            elapsed = wait_refused(url, tokens.access_token, since=done)
            assert elapsed < 2.0, f"{url} refused the token only {elapsed:.2f}s after the logout"

        # Every worker refuses it within the bound, not only the first one asked: the sibling of the
        # worker that took the logout learns of it at its next journal scan.
        def every_worker_refuses() -> bool:
            return all(invoke(env.a.envoy_url, tokens.access_token).status_code == 401 for _ in range(6))

        wait_for(every_worker_refuses, timeout=max(0.0, done + 2.0 - time.monotonic()))
        for _ in range(6):
            assert_refused(invoke(env.a.envoy_url, tokens.access_token))
        assert len(list(env.journal.glob("logout-*.json"))) == 1
        for url in (env.a.envoy_url, env.b.envoy_url):
            response = refresh(url, tokens.refresh_token)
            assert (response.status_code, response.json()) == (503, {"error": "temporarily_unavailable"})
    finally:
        env.pg.start_again()

    wait_for(lambda: not list(env.journal.glob("logout-*.json")), timeout=30)
    assert session_row(env.a.database_url, tokens.sid)["revoked_reason"] == "backchannel_logout"
    rows = audit_rows(env.a.database_url, "session_id = $1 AND kind = 'backchannel_logout'", tokens.sid)
    assert [(r["outcome"], r["detail"]["spooled"]) for r in rows] == [("ok", True)]
    for url in (env.a.envoy_url, env.b.envoy_url):
        assert_refused(invoke(url, tokens.access_token))
        again = refresh(url, tokens.refresh_token)
        assert (again.status_code, again.json()) == (401, {"error": "invalid_grant"})
