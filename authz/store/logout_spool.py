"""The local journal of back-channel logouts not yet written to PostgreSQL.

One file per accepted logout, named after its issuer and ``jti``, so that the same logout token
arriving twice finds its own file (a replay, Back-Channel Logout 1.0 §2.6 step 7) even while
PostgreSQL cannot be asked. A file is written under a temporary name, fsynced, then hard-linked to
its final name: the link is atomic and fails if the name exists, so readers only ever see complete
entries and two writers of the same jti cannot both succeed. The directory is fsynced before
:meth:`LogoutSpool.add` returns, so an accepted logout survives a crash or a power loss.

Any number of processes may share the directory, on one host or (on a shared volume) several:
nothing here depends on process ids, and removing an entry twice is harmless. Pure file I/O and
thread-safe; callers run it in worker threads so fsync never blocks the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from authz.configtypes import Store
from authz.errors import StoreError

log = logging.getLogger("authz.store.logout_spool")

_ENTRY = re.compile(r"^logout-[0-9a-f]{64}\.json$")
_TEMP_PREFIX = ".tmp-"
# A temporary file older than this was left by a writer that died between writing and linking.
_STALE_TEMP_SECONDS = 3600.0
# An entry is a few hundred bytes; anything much larger is not one of ours.
_MAX_ENTRY_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class SpooledLogout:
    """One validated back-channel logout, as accepted.

    ``entry`` is a random id of this acceptance; ``accepted_at`` and ``jti_expires_at`` are Unix
    seconds (when it arrived, and when its token would stop passing validation). ``client_ip`` and
    ``user_agent`` are kept for the audit row written when it reaches PostgreSQL.
    """

    entry: str
    issuer: str
    jti: str
    sub: str | None
    sid: str | None
    accepted_at: float
    jti_expires_at: float
    client_ip: str | None = None
    user_agent: str | None = None

    def to_json(self) -> str:
        """The entry as one JSON object."""
        return json.dumps({"v": 1, **asdict(self)}, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpooledLogout:
        """Parse :meth:`to_json`'s output; ValueError if it is not a well-formed entry."""
        data: Any = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a version 1 logout entry")

        def text_of(name: str, *, optional: bool = False) -> Any:
            value = data.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} is not a non-empty string")
            return value

        def number(name: str) -> float:
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} is not a number")
            return float(value)

        entry = cls(
            entry=text_of("entry"),
            issuer=text_of("issuer"),
            jti=text_of("jti"),
            sub=text_of("sub", optional=True),
            sid=text_of("sid", optional=True),
            accepted_at=number("accepted_at"),
            jti_expires_at=number("jti_expires_at"),
            client_ip=text_of("client_ip", optional=True),
            user_agent=text_of("user_agent", optional=True),
        )
        if entry.sub is None and entry.sid is None:
            raise ValueError("the entry names neither sub nor sid")
        return entry


def logout_spool_dir(settings: Store) -> Path:
    """The journal directory: ``store.logout_spool_dir``, else ``logouts`` under ``store.spool_dir``."""
    return Path(settings.logout_spool_dir or Path(settings.spool_dir) / "logouts")


def new_entry_id() -> str:
    """A fresh entry id: 128 random bits."""
    return secrets.token_urlsafe(16)


class LogoutSpool:
    """A directory of logout entries waiting for PostgreSQL."""

    def __init__(self, directory: str | Path) -> None:
        if not str(directory):
            # Path("") is the working directory: entries would land wherever the process started.
            raise StoreError("the logout spool directory is empty; set store.logout_spool_dir")
        self.directory = Path(directory)
        # Entries name users (sub, IdP session): keep them private to the service user.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_for(self, issuer: str, jti: str) -> Path:
        """Where the entry for ``(issuer, jti)`` lives: one name per logout token."""
        digest = hashlib.sha256(issuer.encode("utf-8") + b"\x00" + jti.encode("utf-8")).hexdigest()
        return self.directory / f"logout-{digest}.json"

    def add(self, logout: SpooledLogout) -> bool:
        """Write ``logout`` durably; False if an entry for its issuer and jti is already there.

        ``OSError`` if it could not be made durable (disk full, read-only directory).
        """
        final = self.path_for(logout.issuer, logout.jti)
        temp = self.directory / f"{_TEMP_PREFIX}{final.stem}-{secrets.token_hex(4)}"
        data = (logout.to_json() + "\n").encode("utf-8")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # link(2) creates the final name atomically, and only if it does not exist yet.
                os.link(temp, final)
            except FileExistsError:
                return False
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        return True

    def entries(self) -> list[tuple[Path, SpooledLogout]]:
        """Every readable entry, oldest first. Unreadable files are skipped with a warning and left
        for an operator; temporary files of writers that died are removed."""
        found: list[tuple[Path, SpooledLogout]] = []
        now = time.time()
        for item in os.scandir(self.directory):
            if item.name.startswith(_TEMP_PREFIX):
                self._remove_if_stale(Path(item.path), now)
                continue
            if not _ENTRY.match(item.name):
                continue
            path = Path(item.path)
            try:
                with path.open("rb") as handle:
                    raw = handle.read(_MAX_ENTRY_BYTES + 1)
            except FileNotFoundError:
                continue  # removed by another process since the scan
            except OSError as exc:
                log.warning("logout spool: cannot read %s: %s", item.name, exc)
                continue
            try:
                if len(raw) > _MAX_ENTRY_BYTES:
                    raise ValueError("too large")
                logout = SpooledLogout.from_json(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                log.warning("logout spool: skipping unreadable entry %s: %s", item.name, exc)
                continue
            if path != self.path_for(logout.issuer, logout.jti):
                log.warning("logout spool: skipping %s, whose name does not match its token", item.name)
                continue
            found.append((path, logout))
        found.sort(key=lambda pair: (pair[1].accepted_at, pair[0].name))
        return found

    def remove(self, path: Path) -> None:
        """Delete a written-through entry (no error if it is already gone)."""
        # No directory fsync: an entry that comes back after a crash is written again, and the
        # database recognises it as already applied.
        path.unlink(missing_ok=True)

    def _remove_if_stale(self, path: Path, now: float) -> None:
        try:
            if now - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("logout spool: cannot remove the stale temporary file %s: %s", path.name, exc)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
