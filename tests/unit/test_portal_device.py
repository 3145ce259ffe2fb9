"""Device-flow helpers: user and device codes, normalisation, hashing and the per-IP rate limiter."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from authz.signin.portal.device import (
    USER_CODE_ALPHABET,
    RateLimiter,
    format_user_code,
    generate_device_code,
    generate_secret,
    generate_user_code,
    normalise_user_code,
    same_secret,
    secret_hash,
)

SHAPE = re.compile(f"^[{USER_CODE_ALPHABET}]{{4}}-[{USER_CODE_ALPHABET}]{{4}}$")


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_alphabet_is_twenty_consonants() -> None:
    """The user-code alphabet is RFC 8628 §6.1's base-20 set: 20 distinct consonants, no vowels."""
    assert len(USER_CODE_ALPHABET) == 20
    assert len(set(USER_CODE_ALPHABET)) == 20
    assert not set(USER_CODE_ALPHABET) & set("AEIOUY0123456789")


def test_user_codes_have_the_shape_and_vary() -> None:
    """Generated user codes are XXXX-XXXX over the alphabet, and every letter shows up."""
    codes = {generate_user_code() for _ in range(500)}
    assert all(SHAPE.match(code) for code in codes)
    assert len(codes) > 490
    assert set("".join(codes).replace("-", "")) == set(USER_CODE_ALPHABET)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("WDJB-MJHT", "WDJBMJHT"),
        ("wdjb-mjht", "WDJBMJHT"),
        ("wdjbmjht", "WDJBMJHT"),
        (" WDJB MJHT ", "WDJBMJHT"),
        ("W-D-J-B-M-J-H-T", "WDJBMJHT"),
    ],
)
def test_normalise_forgives_case_and_separators(raw: str, expected: str) -> None:
    """Case, hyphens and spaces are ignored when a user types the code; the stored form has no dash."""
    assert normalise_user_code(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "WDJB-MJH", "WDJB-MJHTX", "WDJB-MJH0", "WDJA-MJHT", "WDJB_MJHT", "WDJB-MJHŤ", "W" * 100, "<b>-</b>"],
)
def test_normalise_maps_nothing_else(raw: str) -> None:
    """Wrong lengths, vowels, digits, other punctuation and look-alikes are refused, not mapped."""
    assert normalise_user_code(raw) is None


def test_generated_codes_normalise_to_themselves() -> None:
    """What the client displays is accepted back as typed, and stored without the dash."""
    for _ in range(50):
        code = generate_user_code()
        assert normalise_user_code(code) == code.replace("-", "")
        assert format_user_code(code.replace("-", "")) == code


def test_format_user_code() -> None:
    """Eight characters are displayed in two groups of four."""
    assert format_user_code("WDJBMJHT") == "WDJB-MJHT"


def test_device_code_has_256_bits() -> None:
    """Device codes decode to 32 random bytes and are URL-safe."""
    code = generate_device_code()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", code)
    assert len(base64.urlsafe_b64decode(code + "=" * (-len(code) % 4))) == 32
    assert generate_device_code() != code
    assert len(generate_secret()) >= 43


def test_secret_hash() -> None:
    """Secrets are stored as the SHA-256 digest of their UTF-8 text."""
    assert secret_hash("abc") == hashlib.sha256(b"abc").digest()


def test_same_secret() -> None:
    """CSRF tokens compare equal only when identical."""
    assert same_secret("abc", "abc")
    assert not same_secret("abc", "abd")
    assert not same_secret("abc", "")


def test_rate_limiter_bursts_then_refuses() -> None:
    """A key may spend its per-minute budget at once, then is refused until the bucket refills."""
    clock = Clock()
    limiter = RateLimiter(3, clock)
    assert [limiter.allow("1.2.3.4") for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after("1.2.3.4") == 20
    clock.t += 19.9
    assert not limiter.allow("1.2.3.4")
    clock.t += 0.2
    assert limiter.allow("1.2.3.4")
    assert not limiter.allow("1.2.3.4")


def test_rate_limiter_keys_are_independent() -> None:
    """One address exhausting its budget does not affect another."""
    limiter = RateLimiter(1, Clock())
    assert limiter.allow("a")
    assert not limiter.allow("a")
    assert limiter.allow("b")
    assert limiter.retry_after("b") == 60


def test_rate_limiter_refill_is_capped() -> None:
    """A long idle period refills the bucket only up to the per-minute budget."""
    clock = Clock()
    limiter = RateLimiter(2, clock)
    assert limiter.allow("a")
    clock.t += 3600
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]


def test_rate_limiter_bounds_its_memory() -> None:
    """Least recently used keys are dropped beyond max_keys (and start afresh when seen again)."""
    limiter = RateLimiter(1, Clock(), max_keys=2)
    assert limiter.allow("a")
    assert limiter.allow("b")
    assert limiter.allow("c")
    assert limiter.allow("a")
    assert not limiter.allow("c")


def test_rate_limiter_rejects_a_zero_budget() -> None:
    """A non-positive budget is a configuration mistake."""
    with pytest.raises(ValueError, match="per_minute"):
        RateLimiter(0, Clock())
