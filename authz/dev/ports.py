"""Free loopback ports for the development stack and the tests."""

from __future__ import annotations

import socket

from authz.errors import GatewayError


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports, all held open until chosen so none repeats."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def consecutive_free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (gateway workers listen on port + index)."""
    for _ in range(200):
        base = free_port(host)
        ok = True
        for offset in range(1, count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, base + offset))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise GatewayError(f"no {count} consecutive free ports on {host}")
