"""Bad gateway tokens are refused by ext_authz behind the real Envoy, the way clients expect."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from authz.configtypes import Sessions
from authz.dev.devstack import Stack
from authz.signin.tokens import KeySet, generate_signing_key, mint
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e

PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "x"}],
}


def b64(data: bytes) -> str:
    """base64url without padding (RFC 7515)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(stack: Stack, email: str, **over: Any) -> dict[str, Any]:
    """A valid claim set for ``email``, with overrides."""
    assert stack.config is not None
    now = int(time.time())
    base = {
        "iss": stack.config.sessions.issuer,
        "aud": stack.config.sessions.audience,
        "sub": email,
        "email": email,
        "groups": ["developers"],
        "sid": "s-1",
        "iat": now,
        "exp": now + 600,
        "jti": f"j-{now}",
    }
    base.update(over)
    return base


def post(stack: Stack, token: str | None) -> httpx.Response:
    """Call a Bedrock route with ``token`` as the bearer (or none)."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{stack.envoy_url}{PATH}", headers=headers, json=BODY)


def foreign_token(stack: Stack, email: str, **over: Any) -> str:
    """A well-formed token signed by a key the gateway does not trust, under the gateway's kid."""
    assert stack.config is not None and stack.config.sessions.signing_key is not None
    key = generate_signing_key(stack.config.sessions.signing_key.kid)
    keyset = KeySet.from_config(Sessions(signing_key=key))
    return mint(
        keyset,
        issuer=stack.config.sessions.issuer,
        audience=over.get("aud", stack.config.sessions.audience),
        sub=email,
        email=email,
        groups=("developers",),
        sid="s-1",
        ttl=600,
        now=time.time(),
    )


def unsigned(stack: Stack, email: str) -> str:
    """An alg=none token (RFC 7519 §6): no signature at all."""
    assert stack.config is not None and stack.config.sessions.signing_key is not None
    header = {"alg": "none", "typ": "at+jwt", "kid": stack.config.sessions.signing_key.kid}
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims(stack, email)).encode())}."


def hs256_with_public_key(stack: Stack, email: str) -> str:
    """The key-confusion attack: HS256 with the gateway's public key PEM as the HMAC secret."""
    assert stack.config is not None and stack.config.sessions.signing_key is not None
    private = serialization.load_pem_private_key(
        (stack.config.sessions.signing_key.private_key or "").encode(), password=None
    )
    # The public half is public: the attacker has it.
    secret = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": stack.config.sessions.signing_key.kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims(stack, email)).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


@pytest.mark.parametrize(
    "kind",
    ["missing", "expired", "foreign_key", "alg_none", "hs256_public_key", "wrong_audience", "garbage"],
)
def test_bad_token_is_401_without_retry(emulator_reset: Stack, unique_user: str, kind: str) -> None:
    """Each kind of bad token gets 401 authentication_error with x-should-retry: false, and no row of
    its own: anonymous refusals are counted in aggregate so a token flood cannot load the database."""
    stack = emulator_reset
    token: str | None
    if kind == "missing":
        token = None
    elif kind == "expired":
        token = stack.mint(unique_user, ttl=60, now=time.time() - 3600)
    elif kind == "foreign_key":
        token = foreign_token(stack, unique_user)
    elif kind == "alg_none":
        token = unsigned(stack, unique_user)
    elif kind == "hs256_public_key":
        token = hs256_with_public_key(stack, unique_user)
    elif kind == "wrong_audience":
        assert stack.config is not None
        keyset = KeySet.from_config(stack.config.sessions)
        token = mint(
            keyset,
            issuer=stack.config.sessions.issuer,
            audience="some-other-service",
            sub=unique_user,
            email=unique_user,
            groups=("developers",),
            sid="s",
            ttl=600,
            now=time.time(),
        )
    else:
        token = "not.a.jwt"
    resp = post(stack, token)
    assert resp.status_code == 401, resp.text
    assert resp.headers["x-should-retry"] == "false"
    assert resp.json()["error"]["type"] == "authentication_error"
    assert stack.emulator("GET", "/_emulator/requests") == []
    # A valid request afterwards is written through the same ledger queue: once its row is in,
    # the refusal's row would be too, had one been written.
    refused_id = resp.headers["x-request-id"]
    control = post(stack, stack.mint(unique_user))
    assert control.status_code == 200, control.text
    wait_for(lambda: _rows_by_request(stack, control.headers["x-request-id"]))
    assert _rows_by_request(stack, refused_id) == []


def _rows_by_request(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    from tests.e2e.conftest import fetch_rows

    return fetch_rows(stack.database_url, "request_id = $1", request_id)


def test_valid_token_passes(emulator_reset: Stack, unique_user: str) -> None:
    """The control case: a token minted with the configured key is accepted."""
    resp = post(emulator_reset, emulator_reset.mint(unique_user))
    assert resp.status_code == 200, resp.text
