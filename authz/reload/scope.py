"""Which configuration keys a reload changes while the gateway runs, and which wait for a restart.

A reload applies the file's live keys and keeps the running value of every restart-only key; the
restart-only keys the file changed are named in the reload's log line and in ``/readyz``, so the
operator sees that a restart is still due (docs/configuration.md, "Reloading"). Restart-only are
the keys read once at start-up: the processes and their sockets (``listen``, ``workers``),
everything Envoy's bootstrap is rendered from (``listen``, ``workers``, ``limits``, ``upstreams``,
``telemetry``, ``failover``: Envoy keeps the listener, filters, clusters, retries and tracing it
started with), the
database (``store``), the session keys and the IdP client (``sessions``, ``oidc``), the metrics
pipeline (``telemetry``), the pruner's schedule (``retention``), the portal's public URL (its
cookies and redirect URI) and its code-entry rate limiter. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from authz.configtypes import GatewayConfig, Upstream
from authz.envoy.failover import FORMATS, chain_cluster, servable

RESTART_ONLY: tuple[str, ...] = (
    "listen",
    "workers",
    "sessions",
    "oidc",
    "store",
    "upstreams",
    "limits",
    "failover",
    "telemetry",
    "retention",
    "portal.public_url",
    "portal.user_code_attempts_per_minute",
)
"""Dotted paths of the keys a reload keeps at their running value. Every other key is live."""


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """The dotted paths at which two configuration values differ: a section's changed keys, a
    mapping's (``upstreams``, ``pricing.models``) changed, added or removed entries, a list of
    sections of the same length (``policies``) item by item (``policies[1].models``), anything else
    as a whole."""
    if old == new:
        return []
    if _is_section(old) and type(old) is type(new):
        found: list[str] = []
        for field in dataclasses.fields(old):
            # An upstream's kind-specific keys sit beside `kind` in the file (Upstream.settings).
            inner = (
                where if isinstance(old, Upstream) and field.name == "settings" else _join(where, field.name)
            )
            found += differences(getattr(old, field.name), getattr(new, field.name), inner)
        return found
    if _is_mapping(old) and _is_mapping(new) and (old or new):
        before, after = dict(old), dict(new)
        return [
            path
            for key in sorted(before.keys() | after.keys())
            for path in (
                differences(before[key], after[key], _join(where, key))
                if key in before and key in after
                else [_join(where, key)]
            )
        ]
    if (
        isinstance(old, tuple)
        and isinstance(new, tuple)
        and len(old) == len(new)
        and all(_is_section(item) for item in (*old, *new))
    ):
        return [
            path
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for path in differences(a, b, f"{where}[{i}]")
        ]
    return [where]


def split(running: GatewayConfig, loaded: GatewayConfig) -> tuple[GatewayConfig, tuple[str, ...]]:
    """``loaded`` with every restart-only key at its ``running`` value, and the restart-only paths
    the file changed (what a restart would still apply)."""
    merged = loaded
    pending: list[str] = []
    for path in RESTART_ONLY:
        before, after = _get(running, path), _get(loaded, path)
        if before != after:
            pending += differences(before, after, path)
            merged = _with(merged, path.split("."), before)
    return merged, tuple(pending)


def summary(paths: tuple[str, ...] | list[str], most: int = 8) -> str:
    """``a, b, c and 4 more``: a list of paths short enough for one log line."""
    shown = ", ".join(paths[:most])
    return f"{shown} and {len(paths) - most} more" if len(paths) > most else shown


def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _is_mapping(value: Any) -> bool:
    """The schema's mappings are tuples of ``(name, value)`` pairs (authz.configtypes)."""
    return isinstance(value, tuple) and all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in value
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _get(config: Any, path: str) -> Any:
    value = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _with(section: Any, names: list[str], value: Any) -> Any:
    head, *rest = names
    inner = value if not rest else _with(getattr(section, head), rest, value)
    return dataclasses.replace(section, **{head: inner})


def unrendered_chains(config: GatewayConfig, rendered: frozenset[str]) -> tuple[str, ...]:
    """``policies[i].upstreams`` for each policy whose failover chain (for some client format) has
    no cluster among the ``rendered`` ones: its order applies at once, its failover after a restart
    (until then its first upstream serves alone)."""
    return tuple(
        f"policies[{i}].upstreams"
        for i, policy in enumerate(config.policies)
        if any(
            len(chain) > 1 and chain_cluster(chain) not in rendered
            for chain in (servable(config, policy, client_format) for client_format in FORMATS)
        )
    )
