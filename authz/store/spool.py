"""Append-only local spool for usage rows that could not reach PostgreSQL.

Rows are JSON lines in segment files under one directory. A process appends to its own open
segment (``seg-<time>-<pid>-<token>-<seq>.jsonl.open``) and fsyncs after every batch; sealing
renames it without the ``.open`` suffix, and only sealed segments are replayed, so a segment is
never read while it is being written. A crash mid-append can leave a torn final line; reading skips
it with a warning rather than replaying garbage. Segments left open by a process that died are
sealed by the next :meth:`Spool.segments` call of any process sharing the directory.

Rows PostgreSQL refuses outright (a value out of range, say) go to ``rejected-*.jsonl`` files,
which are never replayed automatically: an operator inspects them.

Pure file I/O and thread-safe; the ledger calls it from worker threads so fsync never blocks the
event loop.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from authz.errors import StoreError
from authz.store.usagerow import UsageRow

log = logging.getLogger("authz.store.spool")

OPEN_SUFFIX = ".open"
_SEGMENT = re.compile(r"^seg-\d{20}-(\d+)-[0-9a-f]+-\d{6}\.jsonl$")
_OPEN_SEGMENT = re.compile(r"^seg-\d{20}-(\d+)-[0-9a-f]+-\d{6}\.jsonl\.open$")

DEFAULT_MAX_SEGMENT_BYTES = 8 * 1024 * 1024

# Names of segments open in this process, across Spool instances: a second instance on the same
# directory (a restarted ledger, a test) must not seal a sibling's live file as an orphan.
_open_here: set[str] = set()
_open_here_lock = threading.Lock()


class Spool:
    """A directory of JSON-lines segments holding rows waiting for PostgreSQL."""

    def __init__(self, directory: str | Path, *, max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES) -> None:
        if not str(directory):
            # Path("") is the working directory: rows would land wherever the process started.
            raise StoreError("the spool directory is empty; set store.spool_dir")
        self.directory = Path(directory)
        # Rows carry emails and groups: keep them private to the service user.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._max_bytes = max_segment_bytes
        # The token tells this instance's files from an earlier process that had the same pid.
        self._token = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._seq = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0

    # --- writing -----------------------------------------------------------------------------

    def append(self, rows: Sequence[UsageRow]) -> None:
        """Append ``rows`` to this process's open segment and fsync; ``OSError`` if not durable."""
        if not rows:
            return
        data = "".join(row.to_json() + "\n" for row in rows).encode("utf-8")
        with self._lock:
            if self._fd is None:
                self._open_locked()
            assert self._fd is not None
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError:
                self._recover_from_failed_write_locked()
                raise
            self._size += len(data)
            if self._size >= self._max_bytes:
                self._seal_locked()

    def seal(self) -> None:
        """Seal the open segment (if any) so that :meth:`segments` lists it for replay."""
        with self._lock:
            self._seal_locked()

    def close(self) -> None:
        """Seal the open segment; the spool stays usable (a later append opens a new one)."""
        self.seal()

    def reject(self, rows: Sequence[UsageRow]) -> Path:
        """Write rows PostgreSQL refused to a ``rejected-*.jsonl`` file that is never replayed."""
        name = f"rejected-{time.time_ns():020d}-{os.getpid()}-{self._token}-{secrets.token_hex(2)}.jsonl"
        path = self.directory / name
        data = "".join(row.to_json() + "\n" for row in rows).encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.directory)
        return path

    def pending_bytes(self) -> int:
        """Bytes of rows waiting in segments (open or sealed) for PostgreSQL; a metric, so a file
        that vanishes mid-scan (replayed by another worker) is simply not counted."""
        total = 0
        for entry in os.scandir(self.directory):
            if _SEGMENT.match(entry.name) or _OPEN_SEGMENT.match(entry.name):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:
                    continue
        return total

    # --- reading -----------------------------------------------------------------------------

    def segments(self) -> list[Path]:
        """Sealed segments, oldest first. Seals first any segment left open by a dead process."""
        self._seal_orphans()
        names = sorted(e.name for e in os.scandir(self.directory) if _SEGMENT.match(e.name))
        # The zero-padded creation time leads the name, so name order is age order.
        return [self.directory / name for name in names]

    def read(self, segment: Path) -> list[UsageRow]:
        """The rows in ``segment``; torn or unreadable lines are skipped with a warning.

        A segment that no longer exists (another worker replayed and removed it) reads as empty.
        """
        try:
            data = segment.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        # Every complete line ends with a newline, so the last piece is b"" unless the writer died
        # mid-line.
        tail = lines.pop()
        if tail:
            log.warning("spool segment %s: skipping a torn final line (%d bytes)", segment.name, len(tail))
        rows: list[UsageRow] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(UsageRow.from_json(line.decode("utf-8")))
            except (UnicodeDecodeError, ValueError) as exc:
                log.warning(
                    "spool segment %s line %d: skipping unreadable row: %s", segment.name, number, exc
                )
        return rows

    def remove(self, segment: Path) -> None:
        """Delete a replayed segment (no error if it is already gone)."""
        # No directory fsync: if the unlink is lost in a crash the segment is replayed again, and
        # ON CONFLICT makes that harmless.
        segment.unlink(missing_ok=True)

    # --- internals ---------------------------------------------------------------------------

    def _open_locked(self) -> None:
        self._seq += 1
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{self._token}-{self._seq:06d}.jsonl{OPEN_SUFFIX}"
        path = self.directory / name
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._path = path
        with _open_here_lock:
            _open_here.add(name)
        self._size = 0
        # Make the new name durable, or a crash could lose a file whose rows were fsynced.
        _fsync_dir(self.directory)

    def _seal_locked(self) -> None:
        if self._fd is None or self._path is None:
            return
        fd, path, size = self._fd, self._path, self._size
        self._fd, self._path, self._size = None, None, 0
        with _open_here_lock:
            _open_here.discard(path.name)
        os.close(fd)
        if size == 0:
            path.unlink(missing_ok=True)
            return
        path.rename(path.with_name(path.name.removesuffix(OPEN_SUFFIX)))
        _fsync_dir(self.directory)

    def _recover_from_failed_write_locked(self) -> None:
        # A failed write may have left part of a line behind. Cut the file back to the last whole
        # batch so the next append does not glue a row onto that fragment; if even that fails,
        # seal the file as it is (its torn tail is skipped on read) and start a new one next time.
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            log.exception("spool: cannot truncate %s after a failed write; sealing it", self._path)
            try:
                self._seal_locked()
            except OSError:
                log.exception("spool: cannot seal %s", self._path)
                self._fd, self._path, self._size = None, None, 0

    def _seal_orphans(self) -> None:
        with self._lock, _open_here_lock:
            sealed = False
            for entry in os.scandir(self.directory):
                match = _OPEN_SEGMENT.match(entry.name)
                if match is None or entry.name in _open_here:
                    continue
                pid = int(match.group(1))
                # Same pid but not our file: a predecessor that had our pid (containers restart at
                # pid 1). Another live pid is a sibling worker still writing: leave it alone.
                if pid != os.getpid() and _alive(pid):
                    continue
                path = Path(entry.path)
                log.warning("spool: sealing %s left open by a process that is gone", entry.name)
                try:
                    path.rename(path.with_name(entry.name.removesuffix(OPEN_SUFFIX)))
                except FileNotFoundError:
                    continue  # another worker sealed it first
                sealed = True
            if sealed:
                _fsync_dir(self.directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
