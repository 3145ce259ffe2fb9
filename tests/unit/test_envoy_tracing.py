"""Envoy's tracing and the routes to the portal's telemetry and admin endpoints, as rendered."""

from __future__ import annotations

from typing import Any

import pytest

from authz.config import loads
from authz.envoy.render import load_for_render, render
from authz.envoy.tracing import COLLECTOR_CLUSTER
from authz.gateway.accesslog import is_portal_path
from tests.unit.test_envoy_render import (
    FIXTURES,
    _route_for,
    cluster,
    endpoints,
    hcm,
    protocol_options,
    route,
    routes,
)

TRACED_HTTP = (
    "telemetry: {otlp: {endpoint: 'http://127.0.0.1:4318', headers: {x-tenant: acme}},"
    " traces: {sample_ratio: 0.25}}"
)
TRACED_GRPC = "telemetry: {otlp: {endpoint: 'https://otel.example.com', protocol: grpc}}"


def _provider(bootstrap: dict[str, Any]) -> dict[str, Any]:
    tracing = hcm(bootstrap)["tracing"]
    assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"
    config: dict[str, Any] = tracing["provider"]["typed_config"]
    return config


def test_no_tracing_without_an_endpoint() -> None:
    """Without telemetry.otlp.endpoint nothing is traced and there is no collector cluster."""
    bootstrap = render(load_for_render(FIXTURES / "dev.yaml", {}))
    assert "tracing" not in hcm(bootstrap)
    assert all(c["name"] != COLLECTOR_CLUSTER for c in bootstrap["static_resources"]["clusters"])


def test_http_tracing_samples_at_the_ratio_and_posts_to_the_traces_path() -> None:
    """OTLP/HTTP: spans go to <endpoint>/v1/traces with the headers, sampled at ratio x 100 percent."""
    bootstrap = render(loads(TRACED_HTTP, {}))
    assert hcm(bootstrap)["tracing"]["random_sampling"] == {"value": 25.0}
    provider = _provider(bootstrap)
    assert provider["service_name"] == "claude-gateway-envoy"
    http = provider["http_service"]
    assert http["http_uri"]["uri"] == "http://127.0.0.1:4318/v1/traces"
    assert http["http_uri"]["cluster"] == COLLECTOR_CLUSTER
    assert http["request_headers_to_add"] == [{"header": {"key": "x-tenant", "value": "acme"}}]
    collector = cluster(bootstrap, COLLECTOR_CLUSTER)
    assert endpoints(collector) == [("127.0.0.1", 4318)]
    assert "http_protocol_options" in protocol_options(collector)["explicit_http_config"]
    assert "transport_socket" not in collector


def test_grpc_tracing_uses_http2_and_tls_for_https() -> None:
    """OTLP/gRPC: an Envoy gRPC service on an HTTP/2 cluster, TLS-verified for https, port 443 by default."""
    bootstrap = render(loads(TRACED_GRPC, {}), ca_bundle="/ca.pem")
    provider = _provider(bootstrap)
    assert provider["grpc_service"]["envoy_grpc"]["cluster_name"] == COLLECTOR_CLUSTER
    collector = cluster(bootstrap, COLLECTOR_CLUSTER)
    assert endpoints(collector) == [("otel.example.com", 443)]
    assert "http2_protocol_options" in protocol_options(collector)["explicit_http_config"]
    tls = collector["transport_socket"]["typed_config"]
    assert tls["sni"] == "otel.example.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": "/ca.pem"}


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/metrics", "portal_telemetry"),
        ("POST", "/v1/logs", "portal_telemetry"),
        ("POST", "/v1/traces", "portal_telemetry"),
        ("GET", "/v1/metrics", "not_found"),
        ("GET", "/admin", "portal_admin"),
        ("GET", "/admin/usage.csv", "portal_admin"),
        ("GET", "/administrator", "not_found"),
    ],
)
def test_telemetry_and_admin_paths_reach_the_portal(method: str, path: str, expected: str) -> None:
    """Client telemetry (POST only) and the admin pages go to the portal; nothing else new is routed."""
    bootstrap = render(load_for_render(FIXTURES / "dev.yaml", {}))
    assert _route_for(bootstrap, method, path) == expected


def test_telemetry_route_skips_the_services_but_keeps_the_body_cap() -> None:
    """The portal checks the token itself: ext_authz and ext_proc off, the buffer filter still caps."""
    bootstrap = render(load_for_render(FIXTURES / "dev.yaml", {}))
    filters = route(bootstrap, "portal_telemetry")["typed_per_filter_config"]
    assert set(filters) == {"envoy.filters.http.ext_authz", "gateway.ext_proc"}


def test_envoys_tracer_batches_its_exports_only_when_tracing() -> None:
    """With tracing on, runtime layers raise the tracer's flush batch (an admin layer stays last);
    without it the bootstrap keeps Envoy's default runtime."""
    traced = render(loads(TRACED_HTTP, {}))["layered_runtime"]["layers"]
    assert traced[0]["static_layer"]["tracing.opentelemetry.min_flush_spans"] == 512
    assert traced[-1] == {"name": "admin", "admin_layer": {}}
    assert "layered_runtime" not in render(load_for_render(FIXTURES / "dev.yaml", {}))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/.well-known/jwks.json"),
        ("POST", "/oauth/token"),
        ("GET", "/device"),
        ("POST", "/device/approve"),
        ("GET", "/admin"),
        ("GET", "/admin/usage.csv?by=user"),
        ("POST", "/v1/metrics"),
        ("POST", "/v1/traces"),
    ],
)
def test_the_access_log_ignores_exactly_the_portals_paths(method: str, path: str) -> None:
    """Every path Envoy routes to the portal is one the access-log service leaves alone, and no
    inference or unknown path is."""
    bootstrap = render(load_for_render(FIXTURES / "dev.yaml", {}))
    assert _route_for(bootstrap, method, path) in {"healthz"} | {
        r["name"] for r in routes(bootstrap) if r["name"].startswith("portal_")
    }
    assert is_portal_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke",
        "/nowhere",
        "/v1/messages",
        "/v1/projects/p",
    ],
)
def test_inference_and_unknown_paths_are_not_portal_paths(path: str) -> None:
    """Requests the access log accounts for (inference, Envoy's own 404s) are never skipped."""
    assert not is_portal_path(path)
