"""Where a gateway keeps its run state: rendered Envoy config, logs, the usage spool.

Never the working directory: two gateways started from the same directory would share (and
clobber) each other's files, and a service started by systemd or Kubernetes has no meaningful one.
``--state-dir`` names the directory; without it the default is derived from the config file's
absolute path, under ``$XDG_STATE_HOME/claude-gateway/`` (``~/.local/state`` when unset), so each
config gets its own directory and the same config always finds its spool again after a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

from authz.configtypes import GatewayConfig


def default_state_dir(config_path: str | Path, environ: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/claude-gateway/<config stem>-<10 hex of the config's absolute path>``."""
    absolute = Path(config_path).expanduser().resolve()
    digest = hashlib.sha256(str(absolute).encode("utf-8")).hexdigest()[:10]
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "claude-gateway" / f"{absolute.stem}-{digest}"


def state_dir(config_path: str | Path, explicit: str | Path | None, environ: Mapping[str, str]) -> Path:
    """``explicit`` (absolute) when given, else :func:`default_state_dir`."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    return default_state_dir(config_path, environ)


def with_state_dir(config: GatewayConfig, root: Path) -> GatewayConfig:
    """``config`` with the spool directories resolved: an empty ``store.spool_dir`` means
    ``<root>/spool``; a relative ``spool_dir`` or ``logout_spool_dir`` is relative to ``root``
    (an empty ``logout_spool_dir`` keeps meaning ``logouts`` under the spool directory)."""
    store = config.store
    spool = Path(store.spool_dir) if store.spool_dir else Path("spool")
    logouts = Path(store.logout_spool_dir) if store.logout_spool_dir else None
    resolved = dataclasses.replace(
        store,
        spool_dir=str(spool if spool.is_absolute() else root / spool),
        logout_spool_dir="" if logouts is None else str(logouts if logouts.is_absolute() else root / logouts),
    )
    return dataclasses.replace(config, store=resolved)
