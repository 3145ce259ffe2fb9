"""Sealing small secrets at rest (the IdP's refresh token) with AES-256-GCM.

The key is ``sessions.encryption_key``: 32 random bytes, base64url-encoded (:func:`generate_key`).
A sealed value is ``version (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes)``. The
nonce is random for every seal: 96 random bits keep the collision risk negligible for far more
seals than one key will ever see (NIST SP 800-38D, section 8.2.2). The version byte, and any
``associated_data`` the caller binds the secret to, are authenticated along with the ciphertext.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authz.errors import GatewayError

VERSION = 1
"""The format byte written first; :meth:`SecretBox.open` refuses any other."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = bytes([VERSION])
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class SecretBoxError(GatewayError):
    """A key is malformed, or a sealed value was tampered with, truncated or sealed with another key."""


def generate_key() -> str:
    """A new random key for ``sessions.encryption_key`` (base64url, no padding)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).rstrip(b"=").decode("ascii")


def _decode_key(key: str) -> bytes:
    text = key.strip().rstrip("=")
    try:
        # The alphabet is checked first: the decoder would also take the standard alphabet's + and /.
        if not _BASE64URL.fullmatch(text):
            raise ValueError("not in the base64url alphabet")
        # Padding is optional in the configuration: restore what the decoder needs.
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SecretBoxError(
            "sessions.encryption_key is not base64url; "
            "generate one with authz.signin.secretbox.generate_key()"
        ) from exc
    if len(raw) != KEY_BYTES:
        raise SecretBoxError(
            f"sessions.encryption_key decodes to {len(raw)} bytes, not {KEY_BYTES}; "
            "generate one with authz.signin.secretbox.generate_key()"
        )
    return raw


class SecretBox:
    """Seals and opens small secrets with one AES-256-GCM key."""

    __slots__ = ("_aead",)

    def __init__(self, key: str) -> None:
        """``key`` is the base64url text of 32 bytes; :class:`SecretBoxError` otherwise."""
        self._aead = AESGCM(_decode_key(key))

    def seal(self, plaintext: bytes, *, associated_data: bytes = b"") -> bytes:
        """Encrypt and authenticate ``plaintext``; ``associated_data`` must be given again to open."""
        nonce = os.urandom(NONCE_BYTES)
        return _HEADER + nonce + self._aead.encrypt(nonce, plaintext, _HEADER + associated_data)

    def open(self, sealed: bytes, *, associated_data: bytes = b"") -> bytes:
        """The plaintext of ``sealed``; :class:`SecretBoxError` if it was altered, truncated, sealed
        with another key or other ``associated_data``, or is of an unknown version."""
        if len(sealed) < 1 + NONCE_BYTES + TAG_BYTES:
            raise SecretBoxError("the sealed value is truncated")
        if sealed[0] != VERSION:
            raise SecretBoxError(f"the sealed value has unknown format version {sealed[0]}")
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, _HEADER + associated_data)
        except InvalidTag as exc:
            raise SecretBoxError(
                "the sealed value does not authenticate: tampered with, or sealed under another "
                "sessions.encryption_key"
            ) from exc
