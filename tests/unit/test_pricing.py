"""Prices per model family and the cost of one request, checked against hand-computed values."""

from __future__ import annotations

from decimal import Decimal

import pytest

from authz.billing.pricing import PriceBook, generation, regional_premium_applies
from authz.configtypes import Price, Pricing
from backends.usage import Usage

BOOK = PriceBook()


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [
        ("claude-opus-4-5-20251101", 5.0, 25.0),
        ("claude-opus-4-6", 5.0, 25.0),
        ("claude-opus-5", 5.0, 25.0),
        ("claude-opus-5-20260301", 5.0, 25.0),
        ("claude-opus-5-5", 4.0, 20.0),
        ("claude-opus-5-5-20260901", 4.0, 20.0),
        ("claude-sonnet-4-5-20250929", 3.0, 15.0),
        ("claude-sonnet-4-6", 3.0, 15.0),
        ("claude-sonnet-5", 2.0, 10.0),
        ("claude-haiku-4-5-20251001", 1.0, 5.0),
    ],
)
def test_builtin_prices_by_longest_component_prefix(
    model: str, input_price: float, output_price: float
) -> None:
    """Each built-in family is found by whole-component prefix; opus-5 never captures opus-5-5."""
    price, known = BOOK.price_for(model)
    assert known
    assert (price.input, price.output) == (input_price, output_price)


@pytest.mark.parametrize(
    "model", ["claude-opus-55", "claude-opus-4", "claude-opus-4-20250514", "gpt-4", "claude"]
)
def test_unknown_models_get_the_fallback(model: str) -> None:
    """Ids that no prefix matches component-wise are priced at the non-zero fallback."""
    price, known = BOOK.price_for(model)
    assert not known
    assert price == Pricing().fallback


def test_config_overrides_and_extends_builtins() -> None:
    """Configured prices replace built-ins of the same prefix and add new families."""
    cheap = Price(0.5, 1.0, 0.6, 1.0, 0.05)
    book = PriceBook(
        Pricing(models=(("claude-haiku-4-5", cheap), ("claude-3-5-sonnet", Price(3, 15, 3.75, 6, 0.3))))
    )
    assert book.price_for("claude-haiku-4-5-20251001") == (cheap, True)
    assert book.price_for("claude-3-5-sonnet-20241022")[1]
    assert book.price_for("claude-opus-5-5")[0].input == 4.0


def test_plain_input_and_output_cost() -> None:
    """Sonnet 4.5 globally: 1M input at $3 plus 200k output at $15 = $6."""
    usage = Usage(input_tokens=1_000_000, output_tokens=200_000)
    assert BOOK.cost_usd("claude-sonnet-4-5-20250929", usage, regional=False) == Decimal("6.00000000")


def test_cache_split_is_priced_per_duration() -> None:
    """Opus 4.5: 1000 in*$5 + 500 out*$25 + 2000 5m*$6.25 + 3000 1h*$10 + 10000 read*$0.50, per million.

    = (5000 + 12500 + 12500 + 30000 + 5000) / 1e6 = 0.065
    """
    usage = Usage(
        input_tokens=1000,
        output_tokens=500,
        cache_creation_input_tokens=5000,
        cache_creation_5m_input_tokens=2000,
        cache_creation_1h_input_tokens=3000,
        cache_read_input_tokens=10_000,
    )
    assert BOOK.cost_usd("claude-opus-4-5-20251101", usage, regional=False) == Decimal("0.06500000")


def test_unsplit_cache_writes_are_priced_at_the_5_minute_rate() -> None:
    """Haiku 4.5: 4000 unsplit writes at $1.25 plus 1000 1h writes at $2 = 0.005 + 0.002."""
    usage = Usage(cache_creation_input_tokens=5000, cache_creation_1h_input_tokens=1000)
    assert BOOK.cost_usd("claude-haiku-4-5", usage, regional=False) == Decimal("0.00700000")
    only_total = Usage(cache_creation_input_tokens=4000)
    assert BOOK.cost_usd("claude-haiku-4-5", only_total, regional=False) == Decimal("0.00500000")


def test_regional_premium() -> None:
    """Opus 5.5 regional: (12345*$4 + 678*$20 + 999*$0.20) / 1e6 = 0.0631398, times 1.1 = 0.06945378."""
    usage = Usage(input_tokens=12_345, output_tokens=678, cache_read_input_tokens=999)
    assert BOOK.cost_usd("claude-opus-5-5", usage, regional=False) == Decimal("0.06313980")
    assert BOOK.cost_usd("claude-opus-5-5", usage, regional=True) == Decimal("0.06945378")


def test_configured_premium_and_rounding() -> None:
    """A 25% premium on Sonnet 5: 7 in*$2 + 3 out*$10 = 44e-6, times 1.25 = 0.000055."""
    book = PriceBook(Pricing(regional_premium=0.25))
    usage = Usage(input_tokens=7, output_tokens=3)
    assert book.cost_usd("claude-sonnet-5", usage, regional=True) == Decimal("0.00005500")
    # 5 tokens at $0.001 per million = 0.000000005: rounds half up to 0.00000001 at 8 places.
    tiny = PriceBook(Pricing(models=(("tiny", Price(0.001, 0.001, 0.001, 0.001, 0.001)),)))
    assert tiny.cost_usd("tiny", Usage(input_tokens=5), regional=False) == Decimal("0.00000001")
    assert tiny.cost_usd("tiny", Usage(input_tokens=4), regional=False) == Decimal("0E-8")


def test_no_premium_for_models_before_4_5() -> None:
    """Older generations cost the same on regional endpoints (configured price, no premium)."""
    book = PriceBook(Pricing(models=(("claude-3-5-sonnet", Price(3, 15, 3.75, 6, 0.3)),)))
    usage = Usage(input_tokens=1_000_000)
    assert book.cost_usd("claude-3-5-sonnet-20241022", usage, regional=True) == Decimal("3.00000000")


def test_fallback_price_for_unknown_models_with_premium() -> None:
    """Unknown ids use the fallback ($5/$25) and, generation unknown, get the premium to stay safe."""
    usage = Usage(input_tokens=100_000, output_tokens=10_000)
    # 100k*$5 + 10k*$25 = 0.5 + 0.25 = 0.75
    model = "application-inference-profile/abc123"
    assert BOOK.cost_usd(model, usage, regional=False) == Decimal("0.75000000")
    assert BOOK.cost_usd(model, usage, regional=True) == Decimal("0.82500000")
    custom = PriceBook(Pricing(fallback=Price(10, 50, 12.5, 20, 1)))
    assert custom.cost_usd("mystery", usage, regional=False) == Decimal("1.50000000")


@pytest.mark.parametrize(
    ("model", "gen"),
    [
        ("claude-opus-4-5-20251101", (4, 5)),
        ("claude-opus-4-20250514", (4, 0)),
        ("claude-opus-5-5", (5, 5)),
        ("claude-sonnet-5", (5, 0)),
        ("claude-3-5-sonnet-20241022", (3, 5)),
        ("claude-3-haiku-20240307", (3, 0)),
        ("application-inference-profile/x", None),
    ],
)
def test_generation(model: str, gen: tuple[int, int] | None) -> None:
    """The generation is read from both the 4.x and the 3.x naming schemes; dates are not minors."""
    assert generation(model) == gen


def test_premium_applies_from_4_5() -> None:
    """The regional premium starts at the 4.5 generation."""
    assert regional_premium_applies("claude-haiku-4-5")
    assert not regional_premium_applies("claude-sonnet-4-20250514")
    assert not regional_premium_applies("claude-3-7-sonnet-20250219")
