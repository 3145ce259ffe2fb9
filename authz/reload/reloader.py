"""The reload: read the file, load it as start-up would, keep the restart-only keys, say what changed.

:class:`Reloader` holds the configuration a replica runs and the file it came from. Its
:meth:`~Reloader.poll` runs at every tick of ``reload.watch_interval`` (``force`` on SIGHUP) and
returns an :class:`Outcome` when there was something to look at: ``applied`` (live keys changed:
hand ``config`` to the request path), ``unchanged`` (the file was reread and nothing live differs:
a comment, a restart-only key, a SIGHUP with nothing new), or ``failed`` (the file does not load;
the running configuration stays, and the outcome names the field). :func:`log_outcome` writes the
one log line of each. Where it runs: docs/architecture.md, "Live configuration".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from authz.config import loads, validate
from authz.configtypes import GatewayConfig
from authz.envoy.failover import chains
from authz.errors import ConfigError
from authz.reload.scope import differences, split, summary, unrendered_chains
from authz.reload.watch import FileWatch
from authz.statedir import with_state_dir

log = logging.getLogger("authz.reload")

Result = Literal["applied", "unchanged", "failed"]
# Hex digits of the file's SHA-256 shown in log lines (``sha256sum`` prints all 64).
SHORT_HASH = 12


@dataclass(frozen=True, slots=True)
class Status:
    """Where a replica's configuration stands, for ``/readyz``: the SHA-256 of the file the running
    configuration was loaded from, when, the restart-only keys that file changed (still at their
    start-up values), and the error of the last reload if it failed (None once one succeeds)."""

    sha256: str
    loaded_at: float
    restart_pending: tuple[str, ...] = ()
    error: str | None = None

    def report(self) -> dict[str, object]:
        """The JSON ``/readyz`` shows under ``config``."""
        return {
            "sha256": self.sha256,
            "loaded_at": round(self.loaded_at, 3),
            "restart_pending": list(self.restart_pending),
            "last_error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """One reload: its result, why it ran (``signal``: SIGHUP, ``file``: the file changed), the
    configuration to apply (``applied`` only), the live keys that changed, and the status after it.
    ``file_sha256`` is what was read (empty when the file could not be read)."""

    result: Result
    trigger: Literal["signal", "file"]
    status: Status
    file_sha256: str
    config: GatewayConfig | None = None
    changed: tuple[str, ...] = ()
    error: str | None = None


class Reloader:
    """The configuration one replica runs, reloaded from its file on demand."""

    def __init__(
        self,
        path: Path,
        environ: Mapping[str, str],
        root: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Read and load the file (start-up: a :class:`ConfigError` stops it)."""
        self.path = path
        self._environ = dict(environ)
        self._root = root
        self._clock = clock
        self._watch = FileWatch(path)
        contents = self._watch.poll(force=True)
        assert contents is not None  # forced
        if contents.data is None:
            raise ConfigError("", contents.error or f"cannot read {path}")
        self._config = self._load(contents.data)
        # Envoy's failover clusters are rendered from the start-up configuration only.
        self._failover_clusters = frozenset(chain.cluster for chain in chains(self._config))
        self._status = Status(contents.digest, clock())

    @property
    def config(self) -> GatewayConfig:
        """The running configuration."""
        return self._config

    @property
    def failover_clusters(self) -> frozenset[str]:
        """The failover clusters Envoy was rendered with: the start-up configuration's chains,
        whatever a reload changed since (a worker restarted later must name only these)."""
        return self._failover_clusters

    @property
    def status(self) -> Status:
        """Where the running configuration stands."""
        return self._status

    @property
    def interval(self) -> float:
        """Seconds between polls (``reload.watch_interval``; 0: only SIGHUP reloads)."""
        return self._config.reload.watch_interval

    def poll(self, *, force: bool = False) -> Outcome | None:
        """Reload if the file changed since the last poll, or whatever it holds when ``force``d
        (SIGHUP); None when there was nothing to look at."""
        contents = self._watch.poll(force=force)
        if contents is None:
            return None
        trigger: Literal["signal", "file"] = "signal" if force else "file"
        try:
            if contents.data is None:
                raise ConfigError("", contents.error or f"cannot read {self.path}")
            loaded = self._load(contents.data)
            merged, pending = split(self._config, loaded)
            try:
                validate(merged)
            except ConfigError as exc:
                # A live key naming a restart-only one the file changed: a policy's new upstream.
                raise ConfigError(
                    exc.field,
                    f"{exc.problem} (the file also changes {summary(pending)}, which needs a restart)",
                ) from None
        except ConfigError as exc:
            self._status = Status(
                self._status.sha256, self._status.loaded_at, self._status.restart_pending, str(exc)
            )
            return Outcome("failed", trigger, self._status, contents.digest, error=str(exc))
        pending += unrendered_chains(merged, self._failover_clusters)
        changed = tuple(differences(self._config, merged))
        self._status = Status(contents.digest, self._clock(), pending)
        if not changed:
            return Outcome("unchanged", trigger, self._status, contents.digest)
        self._config = merged
        return Outcome("applied", trigger, self._status, contents.digest, config=merged, changed=changed)

    def _load(self, data: bytes) -> GatewayConfig:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("", f"{self.path} is not UTF-8 text (byte {exc.start})") from None
        return with_state_dir(loads(text, self._environ, base_dir=self.path.resolve().parent), self._root)


def describe(outcome: Outcome, path: Path | str) -> str:
    """The one log line of a reload."""
    why = "on SIGHUP" if outcome.trigger == "signal" else "after the file changed"
    read = f"{path} (sha256 {outcome.file_sha256[:SHORT_HASH] or '-'})"
    status = outcome.status
    if outcome.result == "failed":
        return (
            f"configuration not reloaded {why}: {read}: {outcome.error}; still running sha256 "
            f"{status.sha256[:SHORT_HASH]}"
        )
    pending = f"; kept until a restart: {summary(status.restart_pending)}" if status.restart_pending else ""
    if outcome.result == "unchanged":
        return f"configuration reread {why}: {read}: no live setting changed{pending}"
    return f"configuration reloaded {why}: {read}: changed {summary(outcome.changed)}{pending}"


def log_outcome(outcome: Outcome, path: Path | str) -> None:
    """Log a reload's line: an error when the file was refused, a warning when a restart is due."""
    line = describe(outcome, path)
    if outcome.result == "failed":
        log.error("%s", line)
    elif outcome.status.restart_pending:
        log.warning("%s", line)
    else:
        log.info("%s", line)
