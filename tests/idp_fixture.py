"""The test IdP: a real OpenID Provider (npm ``oidc-provider``, tests/idp/server.mjs) in a node process.

Usage::

    idp = TestIdp()
    issuer = idp.start(tmp_path, clients=[...], accounts={"alice": {...}})
    ...
    idp.disable("alice")            # refresh for alice now fails with invalid_grant
    idp.set_groups("alice", ["x"])  # the next refresh / userinfo shows the new groups
    statuses = idp.backchannel_logout("alice")  # real OIDC Back-Channel Logout to the RPs
    idp.stop()

``clients`` are oidc-provider client metadata dicts (``client_id``, ``client_secret``,
``redirect_uris``, ``token_endpoint_auth_method``, ``jwks`` for ``private_key_jwt``,
``backchannel_logout_uri``, ...). ``accounts`` map an account id to ``email``, ``email_verified``,
``groups``, ``password`` and any further claims; sign in with the account id or the email.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

IDP_DIR = Path(__file__).resolve().parent / "idp"
SERVER = IDP_DIR / "server.mjs"
READY = "IDP_READY "

# Debian's chromium, driven by Playwright in the sign-in tests (never `playwright install`). Without
# the background-networking flags Chromium keeps dialling out, which this closed network refuses.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def launch_chromium() -> Iterator[Browser]:
    """Headless Debian chromium through Playwright's sync API, closed on exit.

    Use it from a module-scoped fixture: the sync API keeps an event loop on this thread while it
    runs, which would break asyncio tests collected after the module.
    """
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make deps-system` installs Debian's chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


def ensure_idp_installed() -> None:
    """Run ``npm ci`` in tests/idp once, when its ``node_modules`` is missing."""
    if (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed for the test IdP (tests/idp); install Node.js")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=IDP_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm ci in {IDP_DIR} failed:\n{result.stdout}\n{result.stderr}")


class TestIdp:
    """One oidc-provider process on a loopback port, with the test-only admin endpoints."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self) -> None:
        self.issuer: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._err: Path | None = None  # the running node's stderr

    # --- lifecycle ----------------------------------------------------------------------------

    def start(
        self,
        root: Path,
        clients: list[dict[str, Any]],
        accounts: dict[str, dict[str, Any]],
        *,
        port: int = 0,
        options: dict[str, Any] | None = None,
        timeout: float = 90.0,
    ) -> str:
        """Write the config under ``root``, start node, wait for ``IDP_READY`` and return the issuer.

        ``port`` 0 lets the IdP pick a free port (pass the old port to restart at the same issuer);
        ``options`` adds config keys: ``jwks`` (reuse keys), ``ttl``, ``claims``,
        ``rotate_refresh_tokens``.
        """
        if self._proc is not None:
            raise RuntimeError("the test IdP is already running")
        ensure_idp_installed()
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is needed for the test IdP")
        root.mkdir(parents=True, exist_ok=True)
        config = root / "idp.json"
        config.write_text(json.dumps({"clients": clients, "accounts": accounts, **(options or {})}))
        argv = [node, str(SERVER), "--config", str(config), "--port", str(port)]
        if port:
            argv += ["--issuer", f"http://127.0.0.1:{port}"]
        # A node process that exits before it is ready with no error of its own (nothing but
        # warnings on stderr: a signal from outside) gets one more try. A config or code error,
        # or no answer within the timeout, fails at once; the error shows every attempt.
        failures: list[str] = []
        for attempt in (1, 2):
            issuer, failure, exited = self._launch(argv, root, attempt, timeout)
            if issuer is not None:
                return issuer
            failures.append(failure)
            if not exited or "Error" in failure:
                break
        raise RuntimeError("test IdP did not start:\n" + "\n".join(failures))

    def _launch(
        self, argv: list[str], root: Path, attempt: int, timeout: float
    ) -> tuple[str | None, str, bool]:
        """One start of node: ``(issuer, "", False)`` once ready, else ``(None, what happened,
        whether the process exited)``."""
        out, err = root / f"idp.{attempt}.out", root / f"idp.{attempt}.err"
        # Files rather than pipes: nobody has to keep draining them while the tests run.
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=IDP_DIR,
                env={**os.environ, "NODE_ENV": "test"},
            )
        self._err = err
        deadline = time.monotonic() + timeout
        status: int | None = None
        while time.monotonic() < deadline:
            for line in out.read_text(errors="replace").splitlines():
                if line.startswith(READY):
                    self.issuer = line[len(READY) :].strip()
                    return self.issuer, "", False
            status = self._proc.poll()
            if status is not None:
                break
            time.sleep(0.05)
        self.stop()
        how = "still not ready" if status is None else f"exited with status {status}"
        output = f"{out.read_text(errors='replace')}\n{err.read_text(errors='replace')}"
        failure = f"attempt {attempt}: {how}\n{output}"
        return None, failure, status is not None

    def stop(self) -> None:
        """Stop the node process (the IdP forgets every session, grant and token)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    @property
    def log(self) -> str:
        """What the IdP wrote on stderr (warnings, server errors, back-channel failures)."""
        path = self._err
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    # --- the IdP admin, played by the tests ---------------------------------------------------

    def _control(self, account_id: str, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.issuer is None:
            raise RuntimeError("the test IdP is not running")
        response = httpx.post(
            f"{self.issuer}/_test/accounts/{account_id}/{action}", json=body or {}, timeout=10
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def disable(self, account_id: str) -> None:
        """Disable the account: login and refresh fail (invalid_grant); its grants and sessions end."""
        self._control(account_id, "disable")

    def enable(self, account_id: str) -> None:
        """Enable the account again (tokens revoked by ``disable`` stay revoked)."""
        self._control(account_id, "enable")

    def set_groups(self, account_id: str, groups: list[str]) -> None:
        """Change the groups the next token exchange, refresh or userinfo call returns."""
        self._control(account_id, "groups", {"groups": groups})

    def backchannel_logout(self, account_id: str) -> list[int]:
        """End the account's sessions by OIDC Back-Channel Logout; the RPs' statuses (0: unreachable)."""
        statuses: list[int] = self._control(account_id, "logout")["statuses"]
        return statuses
