"""The deployment files agree with the CLI and the Envoy routes they rely on."""

from __future__ import annotations

import json
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


def test_compose_provisions_prometheus_and_grafana_with_the_dashboards() -> None:
    """Prometheus mounts the shipped scrape config and Grafana the shipped data source and dashboards."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    mounts = {
        name: {v.split(":")[0]: v.split(":")[1] for v in services[name]["volumes"]}
        for name in ("prometheus", "grafana")
    }
    assert mounts["prometheus"]["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["grafana"]["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/claude-gateway.yaml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == mounts["grafana"]["./deploy/grafana/dashboards"]
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    for path in (ROOT / "deploy/grafana/dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == uid, f"{path.name}: {panel['title']}"
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["gateway:9464"]
