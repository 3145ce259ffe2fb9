"""What a request may cost, estimated before it is sent: the amount admission reserves. Pure.

Input: the declared body length at about four bytes per token (``BYTES_PER_INPUT_TOKEN``), priced
at the dearest input rate of the model (a 1-hour cache write, twice the base input price), since the
gateway cannot tell beforehand what the upstream will cache. Output: the request's ``max_tokens``,
which the upstream never exceeds, at the output price. The estimate is an upper bound for the
output, and for the input whenever the text runs at four bytes a token or more (English prose and
code do; JSON framing, base64 images and tool schemas add bytes, not tokens).
"""

from __future__ import annotations

import re
from decimal import ROUND_UP, Decimal

from authz.billing.accounting import BYTES_PER_INPUT_TOKEN
from authz.billing.pricing import PriceBook

# Used when no max_tokens can be read (not in the part of the body ext_authz receives, or
# spelled with escapes): the largest output of current models, so the estimate stays an upper bound.
FALLBACK_MAX_TOKENS = 128_000
# Every occurrence of a "max_tokens" key with a number: the top-level one is among them (nested
# ones, in a tool's schema or input, can only raise the maximum taken below, never lower it).
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d{1,12})')
_QUANTUM = Decimal("0.00000001")
# Every string value of a "model" key: a Messages body names its model there (nested ones, in a
# tool's input say, can only make the dearest model taken below dearer, never cheaper).
_MODEL = re.compile(rb'"model"\s*:\s*"([A-Za-z0-9._:@/-]{1,200})"')


def max_tokens_of(body: bytes) -> int | None:
    """The largest ``"max_tokens": N`` in a JSON request body, or None if none is found.

    A scan, not a parse: ext_authz may see only the first part of a large body, and parsing a
    60 KB conversation per request would cost more than the rest of admission together.
    """
    # The literal prefix makes the regex engine skip ahead at memory speed (about 20 us for 60 KB).
    found = [int(m) for m in _MAX_TOKENS.findall(body)]
    return max(found) if found else None


def dearest_model(prices: PriceBook, body: bytes, *, regional: bool) -> str | None:
    """The dearest model a JSON body names in a ``"model"`` key (the Messages API puts the model in
    the body, where ext_authz sees only a prefix), or None if it names none: the estimate then takes
    the fallback price. A scan, like :func:`max_tokens_of`."""
    named = {m.decode("ascii") for m in _MODEL.findall(body)}
    if not named:
        return None
    dearest: str = max(sorted(named), key=lambda model: sum(prices.ceiling_rates(model, regional=regional)))
    return dearest


def estimate_usd(
    prices: PriceBook,
    model: str | None,
    *,
    regional: bool,
    request_bytes: int,
    max_tokens: int | None,
) -> Decimal:
    """The reservation for one request: input from the body size at the model's dearest input rate,
    output from ``max_tokens`` (or :data:`FALLBACK_MAX_TOKENS`) at its output rate."""
    input_rate, output_rate = prices.ceiling_rates(model or "unknown", regional=regional)
    input_tokens = max(0, request_bytes) // BYTES_PER_INPUT_TOKEN
    output = FALLBACK_MAX_TOKENS if max_tokens is None else min(max_tokens, FALLBACK_MAX_TOKENS)
    return (input_tokens * input_rate + output * output_rate).quantize(_QUANTUM, rounding=ROUND_UP)
