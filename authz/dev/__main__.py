"""``python -m authz.dev`` (what ``make run`` runs): the whole gateway on loopback for development."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from authz.dev.devstack import run_forever
from authz.errors import GatewayError


def main() -> int:
    """Start the development stack and wait for Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m authz.dev", description=__doc__)
    parser.add_argument("--state-dir", default=".run", help="where generated keys, config and data go")
    args = parser.parse_args()
    try:
        return run_forever(root=Path(args.state_dir), environ=dict(os.environ))
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
