"""The real Envoy binary accepts the tracing configuration for both OTLP transports."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.config import loads
from authz.envoy.render import render_yaml
from tests.integration.test_envoy_validate import validate

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "telemetry",
    [
        "{otlp: {endpoint: 'http://127.0.0.1:4318', headers: {x-tenant: acme}}, traces: {sample_ratio: 0.5}}",
        "{otlp: {endpoint: 'https://otel.example.com', protocol: grpc, headers: {authorization: Bearer x}}}",
    ],
)
def test_tracing_renderings_validate(tmp_path: Path, telemetry: str) -> None:
    """envoy --mode validate accepts the OpenTelemetry tracer over OTLP/HTTP and over OTLP/gRPC with TLS."""
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(loads(f"telemetry: {telemetry}", {})), encoding="utf-8")
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
