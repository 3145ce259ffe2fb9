"""JSON documents carried in the configuration, and their canonical text and checksum.

A policy's ``managed_settings`` is a Claude Code settings document. Claude Code identifies the copy
it holds by ``sha256:`` + the hex SHA-256 of the document serialised with keys sorted at every level
and no whitespace, computed by JavaScript's ``JSON.stringify``, and sends it back as
``If-None-Match`` (code.claude.com/docs/en/llm-gateway-protocol, "Managed settings"). So the
canonical text here is what ``JSON.stringify`` writes for the key-sorted document, byte for byte:
UTF-8 with no ``\\u`` escapes beyond the control characters, numbers in ECMAScript's
``Number::toString`` form, and the key order a rebuilt JavaScript object enumerates (integer-like
keys first, in numeric order, then the rest sorted by UTF-16 code units). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
from decimal import Decimal
from typing import Any

# Integers JavaScript holds exactly (Number.MAX_SAFE_INTEGER); beyond them the client would
# serialise another value than the one configured.
MAX_SAFE_INTEGER = 2**53 - 1
# ECMAScript array indices are the integers 0 .. 2**32 - 2; objects enumerate such keys first.
_MAX_ARRAY_INDEX = 2**32 - 2


class JsonObject:
    """An immutable JSON object (a mapping at the top), kept as its canonical text.

    Build one with :func:`json_object`, which checks the value; equality and hashing follow the
    canonical text, so two documents that differ only in key order are equal.
    """

    __slots__ = ("_text",)

    def __init__(self, canonical_text: str) -> None:
        self._text = canonical_text

    @property
    def canonical(self) -> str:
        """The canonical serialisation (see the module docstring)."""
        return self._text

    @property
    def checksum(self) -> str:
        """``sha256:`` + the hex SHA-256 of the canonical text's UTF-8 bytes."""
        return "sha256:" + hashlib.sha256(self._text.encode("utf-8")).hexdigest()

    def value(self) -> dict[str, Any]:
        """A fresh, mutable copy of the document."""
        parsed: dict[str, Any] = json.loads(self._text)
        return parsed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonObject) and other._text == self._text

    def __hash__(self) -> int:
        return hash(self._text)

    def __repr__(self) -> str:
        return f"JsonObject({self._text})"


class JsonValueError(ValueError):
    """A value that is not plain JSON; ``path`` says where (``.env.FOO``, ``[2]``)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path or '(top)'}: {problem}")


def json_object(value: Any) -> JsonObject:
    """``value`` (a mapping of plain JSON data, as YAML gives it) as a :class:`JsonObject`.

    Raises :class:`JsonValueError` for anything JSON cannot carry exactly: non-string keys, dates,
    binary, NaN or infinity, integers beyond JavaScript's safe range, unpaired surrogates.
    """
    if not isinstance(value, dict):
        raise JsonValueError("", f"expected a mapping, got {type(value).__name__}")
    return JsonObject(canonical_json(_normalise(value, "")))


def canonical_json(value: Any) -> str:
    """The ``JSON.stringify`` text of ``value`` with keys sorted at every level (module docstring).

    ``value`` must already be plain JSON data (:func:`json_object` checks that).
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _js_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)}:{canonical_json(value[k])}" for k in _key_order(value))
        return "{" + ",".join(items) + "}"
    raise TypeError(f"not JSON data: {type(value).__name__}")


def _key_order(obj: dict[str, Any]) -> list[str]:
    # JSON.stringify walks a rebuilt object's own keys: array indices ascending, then the other keys
    # in insertion order, which the client made sorted() order (UTF-16 code units) (ECMA-262
    # OrdinaryOwnPropertyKeys).
    indices = sorted((k for k in obj if _is_array_index(k)), key=int)
    rest = sorted((k for k in obj if not _is_array_index(k)), key=lambda k: k.encode("utf-16-be"))
    return indices + rest


def _is_array_index(key: str) -> bool:
    return (
        key.isascii()
        and key.isdigit()
        and (key == "0" or not key.startswith("0"))
        and (int(key) <= _MAX_ARRAY_INDEX)
    )


def _js_number(x: float) -> str:
    """ECMA-262 Number::toString(x) for a finite float (shortest round-trip digits)."""
    if x == 0:
        return "0"  # also -0, which JavaScript prints as 0
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that round-trip, as JavaScript's algorithm does.
    digits_tuple, exponent = Decimal(repr(abs(x))).as_tuple()[1:]
    assert isinstance(exponent, int)
    digits = "".join(map(str, digits_tuple)).rstrip("0") or "0"
    exponent += len(digits_tuple) - len(digits)
    k = len(digits)
    n = exponent + k  # the decimal point sits after n digits
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits[0] + (f".{digits[1:]}" if k > 1 else "")
        text = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return sign + text


def _normalise(value: Any, path: str) -> Any:
    """A plain-JSON copy of ``value``; integral floats become integers (JavaScript has one number
    type, so 1.0 is written 1 either way)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise JsonValueError(path, f"integer {value} is beyond what JSON clients hold exactly (2^53)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise JsonValueError(path, f"{value!r} is not a JSON number")
        if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
            return int(value)
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonValueError(path, "the string holds an unpaired surrogate") from None
        return value
    if isinstance(value, list):
        return [_normalise(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise JsonValueError(path, f"key {key!r} is not a string (quote it in YAML)")
            out[_normalise(key, path)] = _normalise(item, f"{path}.{key}")
        return out
    raise JsonValueError(path, f"{type(value).__name__} is not JSON data (quote dates and times in YAML)")
