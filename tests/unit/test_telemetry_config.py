"""The telemetry section: defaults, the OTEL_* variables standing in for absent keys, and refusals."""

from __future__ import annotations

import pytest

from authz.config import loads
from authz.errors import ConfigError


def test_telemetry_is_off_by_default() -> None:
    """No endpoint, no Prometheus, no tracing unless configured."""
    telemetry = loads("{}", {}).telemetry
    assert telemetry.otlp.endpoint == ""
    assert not telemetry.prometheus.enabled
    assert not telemetry.tracing


def test_otel_variables_stand_in_for_absent_keys() -> None:
    """OTEL_EXPORTER_OTLP_* and OTEL_SERVICE_NAME fill keys the file leaves out, in their own units."""
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-tenant=acme",
        "OTEL_METRIC_EXPORT_INTERVAL": "15000",
        "OTEL_SERVICE_NAME": "gw-eu",
    }
    telemetry = loads("{}", environ).telemetry
    assert telemetry.otlp.endpoint == "http://collector:4317"
    assert telemetry.otlp.protocol == "grpc"
    assert dict(telemetry.otlp.headers) == {"authorization": "Bearer abc", "x-tenant": "acme"}
    assert telemetry.otlp.interval == 15.0
    assert telemetry.service_name == "gw-eu"
    assert telemetry.tracing


def test_keys_in_the_file_win_over_the_variables() -> None:
    """A key set in the file is never replaced by its variable."""
    text = "telemetry: {otlp: {endpoint: 'http://from-file:4318'}}"
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://from-env:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    otlp = loads(text, environ).telemetry.otlp
    assert otlp.endpoint == "http://from-file:4318"
    assert otlp.protocol == "grpc"


@pytest.mark.parametrize(
    ("text", "environ", "field"),
    [
        ("telemetry: {otlp: {endpoint: 'http://c:4318', protcol: grpc}}", {}, "telemetry.otlp.protcol"),
        ("telemetry: {otlp: {protocol: http/json}}", {}, "telemetry.otlp.protocol"),
        ("{}", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "telemetry.otlp.protocol"),
        ("telemetry: {otlp: {endpoint: 'collector:4318'}}", {}, "telemetry.otlp.endpoint"),
        ("telemetry: {otlp: {endpoint: 'http://c:4317/x', protocol: grpc}}", {}, "telemetry.otlp.endpoint"),
        ("telemetry: {traces: {sample_ratio: 1.5}}", {}, "telemetry.traces.sample_ratio"),
        ("telemetry: {otlp: {interval: 0}}", {}, "telemetry.otlp.interval"),
        ("{}", {"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL"),
        ("{}", {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ("telemetry: {prometheus: {enabled: true, port: 9001}}", {}, "telemetry.prometheus.port"),
        ("telemetry: {per_user: true}", {}, "telemetry.per_user"),
        ("portal: {admin_session_ttl: 0}", {}, "portal.admin_session_ttl"),
    ],
)
def test_bad_telemetry_settings_fail_naming_the_field(text: str, environ: dict[str, str], field: str) -> None:
    """Unknown keys, bad values and bad variables stop start-up with the field (or variable) named."""
    with pytest.raises(ConfigError) as caught:
        loads(text, environ)
    assert str(caught.value).startswith(f"{field}:")


def test_tracing_needs_an_endpoint_and_a_positive_ratio() -> None:
    """sample_ratio 0 turns tracing off even with an endpoint."""
    assert not loads(
        "telemetry: {otlp: {endpoint: 'http://c:4318'}, traces: {sample_ratio: 0}}", {}
    ).telemetry.tracing
    assert loads("telemetry: {otlp: {endpoint: 'http://c:4318'}}", {}).telemetry.tracing
