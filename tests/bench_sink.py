"""A discarding OTLP/HTTP collector for ``make bench``: it reads each export and answers 200 without
decoding it, so the telemetry variant pays what exporting costs the gateway and nothing for a
collector's work (a real collector runs elsewhere)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Discard(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as collectors serve it

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                self.rfile.read(size + 2)
                if size == 0:
                    break
        else:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.exports += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OtlpSink:
    """The sink on a free loopback port, served from a thread of the bench process."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
        self._server.exports = 0  # type: ignore[attr-defined]
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``telemetry.otlp.endpoint`` for the stacks."""
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def exports(self) -> int:
        """Export requests received so far."""
        count: int = self._server.exports  # type: ignore[attr-defined]
        return count

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
