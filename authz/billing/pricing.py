"""Prices as data, and the cost of one request. Pure, no I/O.

List prices are USD per million tokens (DESIGN.md, "Policy and money"). A price applies to a
model family: the longest built-in or configured prefix of the canonical id wins, matched on
whole dash-separated components so ``claude-opus-5`` never captures ``claude-opus-5-5``.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

from authz.configtypes import Price, Pricing
from backends.usage import Usage

_OPUS_45 = Price(5.0, 25.0, 6.25, 10.0, 0.50)
_OPUS_55 = Price(4.0, 20.0, 5.0, 8.0, 0.20)
_SONNET_45 = Price(3.0, 15.0, 3.75, 6.0, 0.30)
_SONNET_5 = Price(2.0, 10.0, 2.50, 4.0, 0.20)
_HAIKU_45 = Price(1.0, 5.0, 1.25, 2.0, 0.10)

BUILTIN_PRICES: tuple[tuple[str, Price], ...] = (
    ("claude-opus-4-5", _OPUS_45),
    ("claude-opus-4-6", _OPUS_45),
    ("claude-opus-5", _OPUS_45),
    ("claude-opus-5-5", _OPUS_55),
    ("claude-sonnet-4-5", _SONNET_45),
    ("claude-sonnet-4-6", _SONNET_45),
    ("claude-sonnet-5", _SONNET_5),
    ("claude-haiku-4-5", _HAIKU_45),
)

_PER_MILLION = Decimal(1_000_000)
_QUANTUM = Decimal("0.00000001")

# `claude-{family}-{major}[-{minor}]` (4.x onwards) and `claude-{major}[-{minor}]-{family}` (3.x).
# The minor is one or two digits so an 8-digit snapshot date is never read as a version.
_NEW_STYLE = re.compile(r"^claude-(?:opus|sonnet|haiku)-(\d{1,2})(?:-(\d{1,2}))?(?:-|$)")
_OLD_STYLE = re.compile(r"^claude-(\d{1,2})(?:-(\d{1,2}))?-(?:opus|sonnet|haiku)(?:-|$)")
_PREMIUM_FROM = (4, 5)


def _decimal(value: float) -> Decimal:
    # Through str: Decimal(0.1) would carry the binary float's error into the bill.
    return Decimal(str(value))


def generation(canonical: str) -> tuple[int, int] | None:
    """``(major, minor)`` model generation read from a canonical id, or None if unrecognisable."""
    match = _NEW_STYLE.match(canonical) or _OLD_STYLE.match(canonical)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def regional_premium_applies(canonical: str) -> bool:
    """Whether regional endpoints cost more for this model (4.5-generation and later).

    An id whose generation cannot be read (an application inference profile, a new naming
    scheme) gets the premium: overestimating keeps spend caps safe.
    """
    gen = generation(canonical)
    return gen is None or gen >= _PREMIUM_FROM


class PriceBook:
    """Built-in list prices, overridden and extended by ``pricing.models``, with a fallback."""

    __slots__ = ("_fallback", "_premium", "_prices", "_rates")

    def __init__(self, pricing: Pricing | None = None) -> None:
        pricing = pricing if pricing is not None else Pricing()
        table: dict[tuple[str, ...], Price] = {}
        for prefix, price in (*BUILTIN_PRICES, *pricing.models):
            table[tuple(prefix.lower().split("-"))] = price
        # Longest prefix first, so the first component-wise match is the most specific one.
        self._prices = sorted(table.items(), key=lambda item: len(item[0]), reverse=True)
        self._fallback = pricing.fallback
        self._premium = _decimal(pricing.regional_premium)
        self._rates: dict[tuple[str, bool], tuple[Decimal, Decimal]] = {}

    def price_for(self, canonical: str) -> tuple[Price, bool]:
        """The price of a canonical model id and whether it was known (False: the fallback)."""
        parts = tuple(canonical.lower().split("-"))
        for prefix, price in self._prices:
            if parts[: len(prefix)] == prefix:
                return price, True
        return self._fallback, False

    def ceiling_rates(self, canonical: str, *, regional: bool) -> tuple[Decimal, Decimal]:
        """USD per token of ``canonical``'s dearest input (plain or a 5-minute or 1-hour cache write)
        and of its output, the regional premium included: what a spend reservation is priced at.
        Cached per model: admission asks for every capped request."""
        key = (canonical, regional)
        rates = self._rates.get(key)
        if rates is None:
            price, _ = self.price_for(canonical)
            scale = (
                1 + self._premium if regional and regional_premium_applies(canonical.lower()) else Decimal(1)
            )
            dearest = max(price.input, price.cache_write_5m, price.cache_write_1h)
            rates = (_decimal(dearest) * scale / _PER_MILLION, _decimal(price.output) * scale / _PER_MILLION)
            if len(self._rates) > 1024:
                self._rates.clear()  # model ids come from clients: keep the cache bounded
            self._rates[key] = rates
        return rates

    def cost_usd(self, canonical: str, usage: Usage, *, regional: bool) -> Decimal:
        """The USD cost of ``usage`` on ``canonical``, quantized to 8 decimal places.

        Cache writes reported without the 5-minute/1-hour split (the part of
        ``cache_creation_input_tokens`` not covered by the split fields) are priced at the
        5-minute rate. Regional endpoints add ``regional_premium`` for 4.5-generation models and
        later.
        """
        price, _ = self.price_for(canonical)
        w5 = max(0, usage.cache_creation_5m_input_tokens)
        w1 = max(0, usage.cache_creation_1h_input_tokens)
        unsplit = max(0, usage.cache_creation_input_tokens - w5 - w1)
        total = (
            max(0, usage.input_tokens) * _decimal(price.input)
            + max(0, usage.output_tokens) * _decimal(price.output)
            + (w5 + unsplit) * _decimal(price.cache_write_5m)
            + w1 * _decimal(price.cache_write_1h)
            + max(0, usage.cache_read_input_tokens) * _decimal(price.cache_read)
        ) / _PER_MILLION
        if regional and regional_premium_applies(canonical.lower()):
            total *= 1 + self._premium
        return total.quantize(_QUANTUM, rounding=ROUND_HALF_UP)
