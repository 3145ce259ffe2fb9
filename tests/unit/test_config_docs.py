"""docs/configuration.md documents every configuration key, its default and the built-in prices,
and its example config loads."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest

from authz.billing.pricing import BUILTIN_PRICES
from authz.config import loads
from authz.configtypes import GatewayConfig, Upstream
from backends.kinds import KINDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Path notation shared with the doc: a mapping whose keys the operator chooses is written
# `.<name>` (or `.<model>` where the key is a model id), a list of sections `[]`.
PLACEHOLDERS = {"upstreams": "<name>", "models": "<model>", "model_map": "<model>"}
REQUIRED = "required"

# `| `key` | type | default | what it does |`: the first three cells of a reference-table row.
_ROW = re.compile(r"^\|\s*`(?P<key>[^`]+)`\s*\|(?P<type>[^|]*)\|(?P<default>[^|]*)\|", re.MULTILINE)
_CODE = re.compile(r"`([^`]*)`")
_FENCE = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)
_REF = re.compile(r"\$\{([^}]+)\}")


@dataclasses.dataclass(frozen=True)
class Key:
    """One YAML key: its dotted path, whether it holds a section, and its default as the doc writes it."""

    path: str
    section: bool
    default: str


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _mapping_value(tp: Any) -> Any | None:
    """The value type of a ``tuple[tuple[str, V], ...]`` field (a YAML mapping), else None."""
    if get_origin(tp) is not tuple:
        return None
    item = get_args(tp)[0]
    if get_origin(item) is tuple and len(get_args(item)) == 2 and get_args(item)[0] is str:
        return get_args(item)[1]
    return None


def _render(value: Any, mapping: bool) -> str:
    if mapping and value == ():
        return "{}"
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def walk(cls: Any, prefix: str = "", parent: Any = None) -> Iterator[Key]:
    """Every key under dataclass ``cls``; ``parent`` is the instance a default factory built, if any."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if parent is not None:
            value = getattr(parent, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = REQUIRED
        tp = _strip_optional(hints[f.name])
        mapped = _mapping_value(tp)
        item = get_args(tp)[0] if get_origin(tp) is tuple else None
        if mapped is Upstream:
            # The `kind` picks the settings type the rest of the section builds into.
            yield Key(path, True, "")
            yield Key(f"{path}.<name>.kind", False, REQUIRED)
            for name, kind in KINDS.items():
                yield Key(f"{path}.<name:{name}>", True, "")
                yield from walk(kind.settings_type, f"{path}.<name:{name}>.")
        elif dataclasses.is_dataclass(tp):
            yield Key(path, True, "")
            yield from walk(tp, f"{path}.", value if dataclasses.is_dataclass(value) else None)
        elif mapped is not None and dataclasses.is_dataclass(mapped):
            yield Key(path, True, "")
            yield from walk(mapped, f"{path}.{PLACEHOLDERS.get(f.name, '<key>')}.")
        elif item is not None and mapped is None and dataclasses.is_dataclass(item):
            yield Key(path, True, "")
            yield from walk(item, f"{path}[].")
        else:
            yield Key(path, False, REQUIRED if value is REQUIRED else _render(value, mapped is not None))


KEYS = list(walk(GatewayConfig))
TEXT = DOC.read_text(encoding="utf-8")
ROWS = {m["key"]: m for m in _ROW.finditer(TEXT)}
TOP_LEVEL = {f.name for f in dataclasses.fields(GatewayConfig)}


def test_walk_uses_the_documented_notation() -> None:
    """The schema walk yields the path notation the doc explains (guards the walker itself)."""
    paths = {k.path for k in KEYS}
    for path in (
        "listen.envoy.port",
        "sessions.signing_key.kid",
        "sessions.verify_keys[].public_key",
        "upstreams.<name>.kind",
        "upstreams.<name:bedrock>.credentials.role_arn",
        "upstreams.<name:vertex>.model_map",
        "policies[].models",
        "pricing.models.<model>.input",
        "pricing.fallback.cache_read",
        "workers",
    ):
        assert path in paths


@pytest.mark.parametrize("key", [k for k in KEYS if not k.section], ids=lambda k: k.path)
def test_every_key_has_a_row_with_its_default(key: Key) -> None:
    """Each leaf key has a table row whose default cell starts with the schema's default."""
    row = ROWS.get(key.path)
    assert row is not None, f"docs/configuration.md has no `| `{key.path}` | ... |` row"
    cell = row["default"].strip()
    if key.default == REQUIRED:
        assert cell.lower().startswith(REQUIRED), f"{key.path}: default cell should say required"
    else:
        code = _CODE.match(cell)
        assert code is not None and code.group(1) == key.default, (
            f"{key.path}: default cell {cell!r} should start with `{key.default}`"
        )


@pytest.mark.parametrize("key", [k for k in KEYS if k.section], ids=lambda k: k.path)
def test_every_section_is_named(key: Key) -> None:
    """Each section (a mapping, list or optional block of keys) is named in backticks in the doc."""
    assert f"`{key.path}`" in TEXT


def test_no_row_documents_a_key_that_does_not_exist() -> None:
    """Every reference row whose key starts with a top-level section is a real key (catches renames)."""
    known = {k.path for k in KEYS}
    stale = [k for k in ROWS if re.split(r"[.\[]", k, maxsplit=1)[0] in TOP_LEVEL and k not in known]
    assert stale == []


@pytest.mark.parametrize(("prefix", "price"), BUILTIN_PRICES, ids=[p for p, _ in BUILTIN_PRICES])
def test_builtin_prices_table_matches_the_code(prefix: str, price: Any) -> None:
    """The built-in price table lists each built-in family with the prices authz/billing/pricing.py uses."""
    row = re.search(rf"^\|\s*`{re.escape(prefix)}`\s*\|(.*)\|\s*$", TEXT, re.MULTILINE)
    assert row is not None, f"no built-in price row for {prefix}"
    cells = [float(c.strip()) for c in row.group(1).split("|")]
    assert cells == [price.input, price.output, price.cache_write_5m, price.cache_write_1h, price.cache_read]


def test_example_config_loads(tmp_path: Path) -> None:
    """The first yaml block loads, given its env vars without defaults and its ${file:} secrets."""
    match = _FENCE.search(TEXT)
    assert match is not None, "docs/configuration.md has no ```yaml block"
    example = match.group(1)
    environ: dict[str, str] = {}
    for ref in _REF.findall(example):
        if ref.startswith("file:"):
            secret = tmp_path / ref[5:]
            assert not Path(ref[5:]).is_absolute(), "keep example secrets relative to the config file"
            secret.parent.mkdir(parents=True, exist_ok=True)
            secret.write_text(f"placeholder for {ref}\n", encoding="utf-8")
        elif ":-" not in ref:
            environ[ref] = f"placeholder-{ref.lower()}"

    config = loads(example, environ, base_dir=tmp_path)

    sources = {(up.kind, up.settings.credentials.source) for _, up in config.upstreams}  # type: ignore[attr-defined]
    assert {("bedrock", "assume_role"), ("vertex", "service_account_file")} <= sources
    assert len(config.policies) >= 2
    assert config.sessions.signing_key is not None
