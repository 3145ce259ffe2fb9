"""The deployment files agree with the CLI and the Envoy routes they rely on."""

from __future__ import annotations

from pathlib import Path

import yaml

from authz.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_compose_gateway_command_parses_with_the_cli() -> None:
    """compose.yaml runs the gateway with a command line the `authz` CLI accepts."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    args = build_parser().parse_args(gateway["command"])
    assert args.command == "run" and args.config == "/etc/claude-gateway/gateway.yaml"
    assert "8080:8080" in gateway["ports"]
    # The health check uses the route Envoy serves without authentication.
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])


def test_dockerfile_installs_the_cli_entry_point() -> None:
    """The image's entry point is the `authz` console script the package declares."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["authz"]' in dockerfile
    assert 'authz = "authz.cli:main"' in (ROOT / "pyproject.toml").read_text()
