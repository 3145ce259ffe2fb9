"""Sign-in fixtures: the test IdP (npm ``oidc-provider``) registered for a gateway stack behind the
real Envoy, a second gateway replica sharing its PostgreSQL and keys, and headless Chromium.

One IdP, one signed-in stack (replica A) and one replica B (started only when a test asks for it)
serve the whole session; the browser is per module. Tests keep out of each other's way by signing in as
their own accounts and matching audit rows by a per-test User-Agent.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import Browser

from authz.dev.devstack import Ports, Stack
from authz.signin.secretbox import generate_key
from tests.e2e.conftest import shared_stack_config
from tests.idp_fixture import TestIdp, launch_chromium

CLIENT_ID = "claude-gateway"
# Generous for the suite's own sign-ins from 127.0.0.1; the guessing test exhausts it from another
# loopback address.
USER_CODE_ATTEMPTS = 30


def _account(email: str, groups: list[str], *, verified: bool = True) -> dict[str, Any]:
    return {"email": email, "email_verified": verified, "groups": groups, "password": f"{email}-pw"}


# Accounts that disabling or logging out would disturb get one test each.
ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": _account("alice@example.com", ["developers"]),
    "bob": _account("bob@example.com", ["developers"], verified=False),
    "carol": _account("carol@elsewhere.example.org", ["developers"]),
    "dave": _account("dave@example.com", ["sales"]),
    "erin": _account("erin@example.com", ["developers"]),
    "frank": _account("frank@example.com", ["developers"]),
    "grace": _account("grace@example.com", ["developers"]),
    "heidi": _account("heidi@example.com", ["developers"]),
    "ivan": _account("ivan@example.com", ["developers"]),
    "judy": _account("judy@example.com", ["developers"]),
    # The admin page's administrator (portal.admin_groups below).
    "olivia": _account("olivia@example.com", ["developers", "gateway-admins"]),
}
ADMIN_GROUP = "gateway-admins"


def password(account: str) -> str:
    """The test password of ``account``."""
    return str(ACCOUNTS[account]["password"])


@dataclass
class SignInEnv:
    """The IdP and the gateway stack registered with it."""

    idp: TestIdp
    stack: Stack

    @property
    def url(self) -> str:
        """The gateway's public URL (Envoy's listener)."""
        return self.stack.envoy_url

    @property
    def dsn(self) -> str:
        """The shared PostgreSQL."""
        return self.stack.database_url

    @property
    def issuer(self) -> str:
        """The IdP's issuer URL."""
        assert self.idp.issuer is not None
        return self.idp.issuer


@pytest.fixture(scope="session")
def signin(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignInEnv]:
    """The IdP with a confidential client for the gateway, and replica A signed up to it."""
    stack = Stack(root=tmp_path_factory.mktemp("signin-a"), database_url=pg_dsn)
    # The redirect and logout URIs name Envoy's port, so it is chosen before the IdP is configured.
    stack.ports = Ports.pick(stack.workers)
    url = stack.envoy_url
    client_secret = secrets.token_urlsafe(32)
    client = {
        "client_id": CLIENT_ID,
        "client_secret": client_secret,
        "redirect_uris": [f"{url}/oauth/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
        "backchannel_logout_uri": f"{url}/oauth/backchannel-logout",
        "backchannel_logout_session_required": True,
    }
    idp = TestIdp()
    issuer = idp.start(tmp_path_factory.mktemp("idp"), [client], ACCOUNTS)
    stack.extra_config = {
        **shared_stack_config(stack.emulator_url),
        "oidc": {
            "issuer": issuer,
            "client_id": CLIENT_ID,
            "client_secret": client_secret,
            "allowed_email_domains": ["example.com"],
            "allowed_groups": ["developers", "badkey"],
        },
        "portal": {
            "public_url": url,
            "user_code_attempts_per_minute": USER_CODE_ATTEMPTS,
            "admin_groups": [ADMIN_GROUP],
        },
        "sessions": {"encryption_key": generate_key()},
    }
    try:
        stack.start()
        yield SignInEnv(idp, stack)
    finally:
        stack.stop()
        idp.stop()


@pytest.fixture(scope="session")
def replica_b(signin: SignInEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second gateway replica (its own ``authz serve`` and Envoy) with replica A's configuration
    but its own ports: the same PostgreSQL, signing key, issuer, public URL and encryption key."""
    a = signin.stack
    assert a.config_path is not None
    root = tmp_path_factory.mktemp("signin-b")
    (root / "keys").mkdir()
    # Stack.write_config keeps an existing key file: B signs and verifies with A's key.
    shutil.copy2(a.root / "keys" / "signing-dev-1.pem", root / "keys" / "signing-dev-1.pem")
    b = Stack(root=root, database_url=a.database_url)
    b.ports = Ports.pick(b.workers)
    b.extra_config = {
        **a.extra_config,
        "sessions": {**a.extra_config["sessions"], "issuer": a.envoy_url},
    }
    try:
        b.start()
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, through Playwright (module-scoped: see ``launch_chromium``)."""
    with launch_chromium() as chromium:
        yield chromium
