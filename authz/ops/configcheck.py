"""``authz config check F``: whether a configuration file would start, without starting anything.

Offline: no database, IdP or cloud is contacted and nothing is written. It runs what start-up runs
before the services listen: the loader (every key, type and value, and the cross-field checks),
the key material (session keys, the encryption key, the IdP client key), each upstream's settings
as the services build them (region, role ARN, session length, ...), and Envoy's bootstrap rendered
in memory (ports, cluster names, the listener's TLS). Each problem is one line, ``<file>: <field>:
<problem>``. ``authz doctor`` adds the network checks and Envoy's own ``--mode validate``.

Run it before a reload (SIGHUP or a file change): a file that fails here is one a running gateway
refuses, keeping the configuration it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from authz.config import load
from authz.configtypes import GatewayConfig
from authz.envoy.render import render
from authz.envoy.tls import sds_path_for
from authz.errors import ConfigError, GatewayError
from authz.ops.doctor import check_keys
from backends.kinds import KINDS

# Hex digits of the file's SHA-256 shown (``sha256sum`` prints all 64; the reload log shows as many).
SHORT_HASH = 12


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason the file would not start: the key and what is wrong with it."""

    field: str
    problem: str

    def line(self, path: Path | str) -> str:
        """``<file>: <field>: <problem>``."""
        return f"{path}: {self.field}: {self.problem}" if self.field else f"{path}: {self.problem}"


def check(path: Path, environ: Mapping[str, str]) -> tuple[GatewayConfig | None, list[Problem]]:
    """The configuration and every problem found in it (none: it would start). A file that does
    not load is one problem, and nothing else is checked."""
    try:
        config = load(path, environ)
    except ConfigError as exc:
        return None, [Problem(exc.field, exc.problem)]
    problems = [Problem(f.field, f.detail) for f in check_keys(config) if not f.ok]
    problems += asyncio.run(_check_upstreams(config))
    problems += _check_envoy(config, path)
    return config, problems


async def _check_upstreams(config: GatewayConfig) -> list[Problem]:
    """Each upstream built as the services build it (no credential is fetched)."""
    problems: list[Problem] = []
    for name, up in config.upstreams:
        try:
            upstream = KINDS[up.kind].build(name, up.settings)
        except ConfigError as exc:
            problems.append(Problem(exc.field, exc.problem))
        except GatewayError as exc:
            problems.append(Problem(f"upstreams.{name}", str(exc)))
        else:
            await upstream.aclose()
    return problems


def _check_envoy(config: GatewayConfig, path: Path) -> list[Problem]:
    """Envoy's bootstrap rendered in memory (the SDS file's path is only named, never written)."""
    sds = str(sds_path_for(path.resolve().parent / "envoy.yaml")) if config.listen.envoy.tls else None
    try:
        render(config, tls_sds_file=sds)
    except ConfigError as exc:
        return [Problem(exc.field, f"{exc.problem} (rendering Envoy's configuration)")]
    return []


def config_check(path: Path, environ: Mapping[str, str], out: TextIO) -> int:
    """Print ``<file>: ok ...`` and return 0, or one line per problem and return 1."""
    config, problems = check(path, environ)
    if problems or config is None:
        for problem in problems:
            print(problem.line(path), file=out)
        return 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:SHORT_HASH]
    print(
        f"{path}: ok (sha256 {digest}): {len(config.policies)} policies, {len(config.upstreams)}"
        f" upstreams, {config.workers} worker(s); Envoy's bootstrap renders",
        file=out,
    )
    return 0
