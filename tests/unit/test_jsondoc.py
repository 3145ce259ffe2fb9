"""Managed-settings documents: canonical text as JavaScript's JSON.stringify writes it, and checksums."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from authz.jsondoc import JsonValueError, canonical_json, json_object


def independent_checksum(settings: Any) -> str:
    """The checksum as DESIGN.md states it: SHA-256 of the key-sorted, whitespace-free JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_checksum_equals_an_independent_computation() -> None:
    """For an ordinary settings document the checksum is sha256 of sorted, compact JSON in UTF-8."""
    settings = {
        "permissions": {
            "deny": ["Read(./.env)", "Read(./secrets/**)"],
            "disableBypassPermissionsMode": "disable",
        },
        "env": {"CLAUDE_CODE_ENABLE_TELEMETRY": "1", "OTEL_METRICS_EXPORTER": "otlp"},
        "allowManagedPermissionRulesOnly": True,
        "cleanupPeriodDays": 30,
        "companyAnnouncements": ["Café ☕ — welcome", "line\nbreak"],
        "statusLine": None,
    }
    document = json_object(settings)
    assert document.checksum == independent_checksum(settings)
    assert document.value() == settings
    assert json_object({}).checksum == "sha256:" + hashlib.sha256(b"{}").hexdigest()


def test_key_order_does_not_change_the_document() -> None:
    """Documents that differ only in key order are equal, hash alike and have one checksum."""
    a = json_object({"b": {"y": 1, "x": [2, 1]}, "a": "z"})
    b = json_object({"a": "z", "b": {"x": [2, 1], "y": 1}})
    assert a == b and hash(a) == hash(b) and a.checksum == b.checksum
    assert a != json_object({"a": "z", "b": {"x": [1, 2], "y": 1}})  # list order is content


# Each expected text was produced by Node's JSON.stringify over the key-sorted object.
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Integer-like keys come first in numeric order, as a JavaScript object enumerates them.
        ({"b": 1, "10": 1, "2": 2, "02": 3, "-1": 4}, '{"2":2,"10":1,"-1":4,"02":3,"b":1}'),
        ({"4294967295": 2, "4294967294": 1, "1": 3}, '{"1":3,"4294967294":1,"4294967295":2}'),
        # Keys sort by UTF-16 code units: an astral character sorts before U+FF5E.
        ({"\uff5e": 1, "\U0001f600": 2}, '{"\U0001f600":2,"\uff5e":1}'),
        # No \u escapes but for control characters; U+2028 and DEL stay as they are.
        (
            {"k": 'a\u0001b\u001f\t\n"\\ \u2028\u007f é'},
            '{"k":"a\\u0001b\\u001f\\t\\n\\"\\\\ \u2028\u007f é"}',
        ),
        # ECMAScript Number::toString.
        (
            {"n": [1e21, 1e-7, 0.000001, 1.2345678901234568e20, 0.1, 1.5e300, -2.5e-10, 5e-324, -0.0]},
            '{"n":[1e+21,1e-7,0.000001,123456789012345680000,0.1,1.5e+300,-2.5e-10,5e-324,0]}',
        ),
    ],
)
def test_canonical_text_is_what_json_stringify_writes(value: dict[str, Any], expected: str) -> None:
    """The canonical text matches JavaScript's, which is what Claude Code hashes for If-None-Match."""
    assert json_object(value).canonical == expected


def test_integral_floats_are_written_as_integers() -> None:
    """1.0 from YAML is the number 1, as in JavaScript, so the served JSON round-trips to the checksum."""
    document = json_object({"ratio": 1.0, "big": 2.0**52})
    assert document.canonical == '{"big":4503599627370496,"ratio":1}'
    assert document.checksum == independent_checksum(document.value())


@pytest.mark.parametrize(
    ("value", "path", "problem"),
    [
        ([1], "", "expected a mapping"),
        ({"a": {2: "x"}}, ".a", "not a string"),
        ({"a": [1, float("nan")]}, ".a[1]", "not a JSON number"),
        ({"a": 2**53}, ".a", "2^53"),
        ({"a": "\ud800"}, ".a", "unpaired surrogate"),
        ({"a": b"bytes"}, ".a", "not JSON data"),
    ],
)
def test_values_json_cannot_carry_exactly_are_refused(value: Any, path: str, problem: str) -> None:
    """Non-string keys, NaN, unsafe integers, lone surrogates and non-JSON types name their place."""
    with pytest.raises(JsonValueError) as info:
        json_object(value)
    assert info.value.path == path and problem in info.value.problem


def test_canonical_json_refuses_what_it_cannot_write() -> None:
    """canonical_json is only for checked data: anything else is a TypeError, not a guess."""
    with pytest.raises(TypeError):
        canonical_json({"a": {1, 2}})
