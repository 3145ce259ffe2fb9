"""Run the upstream emulator: ``python -m backends.emulator --host 127.0.0.1 --port 0``.

When it is listening it prints exactly one line, ``EMULATOR_READY <base URL>``, so a parent process
(``make run``, the benchmark, e2e fixtures) can start it on port 0 and read the port back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from backends.emulator.app import start_emulator
from backends.emulator.google import generate_service_account_key
from backends.emulator.state import DEFAULT_PROJECT, EmulatorState


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m backends.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="accept every caller: skip SigV4, bearer-token, project and role checks (benchmark upstream)",
    )
    parser.add_argument(
        "--state-file", type=Path, help="JSON state patch applied at start (see /_emulator/state)"
    )
    parser.add_argument(
        "--service-account-key",
        type=Path,
        action="append",
        default=[],
        help="write a fresh service-account key file here whose token_uri is this emulator, and trust it "
        "(repeatable)",
    )
    parser.add_argument(
        "--service-account-file",
        type=Path,
        action="append",
        default=[],
        help="trust an existing service-account key file (its token_uri must point here; repeatable)",
    )
    parser.add_argument(
        "--project", default=DEFAULT_PROJECT, help="project id written into generated key files"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    state = EmulatorState(verify=not args.no_verify)
    if args.state_file is not None:
        state.apply_patch(json.loads(args.state_file.read_text(encoding="utf-8")))
    for path in args.service_account_file:
        state.register_service_account_file(path)
    runner, url = await start_emulator(args.host, args.port, state)
    try:
        for path in args.service_account_key:
            # Written after binding because the key's token_uri must carry the port just chosen.
            await asyncio.to_thread(
                generate_service_account_key, path, token_uri=f"{url}/token", project_id=args.project
            )
            state.register_service_account_file(path)
        if args.project not in state.projects:
            state.projects.append(args.project)
        state.keep_as_defaults()
        print(f"EMULATOR_READY {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, serve until SIGINT or SIGTERM, and return the exit status."""
    args = _parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (OSError, ValueError, KeyError) as exc:
        print(f"emulator: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
