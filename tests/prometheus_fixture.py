"""A real Prometheus server (Debian's ``prometheus``, installed by ``make deps-system``) for the
tests: it scrapes the given targets every second, on a free loopback port, with its data in a
temporary directory."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from authz.dev.ports import free_port

BINARY = Path("/usr/bin/prometheus")


class PrometheusServer:
    """``prometheus`` scraping ``targets`` (``host:port``) every second."""

    def __init__(self, root: Path, targets: Sequence[str]) -> None:
        if not BINARY.exists():
            pytest.fail(f"{BINARY} is missing: `make deps-system` installs Debian's prometheus")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "claude-gateway", "static_configs": [{"targets": list(targets)}]}
            ],
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self._log = (root / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                str(BINARY),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: see {root / 'prometheus.log'}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready within 60s")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant PromQL query (an error in the query fails the test)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of a query that aggregates to one series, None when it has no data."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def stop(self) -> None:
        """Stop the server."""
        self._proc.terminate()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
