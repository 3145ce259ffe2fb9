"""Envoy's listener over TLS (listen.envoy.tls): the official SDK connects with the gateway's CA, a
certificate replaced on disk is served without restarting Envoy, and Claude Code's
``/managed/settings`` comes through the same listener to the portal.

The certificates are made here with ``cryptography``: a CA and leaves for 127.0.0.1 and
localhost, installed the way Kubernetes and cert-manager replace them (new files renamed into
place).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from anthropic import AnthropicBedrock, DefaultHttpxClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authz.dev.devstack import DEV_GROUPS, Ports, Stack
from tests.e2e.conftest import rows_for_user, wait_for

pytestmark = pytest.mark.e2e

SONNET_PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
SETTINGS = {
    "permissions": {"deny": ["Read(./.env)"]},
    "env": {"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1"},
    "companyAnnouncements": ["Über TLS ✓"],
}


@dataclass
class Authority:
    """A throwaway certificate authority that issues leaves for the loopback gateway."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Gateway test CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, label: str) -> tuple[bytes, bytes]:
        """A leaf for 127.0.0.1 and localhost: (certificate PEM, private key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def install(directory: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Put a certificate and key in place as secret volumes do: written aside, renamed in."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("tls.key", key_pem), ("tls.crt", cert_pem)):
        staged = directory / f".{name}.new"
        staged.write_bytes(data)
        staged.chmod(0o600)
        os.replace(staged, directory / name)


def fingerprint(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@dataclass
class TlsStack:
    stack: Stack
    authority: Authority
    ca_file: Path
    tls_dir: Path
    first_leaf: bytes

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def served(self) -> tuple[str, str | None]:
        """The SHA-256 of the leaf the listener presents, and the protocol ALPN agreed."""
        assert self.stack.ports is not None
        context = self.context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", self.stack.ports.envoy), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return hashlib.sha256(der).hexdigest(), tls.selected_alpn_protocol()


@pytest.fixture(scope="module")
def tls(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    """A stack of its own whose Envoy listener serves a certificate from the files under tls/."""
    root = tmp_path_factory.mktemp("tls-stack")
    authority = Authority.create()
    ca_file = root / "ca.pem"
    ca_file.write_bytes(authority.pem())
    tls_dir = root / "tls"
    cert_pem, key_pem = authority.issue("gateway one")
    install(tls_dir, cert_pem, key_pem)
    stack = Stack(root=root / "stack", database_url=pg_dsn)
    stack.ports = Ports.pick(stack.workers)
    stack.extra_config = {
        "listen": {
            "envoy": {
                "tls": {
                    "certificate_file": str(tls_dir / "tls.crt"),
                    "private_key_file": str(tls_dir / "tls.key"),
                }
            }
        },
        "policies": [
            {
                "name": "developers",
                "groups": list(DEV_GROUPS),
                "models": ["claude-*"],
                "upstreams": ["bedrock-dev", "vertex-dev"],
                "managed_settings": SETTINGS,
            }
        ],
    }
    stack.start()
    try:
        yield TlsStack(stack, authority, ca_file, tls_dir, cert_pem)
    finally:
        stack.stop()


def bedrock(tls: TlsStack, token: str) -> AnthropicBedrock:
    """The SDK client as Claude Code uses it in Bedrock skip-auth mode, trusting the gateway's CA."""
    return AnthropicBedrock(
        api_key=token,
        base_url=tls.stack.envoy_url,
        aws_region="us-east-1",
        max_retries=0,
        # The SDK's own HTTP client class, told to trust the gateway's CA.
        http_client=DefaultHttpxClient(verify=tls.context()),
    )


def ask(client: AnthropicBedrock) -> str:
    message = client.messages.create(
        model=SONNET_PROFILE, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    block = message.content[0]
    assert block.type == "text"
    return block.text


def test_the_sdk_reaches_the_gateway_over_tls_with_its_ca(tls: TlsStack, unique_user: str) -> None:
    """With the gateway's CA the official SDK's request succeeds over https (ALPN offers h2), and
    a client that does not trust that CA is refused in the handshake."""
    assert tls.stack.envoy_url.startswith("https://127.0.0.1:")
    leaf, alpn = tls.served()
    assert (leaf, alpn) == (fingerprint(tls.first_leaf), "h2")
    with bedrock(tls, tls.stack.mint(unique_user)) as client:
        assert ask(client).startswith("Hello from the upstream emulator.")
    row = wait_for(lambda: rows_for_user(tls.stack.database_url, unique_user))[0]
    assert (row["status"], row["outcome"]) == (200, "complete")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls.stack.envoy_url}/healthz", timeout=5)


def test_a_replaced_certificate_is_served_without_a_restart(tls: TlsStack, unique_user: str) -> None:
    """Renaming a new certificate and key into place makes the running Envoy serve the new leaf
    (the same process, no restart), and requests keep succeeding with the same CA."""
    envoy = tls.stack.procs["envoy"]
    pid = envoy.pid
    cert_pem, key_pem = tls.authority.issue("gateway two")
    install(tls.tls_dir, cert_pem, key_pem)
    wait_for(lambda: tls.served()[0] == fingerprint(cert_pem), timeout=20)
    assert envoy.alive() and envoy.pid == pid
    with bedrock(tls, tls.stack.mint(unique_user)) as client:
        assert ask(client).startswith("Hello from the upstream emulator.")


def test_managed_settings_come_through_the_listener_and_are_not_usage(
    tls: TlsStack, unique_user: str
) -> None:
    """GET /managed/settings over https reaches the portal: the document with its checksum and
    ETag, 304 when polled with it; neither poll becomes a usage row or a refusal row."""
    token = tls.stack.mint(unique_user)
    url = f"{tls.stack.envoy_url}/managed/settings"
    auth = {"Authorization": f"Bearer {token}"}
    # One connection throughout: Envoy reports its requests to the access-log service in order.
    with httpx.Client(verify=tls.context(), timeout=10) as http:
        first = http.get(url, headers=auth)
        assert first.status_code == 200, first.text
        document = first.json()
        assert document["settings"] == SETTINGS
        text = json.dumps(SETTINGS, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert document["checksum"] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        assert first.headers["etag"] == f'"{document["checksum"]}"'
        again = http.get(url, headers={**auth, "If-None-Match": first.headers["etag"]})
        assert (again.status_code, again.content) == (304, b"")
        assert http.get(url).status_code == 401
        # A request Envoy answers itself, with the same token: its refusal row marks the point by
        # which the access log has seen the polls before it.
        assert http.get(f"{tls.stack.envoy_url}/no-such-route", headers=auth).status_code == 404
    rows = wait_for(lambda: rows_for_user(tls.stack.database_url, unique_user))
    assert [(r["status"], r["outcome"]) for r in rows] == [(404, "denied")], rows
