"""The deployment files agree with the CLI and the Envoy routes they rely on."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
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


def test_dockerfile_builds_a_non_root_image_without_test_dependencies() -> None:
    """The image installs the package without extras (so neither the dev tools nor the embedded
    PostgreSQL), runs as a numeric non-root user, and its build context leaves out the emulator,
    the development stack and the tests."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = [line.strip() for line in dockerfile.splitlines() if "pip install" in line]
    assert installs[0] == "RUN pip install . \\"
    # The only other install puts opentelemetry-proto's files back over xds-protos' older copy.
    assert installs[1:] == ["&& pip install --force-reinstall --no-deps \\"]
    user = next(line for line in dockerfile.splitlines() if line.startswith("USER "))
    uid, _, gid = user.split()[1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1 :].count("!authz/") == 1
    assert {"authz/dev/", "backends/emulator/"} <= set(ignored)
    assert "!tests/" not in ignored
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "pgserver" not in runtime and "pytest" not in runtime
    assert any(d.startswith("pgserver") for d in project["optional-dependencies"]["embedded"])


# The modules the image runs: every entry point of the `authz` command and what they import.
PRODUCTION_ENTRY_POINTS = (
    "authz.cli",
    "authz.service",
    "authz.supervisor",
    "authz.ops.doctor",
    "authz.ops.health",
    "authz.ops.retention",
    "authz.signin.service_tokens",
    "authz.signin.admin",
    "authz.billing.usage_report",
    "authz.envoy.render",
)

_BLOCKER = """
import importlib.abc, sys
BLOCKED = ("pgserver", "backends.emulator", "authz.dev", "pytest", "playwright", "anthropic")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name.startswith(BLOCKED):
            raise ImportError(f"{name} is not in the production image")
sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
from authz.cli import build_parser
build_parser()
print("ok")
"""


def test_production_entry_points_never_import_test_or_development_code() -> None:
    """Every module the image runs imports (and builds the CLI) with pgserver, the emulator, the
    development stack and the test tools made unimportable, as they are in the image."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKER, *PRODUCTION_ENTRY_POINTS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


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
