"""The token file: where ``authz login`` keeps the gateway session on a developer's machine.

One JSON object (gateway URL, access token and its expiry, refresh token, email) at
``$XDG_CONFIG_HOME/claude-gateway/token.json`` or ``~/.config/claude-gateway/token.json``. The
directory is 0700 and the file 0600, written atomically (a fresh temporary file created with
``O_EXCL`` and mode 0600, fsynced, then renamed over the old one), so a crash never leaves a
half-written file and the secret is never readable by others, not even for a moment. Like
OpenSSH with a private key, a token file that group or others can access is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from authz.errors import GatewayError

APP_DIR = "claude-gateway"
FILE_NAME = "token.json"
FORMAT_VERSION = 1
# `authz token` refreshes when the access token has less than this left (or has expired).
REFRESH_MARGIN = 300.0


class TokenFileError(GatewayError):
    """The token file is missing, unreadable, malformed or too widely readable."""


class NotSignedInError(TokenFileError):
    """There is no token file: nobody has signed in on this machine (or they signed out)."""


@dataclass(frozen=True, slots=True)
class StoredToken:
    """The contents of the token file; ``expires_at`` is the access token's expiry in Unix seconds."""

    gateway: str
    access_token: str
    expires_at: float
    refresh_token: str | None
    email: str | None

    def needs_refresh(self, now: float, margin: float = REFRESH_MARGIN) -> bool:
        """Whether the access token expires within ``margin`` seconds of ``now`` (or already has)."""
        return self.expires_at - now < margin

    def is_valid(self, now: float) -> bool:
        """Whether the access token has not expired yet at ``now``."""
        return now < self.expires_at


def default_path(environ: Mapping[str, str]) -> Path:
    """The token file's location for the given environment (XDG Base Directory rules)."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec: a relative $XDG_CONFIG_HOME is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        base = Path(xdg)
    else:
        home = environ.get("HOME")
        base = (Path(home) if home else Path.home()) / ".config"
    return base / APP_DIR / FILE_NAME


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (the parent directory must exist)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never follow a planted symlink or reuse someone else's file; 0o600 from the first byte.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow the mode, but be explicit
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; some filesystems cannot fsync a directory, which is harmless here.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and its parents) and make it 0700."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def save(path: Path, token: StoredToken) -> None:
    """Write ``token`` to ``path`` (0600, atomically), creating its 0700 directory."""
    ensure_private_dir(path.parent)
    document = {"version": FORMAT_VERSION, **asdict(token)}
    write_private(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def load(path: Path, *, strict: bool = True) -> StoredToken:
    """Read the token file at ``path``.

    Raises :class:`NotSignedInError` when there is none, and :class:`TokenFileError` when it is
    malformed or, with ``strict`` (the default), when group or others can access it or another
    user owns it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise NotSignedInError(f"not signed in (no {path}): run `authz login --gateway URL`") from None
    except OSError as exc:
        raise TokenFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # fstat on the open file: no window between the check and the read.
        info = os.fstat(fd)
        if strict:
            check_private(path, info)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read()
    finally:
        os.close(fd)
    return _parse(path, raw)


def check_private(path: Path, info: os.stat_result) -> None:
    """Raise :class:`TokenFileError` unless ``info`` describes a regular file only its owner can use."""
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"refusing to read {path}: it is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise TokenFileError(
            f"refusing to read {path}: its permissions {mode:04o} let other users read it, so the "
            f"session may have leaked; run `authz logout` and `authz login --gateway URL` "
            f"(or `chmod 600 {path}` if you are sure nobody else read it)"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise TokenFileError(f"refusing to read {path}: it belongs to another user (uid {info.st_uid})")


def _parse(path: Path, raw: bytes) -> StoredToken:
    try:
        document: Any = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown version {document.get('version')!r}")
        token = StoredToken(
            gateway=_field(document, "gateway", str),
            access_token=_field(document, "access_token", str),
            expires_at=float(_field(document, "expires_at", (int, float))),
            refresh_token=_optional(document, "refresh_token"),
            email=_optional(document, "email"),
        )
    except (ValueError, TypeError) as exc:
        raise TokenFileError(f"{path} is damaged ({exc}): run `authz login --gateway URL` again") from exc
    return token


def _field(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or value == "":
        raise ValueError(f"{key} is missing or invalid")
    return value


def _optional(document: Mapping[str, Any], key: str) -> str | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def delete(path: Path) -> bool:
    """Remove the token file; ``False`` when there was none."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` while the block runs.

    Claude Code may run several ``apiKeyHelper`` processes at once. Refresh tokens are single-use
    and a reused one revokes the whole session (DESIGN.md, Sessions), so only one process may
    refresh at a time; the others wait, then find the fresh token in the file.
    """
    ensure_private_dir(path.parent)
    lock_path = path.with_name(f"{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
