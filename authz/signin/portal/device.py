"""Pure helpers for the device authorization grant (RFC 8628): codes, hashes, rate limiting.

Nothing here performs I/O or reads the clock on its own: the rate limiter takes a clock, so the
tests drive time explicitly (STYLE.md, habit 2).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# RFC 8628 §6.1: a user code from a base-20 alphabet of consonants has no vowels (so it spells no
# words) and avoids characters that look alike; 20^8 ≈ 2^34.6 codes. Only the case and the
# separator are forgiven when a user types it (§6.1: "case-insensitive and ... punctuation
# ignored"); no other look-alike mapping is applied.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_GROUP = 4
USER_CODE_LENGTH = 2 * USER_CODE_GROUP

# RFC 8628 §5.2 and §6.1 ask for a device code with enough entropy that it cannot be guessed during
# its lifetime; 32 random bytes are 256 bits.
DEVICE_CODE_BYTES = 32

_USER_CODE_CHARS = frozenset(USER_CODE_ALPHABET)


def generate_user_code() -> str:
    """A fresh user code in the ``WDJB-MJHT`` shape, drawn with :mod:`secrets`."""
    chars = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return format_user_code(chars)


def format_user_code(chars: str) -> str:
    """Insert the display separator into eight code characters (``WDJBMJHT`` -> ``WDJB-MJHT``)."""
    return f"{chars[:USER_CODE_GROUP]}-{chars[USER_CODE_GROUP:]}"


def normalise_user_code(raw: str) -> str | None:
    """The stored form (``WDJBMJHT``) of what a user typed, or None if it cannot be a user code.

    Upper-cases and drops hyphens and spaces (RFC 8628 §6.1); every remaining character must be in
    :data:`USER_CODE_ALPHABET`. Input is bounded before any work is done on it.
    """
    if len(raw) > 64:
        return None
    chars = "".join(ch for ch in raw.upper() if ch not in "- \t")
    if len(chars) != USER_CODE_LENGTH or not set(chars) <= _USER_CODE_CHARS:
        return None
    return chars


def generate_device_code() -> str:
    """A fresh device code: 256 random bits, URL-safe base64 without padding (RFC 8628 §3.2)."""
    return secrets.token_urlsafe(DEVICE_CODE_BYTES)


def generate_secret() -> str:
    """A fresh opaque 256-bit secret (refresh tokens, CSRF and browser-binding cookies)."""
    return secrets.token_urlsafe(32)


def secret_hash(value: str) -> bytes:
    """SHA-256 of ``value`` (UTF-8): the only form in which device codes, refresh tokens and the
    browser-binding cookie are stored or looked up.

    Device codes, refresh tokens and browser cookies are high-entropy random values, so a plain
    (unsalted) hash is enough to keep a database reader from replaying them (RFC 6819 §5.1.4.1.3).
    """
    return hashlib.sha256(value.encode("utf-8")).digest()


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (CSRF tokens)."""
    return secrets.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key (client IP): ``per_minute`` attempts, refilled continuously.

    RFC 8628 §5.1 asks the verification page to rate-limit user-code entry, since 8 characters of
    a 20-letter alphabet can be brute-forced otherwise. Each key may burst up to ``per_minute``
    attempts and regains one every ``60 / per_minute`` seconds. At most ``max_keys`` keys are kept
    (least recently used first out), so a flood of addresses cannot exhaust memory.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float], *, max_keys: int = 10000) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _refilled(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._capacity, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self._capacity, bucket.tokens + elapsed * self._rate)
            bucket.updated = now
        return bucket

    def allow(self, key: str) -> bool:
        """Spend one attempt for ``key``; False when its bucket is empty."""
        bucket = self._refilled(key)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def retry_after(self, key: str) -> int:
        """Whole seconds until ``key`` may try again (0 when it may now)."""
        bucket = self._refilled(key)
        if bucket.tokens >= 1.0:
            return 0
        # The epsilon keeps float noise (60.000000001) from adding a whole second.
        return max(1, math.ceil((1.0 - bucket.tokens) / self._rate - 1e-9))
