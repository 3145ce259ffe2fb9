"""Noticing that the configuration file changed, by polling.

Each poll costs one ``stat``: the file is read only when its modification time, size, inode or
device moved, and counts as changed only when its content's SHA-256 differs from the last one seen.
So a ``touch`` or an editor rewriting the same bytes is no change, while a file replaced by a
rename (``mv``, an editor's atomic save, a Kubernetes ConfigMap volume swapping its symlink) or
written in place is one. A file whose ``stat`` moves while it is read is still being written: it
is looked at again at the next poll. The caller owns the schedule (the tests drive :meth:`poll`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Stamp:
    """What ``stat`` says about the file, enough to notice a rewrite or a replacement."""

    mtime_ns: int
    size: int
    inode: int
    device: int


def stamp(path: Path) -> Stamp | None:
    """The file's stamp (symbolic links followed), None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stamp(st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of ``data``: what ``sha256sum`` prints for the file."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Contents:
    """The file as read: its bytes and their SHA-256, or why it could not be read."""

    data: bytes | None
    digest: str
    error: str | None = None


class FileWatch:
    """Polls one file; :meth:`poll` hands out its contents when they changed since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: Stamp | None = None
        self._digest: str | None = None
        self._looked = False

    def poll(self, *, force: bool = False) -> Contents | None:
        """The file's contents if they changed since the last poll (``force``: whatever they are,
        for SIGHUP and the first read), else None."""
        before = stamp(self.path)
        if not force and self._looked and before == self._stamp:
            return None
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._stamp, self._looked = before, True
            if not force and self._digest == "":
                return None  # still unreadable: said once already
            self._digest = ""
            return Contents(None, "", f"cannot read {self.path}: {exc.strerror or exc}")
        after = stamp(self.path)
        if after != before and not force:
            return None  # being written: the next poll reads it whole
        self._stamp, self._looked = after, True
        digest = sha256_hex(data)
        if not force and digest == self._digest:
            return None
        self._digest = digest
        return Contents(data, digest)
