"""A throwaway PostgreSQL for ``make run`` and the tests (DESIGN.md, Real components).

The ``pgserver`` wheel is preferred: it ships the server binaries and, when run as root, creates an
unprivileged system user to run them. Without it, local binaries (``pg_ctl`` on ``PATH`` or under
``/usr/lib/postgresql/*/bin``) are used, as the ``postgres`` user when running as root, since
PostgreSQL refuses to run as root. Either way the server listens on a unix socket only, so
parallel test runs never fight over a TCP port.

:meth:`EmbeddedPostgres.stop_server` and :meth:`EmbeddedPostgres.start_again` let a test take the
database away in the middle of traffic and bring it back on the same data and socket.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from authz.errors import StoreError

log = logging.getLogger("authz.store.embedded")

Backend = Literal["auto", "pgserver", "binaries"]

_COMMAND_TIMEOUT = 60.0
# sun_path is 108 bytes on Linux (104 on macOS); the socket file name is ".s.PGSQL.5432".
_MAX_SOCKET_DIR = 90


class EmbeddedPostgres:
    """One local PostgreSQL server on a unix socket, with its data in a directory the caller owns."""

    def __init__(self, *, backend: Backend = "auto") -> None:
        self._backend = backend
        self._pgserver: Any = None  # the pgserver module, when that backend is in use
        self._server: Any = None  # its PostgresServer
        self._local: _LocalServer | None = None
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        """The connection URL returned by :meth:`start`."""
        if self._dsn is None:
            raise StoreError("the embedded PostgreSQL has not been started")
        return self._dsn

    def start(self, data_dir: Path) -> str:
        """Initialise ``data_dir`` if needed, start the server and return its DSN."""
        if self._dsn is not None:
            raise StoreError("the embedded PostgreSQL is already running")
        data_dir = Path(data_dir).resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        pgserver = _import_pgserver() if self._backend in ("auto", "pgserver") else None
        if pgserver is not None:
            self._pgserver = pgserver
            try:
                self._server = pgserver.get_server(data_dir, cleanup_mode="stop")
            except (OSError, subprocess.SubprocessError) as exc:
                raise StoreError(f"pgserver could not start PostgreSQL in {data_dir}: {exc}") from exc
            self._dsn = str(self._server.get_uri())
        elif self._backend == "pgserver":
            raise StoreError("the pgserver package is not installed; pip install pgserver")
        else:
            self._local = _LocalServer(data_dir)
            self._local.init()
            self._local.start()
            self._dsn = self._local.dsn
        log.info("embedded PostgreSQL running: %s", self._dsn)
        return self._dsn

    def stop_server(self) -> None:
        """Stop the server process but keep its data and socket location for :meth:`start_again`."""
        if self._server is not None:
            try:
                self._pgserver.pg_ctl(
                    ["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user
                )
            except subprocess.CalledProcessError as exc:
                raise StoreError(f"pg_ctl stop failed: {exc}") from exc
        elif self._local is not None:
            self._local.stop()
        else:
            raise StoreError("the embedded PostgreSQL has not been started")

    def start_again(self) -> str:
        """Start a server stopped by :meth:`stop_server` on the same data and socket; return the DSN."""
        if self._server is not None:
            # pgserver expects its inter-process lock held around (re)starts. Re-running its init
            # step (initdb is skipped for an existing cluster) restores the directory permissions
            # its server user needs, in case something tightened them while the server was down.
            with self._server._lock:
                self._server.ensure_pgdata_inited()
                self._server.ensure_postgres_running()
            self._dsn = str(self._server.get_uri())
        elif self._local is not None:
            self._local.start()
        else:
            raise StoreError("the embedded PostgreSQL has not been started")
        return self.dsn

    def stop(self) -> None:
        """Stop the server for good. The data directory is left for the caller to delete."""
        if self._server is not None:
            server, self._server = self._server, None
            server.cleanup()
        if self._local is not None:
            local, self._local = self._local, None
            local.close()
        self._dsn = None


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI); the
            # fallback it picks is fine for a lock file.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver
    except ImportError:
        return None
    return pgserver


def _find_bindir() -> Path:
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        # /usr/local/bin/pg_ctl is often a symlink: initdb and postgres live beside its target.
        return Path(on_path).resolve().parent

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)

    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if (bindir / "pg_ctl").exists():
            return bindir
    raise StoreError("no PostgreSQL found: pip install pgserver, or install PostgreSQL (initdb, pg_ctl)")


class _LocalServer:
    """PostgreSQL from locally installed binaries, run as an unprivileged user when we are root."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.bindir = _find_bindir()
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise StoreError(
                    "PostgreSQL will not run as root and there is no 'postgres' user; "
                    "pip install pgserver, or create that user"
                ) from exc
        self.own_socket_dir = len(str(data_dir)) > _MAX_SOCKET_DIR
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-")) if self.own_socket_dir else data_dir
        self.dsn = f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def init(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.user is not None:
            for path in (self.data_dir, self.socket_dir):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
            _make_traversable(self.data_dir.parent)
            _make_traversable(self.socket_dir.parent)
        if (self.data_dir / "PG_VERSION").exists():
            return
        # --no-sync: a throwaway cluster need not survive a power cut, and initdb is much faster.
        data = str(self.data_dir)
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-h '' -k {shlex.quote(str(self.socket_dir))}"
        data, log_file = str(self.data_dir), str(self.data_dir / "postgres.log")
        self._run("pg_ctl", "-D", data, "-w", "-t", "60", "-l", log_file, "-o", options, "start")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", "fast", "stop")

    def close(self) -> None:
        self.stop()
        if self.own_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        # Output goes to a file, not a pipe: the postmaster pg_ctl leaves behind would inherit the
        # pipe and keep communicate() waiting forever.
        with tempfile.TemporaryFile() as output:
            try:
                subprocess.run(  # noqa: S603 - fixed program from the PostgreSQL install, no shell
                    command,
                    check=True,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    timeout=_COMMAND_TIMEOUT,
                    user=self.user.pw_uid if self.user else None,
                    group=self.user.pw_gid if self.user else None,
                    extra_groups=[] if self.user else None,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                output.seek(0)
                text = output.read().decode("utf-8", "replace").strip()
                raise StoreError(f"{program} failed: {exc}\n{text}") from exc


def _make_traversable(directory: Path) -> None:
    # The postgres user must reach its data directory. Add only search (x) permission for others,
    # not read, on each ancestor that lacks it.
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if not mode & 0o001:
            path.chmod(mode | 0o001)
