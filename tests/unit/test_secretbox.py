"""Sealing the IdP's refresh token at rest: AES-256-GCM with a version byte and a random nonce."""

from __future__ import annotations

import base64

import pytest

from authz.errors import GatewayError
from authz.signin.secretbox import NONCE_BYTES, TAG_BYTES, VERSION, SecretBox, SecretBoxError, generate_key

SECRET = b"idp-refresh-token.\x00\xff with any bytes"


@pytest.fixture
def box() -> SecretBox:
    """A box with a fresh key."""
    return SecretBox(generate_key())


def test_a_sealed_secret_opens_to_the_same_bytes(box: SecretBox) -> None:
    """open(seal(x)) is x, empty secrets included."""
    assert box.open(box.seal(SECRET)) == SECRET
    assert box.open(box.seal(b"")) == b""


def test_the_sealed_form_is_version_nonce_ciphertext_and_tag(box: SecretBox) -> None:
    """A sealed value is the version byte, a 12-byte nonce, then the ciphertext with its 16-byte tag."""
    sealed = box.seal(SECRET)
    assert sealed[0] == VERSION
    assert len(sealed) == 1 + NONCE_BYTES + len(SECRET) + TAG_BYTES
    assert SECRET not in sealed


def test_each_seal_uses_a_fresh_nonce(box: SecretBox) -> None:
    """Sealing the same secret twice gives different nonces and ciphertexts."""
    first, second = box.seal(SECRET), box.seal(SECRET)
    assert first[1 : 1 + NONCE_BYTES] != second[1 : 1 + NONCE_BYTES]
    assert first != second


def test_flipping_any_bit_is_detected(box: SecretBox) -> None:
    """Changing any byte of a sealed value (version, nonce, ciphertext or tag) makes open fail."""
    sealed = box.seal(SECRET)
    for i in range(len(sealed)):
        tampered = sealed[:i] + bytes([sealed[i] ^ 0x01]) + sealed[i + 1 :]
        with pytest.raises(SecretBoxError):
            box.open(tampered)


def test_a_value_sealed_under_another_key_does_not_open(box: SecretBox) -> None:
    """A box with a different key refuses the sealed value."""
    with pytest.raises(SecretBoxError, match="another"):
        SecretBox(generate_key()).open(box.seal(SECRET))


def test_associated_data_must_match(box: SecretBox) -> None:
    """A secret sealed with associated data opens only with the same associated data."""
    sealed = box.seal(SECRET, associated_data=b"idp_refresh_token")
    assert box.open(sealed, associated_data=b"idp_refresh_token") == SECRET
    with pytest.raises(SecretBoxError):
        box.open(sealed)
    with pytest.raises(SecretBoxError):
        box.open(sealed, associated_data=b"something-else")


def test_truncated_and_unknown_version_values_are_refused(box: SecretBox) -> None:
    """Values too short to hold a nonce and tag, or with another version byte, are refused with a reason."""
    sealed = box.seal(SECRET)
    with pytest.raises(SecretBoxError, match="truncated"):
        box.open(sealed[: 1 + NONCE_BYTES + TAG_BYTES - 1])
    with pytest.raises(SecretBoxError, match="truncated"):
        box.open(b"")
    with pytest.raises(SecretBoxError, match="version 2"):
        box.open(bytes([2]) + sealed[1:])


def test_generated_keys_are_unpadded_base64url_of_32_random_bytes() -> None:
    """generate_key gives distinct URL-safe keys decoding to 32 bytes, accepted with or without padding."""
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert "=" not in key and "+" not in key and "/" not in key
        assert len(base64.urlsafe_b64decode(key + "=")) == 32
    key = keys.pop()
    sealed = SecretBox(key).seal(SECRET)
    assert SecretBox(key + "=").open(sealed) == SECRET


@pytest.mark.parametrize(
    "key",
    [
        "",
        "not base64 at all!",
        base64.urlsafe_b64encode(bytes(16)).decode(),  # AES-128 sized
        base64.urlsafe_b64encode(bytes(33)).decode(),
        base64.b64encode(b"\xfb" * 32).decode(),  # standard alphabet ('+', '/'), not base64url
    ],
)
def test_malformed_keys_are_refused_naming_the_setting(key: str) -> None:
    """A key that is not base64url of 32 bytes raises SecretBoxError naming sessions.encryption_key."""
    with pytest.raises(SecretBoxError, match=r"sessions\.encryption_key"):
        SecretBox(key)


def test_secretbox_errors_are_gateway_errors() -> None:
    """SecretBoxError belongs to the gateway's exception hierarchy."""
    assert issubclass(SecretBoxError, GatewayError)
