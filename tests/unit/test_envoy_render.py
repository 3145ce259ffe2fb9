"""The rendered Envoy bootstrap: filter order, fail-closed settings, routes, clusters (no sockets)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz import configtypes
from authz.config import loads
from authz.envoy import render as envoy_render
from authz.envoy import upstreams
from authz.envoy.render import load_for_render, render, render_yaml
from authz.errors import ConfigError
from backends.base import Endpoint
from backends.bedrock import BedrockConfig
from backends.vertex import VertexConfig

ROOT = Path(__file__).parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "config"
EXAMPLES = ("example.yaml", "dev.yaml")
BUFFER, EXT_AUTHZ = "envoy.filters.http.buffer", "envoy.filters.http.ext_authz"
PROC = "gateway.ext_proc"


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    return render(load_for_render(FIXTURES / "example.yaml", {}))


@pytest.fixture(scope="module")
def dev() -> dict[str, Any]:
    return render(load_for_render(FIXTURES / "dev.yaml", {}))


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    [listener] = bootstrap["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [network_filter] = chain["filters"]
    assert network_filter["name"] == "envoy.filters.network.http_connection_manager"
    config: dict[str, Any] = network_filter["typed_config"]
    return config


def http_filter(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    config: dict[str, Any] = next(f for f in hcm(bootstrap)["http_filters"] if f["name"] == name)[
        "typed_config"
    ]
    return config


def routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    [vhost] = hcm(bootstrap)["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    found: list[dict[str, Any]] = vhost["routes"]
    return found


def route(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in routes(bootstrap) if r["name"] == name)


def cluster(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)
    return found


def protocol_options(c: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = c["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    return options


def endpoints(c: dict[str, Any]) -> list[tuple[str, int]]:
    [locality] = c["load_assignment"]["endpoints"]
    return [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for e in locality["lb_endpoints"]
    ]


STREAMING = ("bedrock_stream", "vertex_stream")
NON_STREAMING = ("bedrock_invoke", "bedrock_inference_profiles", "vertex_invoke")


# --- filters ---------------------------------------------------------------------------------------


def test_filters_in_order_and_fail_closed(example: dict[str, Any]) -> None:
    """buffer, ext_authz, the ext_proc and router run in order; no service failure lets a request
    through."""
    assert [f["name"] for f in hcm(example)["http_filters"]] == [
        BUFFER,
        EXT_AUTHZ,
        PROC,
        "envoy.filters.http.router",
    ]
    for name in (EXT_AUTHZ, PROC):
        config = http_filter(example, name)
        assert config["failure_mode_allow"] is False
        assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == "gateway_grpc"
        assert config["status_on_error"] == {"code": "ServiceUnavailable"}
    authz = http_filter(example, EXT_AUTHZ)
    assert authz["transport_api_version"] == "V3"
    assert authz["grpc_service"]["timeout"] == "2s"
    assert authz["clear_route_cache"] is True
    # The start of the body, for max_tokens (spend reservations), as raw bytes and never a 413.
    assert authz["with_request_body"] == {
        "max_request_bytes": 128 * 1024,
        "allow_partial_message": True,
        "pack_as_bytes": True,
    }
    # Raw header bytes, one entry per line: repeated credentials and bad UTF-8 are refused.
    assert authz["encode_raw_headers"] is True
    assert http_filter(example, "envoy.filters.http.router")["suppress_envoy_headers"] is True


def test_upstream_ratelimit_headers_are_stripped_from_upstream_answers_only(example: dict[str, Any]) -> None:
    """Headers starting anthropic-ratelimit- are removed by an upstream filter of the router: from
    what upstreams answer, never from the gateway's own refusals; the codec filter ends the chain."""
    router = http_filter(example, "envoy.filters.http.router")
    strip, codec = router["upstream_http_filters"]
    assert codec["name"] == "envoy.filters.http.upstream_codec"
    assert strip["name"] == "gateway.strip_upstream_ratelimit"
    assert strip["typed_config"]["mutations"] == {
        "response_mutations": [{"remove_on_match": {"key_matcher": {"prefix": "anthropic-ratelimit-"}}}]
    }


def test_usage_endpoint_goes_to_the_portal(example: dict[str, Any]) -> None:
    """GET /api/oauth/usage is routed to the portal with ext_authz and the ext_proc off (the portal
    verifies the gateway token itself)."""
    routes = hcm(example)["route_config"]["virtual_hosts"][0]["routes"]
    (route,) = [r for r in routes if r["name"] == "portal_usage"]
    assert route["match"] == {"path": "/api/oauth/usage"}
    assert route["route"]["cluster"] == "gateway_portal"
    assert set(route["typed_per_filter_config"]) == {EXT_AUTHZ, PROC}


def test_whole_body_held_before_ext_authz(example: dict[str, Any]) -> None:
    """The buffer filter holds the body, up to limits.max_request_body_bytes, before ext_authz runs."""
    assert http_filter(example, BUFFER)["max_request_bytes"] == 20 * 1024 * 1024


def test_ext_proc_settings(example: dict[str, Any]) -> None:
    """The ext_proc may override modes, keeps its route, reads ext_authz metadata, sets only signing
    headers."""
    sign = http_filter(example, PROC)
    assert sign["allow_mode_override"] is True
    assert sign["message_timeout"] == "10s"
    assert sign["route_cache_action"] == "RETAIN"
    # ext_authz's identity, and what a failover attempt that answered itself says.
    assert sign["metadata_options"]["forwarding_namespaces"]["untyped"] == [EXT_AUTHZ, "gateway.attempt"]
    assert "observability_mode" not in sign  # blocking: nothing reaches the client unmetered
    # Only the headers the service reads travel in each message.
    forwarded = {p["exact"] for p in sign["forward_rules"]["allowed_headers"]["patterns"]}
    assert forwarded == {
        ":method",
        ":status",
        "content-type",
        "retry-after",
        "anthropic-beta",
        "anthropic-version",
        "x-gateway-answered",
        "x-gateway-attempts",
    }
    rules = sign["mutation_rules"]
    assert rules["disallow_is_error"] is True
    allowed = re.compile(rules["allow_expression"]["regex"])
    for header in (
        ":authority",
        ":path",
        "authorization",
        "x-amz-date",
        "x-amz-security-token",
        "x-goog-user-project",
    ):
        assert allowed.fullmatch(header), header
    for header in (":method", ":scheme", "x-envoy-original-path"):
        assert not allowed.fullmatch(header), header


def test_ext_procs_idle_unless_a_route_enables_them(example: dict[str, Any]) -> None:
    """At filter level the ext_proc sends nothing, so a codec-rejected request (no route) is never held."""
    for name in (PROC,):
        mode = http_filter(example, name)["processing_mode"]
        assert mode["request_header_mode"] == "SKIP"
        assert mode["response_header_mode"] == "SKIP"
        assert mode.get("request_body_mode", "NONE") == "NONE"
        assert mode.get("response_body_mode", "NONE") == "NONE"


def test_ext_proc_mode_on_every_inference_route(example: dict[str, Any]) -> None:
    """Bedrock POSTs send headers and the buffered body (SigV4 covers the body); Vertex and the GET
    send only headers (a bearer token covers no body). No route configures the response side: the
    service's answer to the request headers switches it on, so an ext_authz refusal's local reply
    never opens a stream to the service."""
    with_body = {"bedrock_stream", "bedrock_invoke"}
    for name in STREAMING + NON_STREAMING:
        mode = route(example, name)["typed_per_filter_config"][PROC]["overrides"]["processing_mode"]
        expected = {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        }
        if name in with_body:
            expected["request_body_mode"] = "BUFFERED"
        assert mode == expected, name


def test_ext_proc_mode_on_the_messages_routes(example: dict[str, Any]) -> None:
    """Messages POSTs hand the body to ext_proc (the model is in it); GET /v1/models sends only the
    request headers, which the exchange answers. The response side is the service's to switch on."""

    def mode(name: str) -> dict[str, str]:
        found: dict[str, str] = route(example, name)["typed_per_filter_config"][PROC]["overrides"][
            "processing_mode"
        ]
        return found

    common = {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    assert mode("messages") == {**common, "request_body_mode": "BUFFERED"}
    assert mode("messages_count_tokens") == {**common, "request_body_mode": "BUFFERED"}
    assert mode("messages_models") == common


# --- routes ----------------------------------------------------------------------------------------


def _route_for(
    bootstrap: dict[str, Any],
    method: str,
    path: str,
    content_length: int | None = 2,
    cluster: str | None = None,
) -> str:
    """The name of the first route whose path and header matchers accept the request (Envoy's order);
    ``cluster``: the x-gateway-upstream ext_authz set (the route is chosen again after it)."""
    headers = {":method": method}
    if content_length is not None:
        headers["content-length"] = str(content_length)
    if cluster is not None:
        headers["x-gateway-upstream"] = cluster
    bare = path.split("?", 1)[0]
    for r in routes(bootstrap):
        match = r["match"]
        if "path" in match and bare != match["path"]:
            continue
        if "prefix" in match and not bare.startswith(match["prefix"]):
            continue
        if "safe_regex" in match and not re.search(match["safe_regex"]["regex"], bare):
            continue
        if "path_separated_prefix" in match:
            prefix = match["path_separated_prefix"]
            if bare != prefix and not bare.startswith(prefix + "/"):
                continue
        if all(_header_matches(m, headers) for m in match.get("headers", [])):
            name: str = r["name"]
            return name
    raise AssertionError(f"no route for {method} {path}")


def _header_matches(matcher: dict[str, Any], headers: dict[str, str]) -> bool:
    value = headers.get(matcher["name"])
    if "present_match" in matcher:
        return value is not None
    if "string_match" in matcher:
        if "prefix" in matcher["string_match"]:
            return value is not None and value.startswith(matcher["string_match"]["prefix"])
        return bool(value == matcher["string_match"]["exact"])
    # int64 fields are strings in proto JSON.
    low, high = int(matcher["range_match"]["start"]), int(matcher["range_match"]["end"])
    return value is not None and low <= int(value) < high


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream", "bedrock_stream"),
        ("POST", "/model/anthropic.claude-haiku-4-5-20251001-v1:0/invoke", "bedrock_invoke"),
        (
            "POST",
            "/model/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile%2Fabc123/invoke",
            "bedrock_invoke",
        ),
        ("POST", "/model/us.anthropic.claude-opus-5-5/count-tokens", "bedrock_invoke"),
        ("GET", "/inference-profiles?type=SYSTEM_DEFINED", "bedrock_inference_profiles"),
        (
            "POST",
            "/v1/projects/acme/locations/us-east5/publishers/anthropic/models/claude-opus-5-5:streamRawPredict",
            "vertex_stream",
        ),
        (
            "POST",
            "/v1/projects/acme/locations/global/publishers/anthropic/models/claude-haiku-4-5@20251001:rawPredict",
            "vertex_invoke",
        ),
        (
            "POST",
            "/v1/projects/acme/locations/global/publishers/anthropic/models/count-tokens:rawPredict",
            "vertex_invoke",
        ),
        ("GET", "/healthz", "healthz"),
        ("GET", "/managed/settings", "portal_managed_settings"),
        ("GET", "/managed/settings?x=1", "portal_managed_settings"),
        ("GET", "/managed/settingsX", "not_found"),
        ("GET", "/model/m/invoke", "not_found"),
        ("POST", "/model/a/b/invoke", "not_found"),
        ("GET", "/inference-profilesX", "not_found"),
        ("POST", "/v1/messages", "messages"),
        ("POST", "/v1/messages?beta=true", "messages"),
        ("POST", "/v1/messages/count_tokens?beta=true", "messages_count_tokens"),
        ("GET", "/v1/models?limit=1000", "messages_models"),
        ("GET", "/v1/messages", "not_found"),
        ("POST", "/v1/messages/batches", "not_found"),
        ("POST", "/v1/models", "not_found"),
        ("GET", "/nope", "not_found"),
    ],
)
def test_client_paths_reach_their_routes(dev: dict[str, Any], method: str, path: str, expected: str) -> None:
    """Each Bedrock, Vertex and Messages client path (ARNs with %2F included) lands on its route,
    others on the 404."""
    assert _route_for(dev, method, path) == expected


def test_unknown_paths_get_the_404_envelope(dev: dict[str, Any]) -> None:
    """The catch-all route answers 404 itself with an Anthropic not_found_error envelope in JSON."""
    last = routes(dev)[-1]
    assert last["name"] == "not_found"
    assert last["match"] == {"prefix": "/"}
    reply = last["direct_response"]
    assert reply["status"] == 404
    assert json.loads(reply["body"]["inline_string"]) == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "Not found: this gateway serves the Messages, Bedrock and Vertex inference routes.",
        },
    }
    assert reply["body_format"]["content_type"] == "application/json"
    assert set(last["typed_per_filter_config"]) == {BUFFER, EXT_AUTHZ, PROC}


def test_declared_oversized_bodies_refused_before_reading(example: dict[str, Any]) -> None:
    """A Content-Length over the limit gets a 413 request_too_large envelope from the route table."""
    limit = 20 * 1024 * 1024
    assert _route_for(example, "POST", "/model/m/invoke", content_length=limit) == "bedrock_invoke"
    assert _route_for(example, "POST", "/model/m/invoke", content_length=limit + 1) == "too_large"
    assert _route_for(example, "POST", "/model/m/invoke", content_length=None) == "bedrock_invoke"
    reply = route(example, "too_large")["direct_response"]
    assert reply["status"] == 413
    assert json.loads(reply["body"]["inline_string"])["error"]["type"] == "request_too_large"
    assert set(route(example, "too_large")["typed_per_filter_config"]) == {BUFFER, EXT_AUTHZ, PROC}


def test_inference_routes_take_the_cluster_from_ext_authz(example: dict[str, Any]) -> None:
    """Inference routes take the cluster from ext_authz's header, strip it, and never time out a stream."""
    for name in STREAMING + NON_STREAMING:
        r = route(example, name)
        action = r["route"]
        assert action["cluster_header"] == "x-gateway-upstream"
        assert action["cluster_not_found_response_code"] == "INTERNAL_SERVER_ERROR"
        assert action["timeout"] == "0s"
        assert action["idle_timeout"] == "600s"
        assert action["auto_host_rewrite"] is False
        assert "x-gateway-upstream" in r["request_headers_to_remove"]
        assert "x-forwarded-for" in r["request_headers_to_remove"]
        assert "request_body_buffer_limit" not in r  # the buffer filter sets the stream's limit
        assert EXT_AUTHZ not in r["typed_per_filter_config"]


def test_healthz_bypasses_the_services(dev: dict[str, Any]) -> None:
    """/healthz goes to the portal over HTTP/1.1 with the buffer, ext_authz and the ext_proc off."""
    r = route(dev, "healthz")
    assert r["match"] == {"path": "/healthz"}
    assert r["route"]["cluster"] == "gateway_portal"
    assert r["typed_per_filter_config"][BUFFER]["disabled"] is True
    assert r["typed_per_filter_config"][EXT_AUTHZ]["disabled"] is True
    assert r["typed_per_filter_config"][PROC]["disabled"] is True
    portal = cluster(dev, "gateway_portal")
    assert endpoints(portal) == [("127.0.0.1", 19002)]
    protocol = protocol_options(portal)
    assert protocol["explicit_http_config"] == {"http_protocol_options": {}}


def test_managed_settings_go_to_the_portal_which_judges_the_token(dev: dict[str, Any]) -> None:
    """/managed/settings goes to the portal with ext_authz and the ext_proc off (the portal checks
    the bearer itself), and reaches no upstream."""
    r = route(dev, "portal_managed_settings")
    assert r["match"] == {"path": "/managed/settings"}
    assert r["route"]["cluster"] == "gateway_portal"
    assert r["typed_per_filter_config"][EXT_AUTHZ]["disabled"] is True
    assert r["typed_per_filter_config"][PROC]["disabled"] is True


# --- connection manager ----------------------------------------------------------------------------


def test_escaped_slashes_kept_and_underscores_rejected(example: dict[str, Any]) -> None:
    """Paths are normalised without decoding %2F, and header names with underscores are rejected."""
    manager = hcm(example)
    assert manager["normalize_path"] is True
    assert manager["merge_slashes"] is True
    assert manager["path_with_escaped_slashes_action"] == "KEEP_UNCHANGED"
    assert manager["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    assert manager["max_request_headers_kb"] == 96
    assert manager["stream_idle_timeout"] == "600s"
    assert manager["request_timeout"] == "0s"


def test_no_client_is_trusted(example: dict[str, Any]) -> None:
    """Envoy uses the peer address, trusts no client as internal, drops client-sent internal headers
    and the client's own forwarding headers before anything reads them."""
    manager = hcm(example)
    assert manager["use_remote_address"] is True
    # Unset on purpose: set with no cidr_ranges, Envoy would trust RFC1918 and loopback clients.
    assert "internal_address_config" not in manager
    assert manager["generate_request_id"] is True
    [early] = manager["early_header_mutation_extensions"]
    matchers = [m["remove_on_match"]["key_matcher"] for m in early["typed_config"]["mutations"]]
    assert [m["prefix"] for m in matchers if "prefix" in m] == ["x-gateway-", "x-envoy-"]
    assert {m["exact"] for m in matchers if "exact" in m} == {
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-proto",
    }


def test_local_replies_use_the_anthropic_envelope(example: dict[str, Any]) -> None:
    """Envoy's own errors map to envelopes by status, and replies already in JSON are left alone."""
    mappers = hcm(example)["local_reply_config"]["mappers"]
    kinds = {}
    for mapper in mappers:
        [*status_filters, not_json] = mapper["filter"]["and_filter"]["filters"]
        assert all("status_code_filter" in f for f in status_filters)
        expression = not_json["extension_filter"]["typed_config"]["expression"]
        assert "response.headers['content-type'].startsWith('application/json')" in expression
        assert mapper["body_format_override"]["content_type"] == "application/json"
        body = json.loads(mapper["body"]["inline_string"])
        assert body["type"] == "error"
        bounds = {}
        for f in status_filters:
            comparison = f["status_code_filter"]["comparison"]
            # EQ is the enum's zero value, so proto JSON leaves it out.
            bounds[comparison.get("op", "EQ")] = comparison["value"]["default_value"]
        kinds[(bounds.get("EQ") or bounds["GE"], bounds.get("EQ") or bounds["LE"])] = body["error"]["type"]
    assert kinds == {
        (413, 413): "request_too_large",
        (404, 404): "not_found_error",
        (429, 429): "rate_limit_error",
        (400, 499): "invalid_request_error",
        (500, 599): "api_error",
    }


def test_admin_and_listener_addresses(dev: dict[str, Any]) -> None:
    """Admin and the listener bind where listen.envoy_admin and listen.envoy say."""
    assert dev["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    [listener] = dev["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}


def test_unrecorded_requests_go_to_the_access_log_service(dev: dict[str, Any]) -> None:
    """Every request no usage row was written for is reported to the gateway's access-log service
    over gRPC (batched), with the credential and Claude Code headers; recorded ones are filtered."""
    [log] = hcm(dev)["access_log"]
    assert log["name"] == "envoy.access_loggers.http_grpc"
    config = log["typed_config"]
    assert config["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "gateway_grpc"
    assert config["common_config"]["buffer_flush_interval"] == "1s"
    assert {"authorization", "x-api-key", "x-claude-code-session-id"} <= set(
        config["additional_request_headers_to_log"]
    )
    expression = log["filter"]["extension_filter"]["typed_config"]["expression"]
    assert "gateway.recorded" in expression and "'recorded'" in expression
    ext_proc = http_filter(dev, PROC)
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["gateway.recorded"]


def test_access_log_on_request(dev: dict[str, Any]) -> None:
    """access_log=True adds a stdout access log beside the service's."""
    config = load_for_render(FIXTURES / "dev.yaml", {})
    logs = hcm(render(config, access_log=True))["access_log"]
    assert [log["name"] for log in logs] == ["envoy.access_loggers.http_grpc", "envoy.access_loggers.stdout"]


# --- clusters --------------------------------------------------------------------------------------


def test_grpc_cluster_lists_every_worker(example: dict[str, Any]) -> None:
    """gateway_grpc is one HTTP/2 cluster with a port per worker, or the ports given."""
    grpc = cluster(example, "gateway_grpc")
    assert grpc["type"] == "STATIC"
    assert grpc["connect_timeout"] == "1s"
    assert endpoints(grpc) == [("127.0.0.1", port) for port in (9001, 9002, 9003, 9004)]
    protocol = protocol_options(grpc)
    assert protocol["explicit_http_config"] == {"http2_protocol_options": {}}
    assert grpc["circuit_breakers"]["thresholds"][0]["max_requests"] > 1024
    custom = render(load_for_render(FIXTURES / "example.yaml", {}), grpc_ports=[7001, 7005])
    assert endpoints(cluster(custom, "gateway_grpc")) == [("127.0.0.1", 7001), ("127.0.0.1", 7005)]


def test_workers_are_health_checked_over_grpc(example: dict[str, Any]) -> None:
    """gateway_grpc health-checks every worker with the gRPC health protocol every second, twice
    failing before a worker is dropped, and the drain outlasts that detection; no other cluster is
    actively checked."""
    from authz.envoy.names import HEALTH_CHECK_DETECTION_SECONDS
    from authz.service import DRAIN_SECONDS

    (check,) = cluster(example, "gateway_grpc")["health_checks"]
    assert check["grpc_health_check"] == {}
    assert (check["interval"], check["no_traffic_interval"], check["timeout"]) == ("1s", "1s", "1s")
    assert (check["unhealthy_threshold"], check["healthy_threshold"]) == (2, 1)
    assert DRAIN_SECONDS >= HEALTH_CHECK_DETECTION_SECONDS >= 2 * 1.0
    others = [c for c in example["static_resources"]["clusters"] if c["name"] != "gateway_grpc"]
    assert all("health_checks" not in c for c in others)


def test_https_clusters_verify_certificates_with_sni(example: dict[str, Any]) -> None:
    """Each cloud cluster resolves its host, sends SNI and checks the certificate chain and SAN."""
    for name, host in (
        ("upstream_bedrock-us", "bedrock-runtime.us-east-1.amazonaws.com"),
        ("upstream_vertex-global", "aiplatform.googleapis.com"),
    ):
        c = cluster(example, name)
        assert c["type"] == "LOGICAL_DNS"
        assert c["dns_lookup_family"] == "V4_PREFERRED"
        assert c["connect_timeout"] == "5s"
        assert endpoints(c) == [(host, 443)]
        tls = c["transport_socket"]["typed_config"]
        assert (
            tls["@type"] == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        )
        assert tls["sni"] == host
        validation = tls["common_tls_context"]["validation_context"]
        assert validation["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": host}}
        ]
        protocol = protocol_options(c)
        assert protocol["upstream_http_protocol_options"] == {"auto_sni": True, "auto_san_validation": True}
        assert set(protocol["auto_config"]) == {"http_protocol_options", "http2_protocol_options"}


def test_ca_bundle_is_configurable() -> None:
    """ca_bundle names the PEM file the cloud certificates are checked against."""
    config = load_for_render(FIXTURES / "example.yaml", {})
    c = cluster(render(config, ca_bundle="/etc/pki/tls/cert.pem"), "upstream_bedrock-us")
    validation = c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/pki/tls/cert.pem"}


def test_loopback_upstreams_are_plain_http(dev: dict[str, Any]) -> None:
    """Emulator upstreams are static HTTP/1.1 clusters without TLS."""
    for name in ("upstream_bedrock", "upstream_vertex"):
        c = cluster(dev, name)
        assert c["type"] == "STATIC"
        assert endpoints(c) == [("127.0.0.1", 18081)]
        assert "transport_socket" not in c
        protocol = protocol_options(c)
        assert protocol == {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
        }


def test_clashing_cluster_names_rejected() -> None:
    """Two upstream names that sanitise to the same cluster name are a configuration error."""
    config = load_for_render(FIXTURES / "dev.yaml", {})
    bedrock = config.upstream("bedrock")
    clashing = dataclasses.replace(config, upstreams=(("a b", bedrock), ("a_b", bedrock)))
    with pytest.raises(ConfigError, match="clashes"):
        render(clashing)


def test_clashing_ports_rejected() -> None:
    """A gRPC worker port that lands on the portal's port is a configuration error."""
    config = load_for_render(FIXTURES / "dev.yaml", {})
    crowded = dataclasses.replace(config, workers=2)
    with pytest.raises(ConfigError, match="19002"):
        render(crowded)


# --- endpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (
            configtypes.Upstream(kind="bedrock", settings=BedrockConfig(region="us-west-2")),
            ("https", "bedrock-runtime.us-west-2.amazonaws.com", 443),
        ),
        (
            configtypes.Upstream(kind="bedrock", settings=BedrockConfig(region="us-gov-west-1", fips=True)),
            ("https", "bedrock-runtime-fips.us-gov-west-1.amazonaws.com", 443),
        ),
        (
            configtypes.Upstream(kind="vertex", settings=VertexConfig(region="us-east5", project="proj-1")),
            ("https", "us-east5-aiplatform.googleapis.com", 443),
        ),
        (
            configtypes.Upstream(kind="vertex", settings=VertexConfig(region="global", project="proj-1")),
            ("https", "aiplatform.googleapis.com", 443),
        ),
        (
            configtypes.Upstream(
                kind="bedrock", settings=BedrockConfig(region="us-east-1", base_url="http://127.0.0.1:18081")
            ),
            ("http", "127.0.0.1", 18081),
        ),
        (
            configtypes.Upstream(
                kind="vertex",
                settings=VertexConfig(
                    region="global", project="proj-1", base_url="https://vertex.proxy.example.com"
                ),
            ),
            ("https", "vertex.proxy.example.com", 443),
        ),
    ],
)
def test_endpoint_of_each_upstream(upstream: configtypes.Upstream, expected: tuple[str, str, int]) -> None:
    """base_url wins; otherwise the cloud's regional (or FIPS, or global) endpoint."""
    assert upstreams.endpoint(upstream) == Endpoint(*expected)


def test_authority_omits_default_ports() -> None:
    """The authority carries the port only when it is not the scheme's default, and brackets IPv6."""
    assert Endpoint("https", "aiplatform.googleapis.com", 443).authority == "aiplatform.googleapis.com"
    assert Endpoint("http", "127.0.0.1", 80).authority == "127.0.0.1"
    assert Endpoint("http", "127.0.0.1", 18081).authority == "127.0.0.1:18081"
    assert Endpoint("http", "::1", 18081).authority == "[::1]:18081"


def test_cluster_names_are_sanitised() -> None:
    """Cluster names are upstream_<name> with characters outside [A-Za-z0-9_.-] replaced."""
    assert upstreams.cluster_name("bedrock-us") == "upstream_bedrock-us"
    assert upstreams.cluster_name("eu west/1") == "upstream_eu_west_1"


def test_ipv6_loopback_upstream_is_static() -> None:
    """An IPv6 literal base_url becomes a static cluster on that address."""
    config = loads(
        """
upstreams:
  local:
    kind: bedrock
    region: us-east-1
    base_url: http://[::1]:18081
policies:
  - name: all
    groups: [all]
    upstreams: [local]
""",
        {},
    )
    c = cluster(render(config), "upstream_local")
    assert c["type"] == "STATIC"
    assert endpoints(c) == [("::1", 18081)]


# --- committed examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_committed_examples_match_a_fresh_rendering(name: str) -> None:
    """envoy/<name> is exactly the rendering of tests/fixtures/config/<name> (see envoy/README.md)."""
    fresh = render_yaml(load_for_render(FIXTURES / name, {}))
    assert (ROOT / "envoy" / name).read_text(encoding="utf-8") == fresh


def test_rendering_is_plain_yaml(example: dict[str, Any]) -> None:
    """The YAML text loads back to the same plain data the renderer returned."""
    text = render_yaml(load_for_render(FIXTURES / "example.yaml", {}))
    assert yaml.safe_load(text) == example


def test_main_prints_the_bootstrap(capsys: pytest.CaptureFixture[str]) -> None:
    """python -m authz.envoy.render prints the rendering, or a one-line error and exit status 2."""
    assert envoy_render.main(["--skip-file-refs", str(FIXTURES / "dev.yaml")]) == 0
    assert capsys.readouterr().out == (ROOT / "envoy" / "dev.yaml").read_text(encoding="utf-8")
    assert envoy_render.main([str(FIXTURES / "example.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


# --- TLS on the listener ---------------------------------------------------------------------------

TLS_CONFIG = """
listen:
  envoy:
    address: 0.0.0.0
    port: 8443
    tls: {certificate_file: /etc/gw/tls/tls.crt, private_key_file: /etc/gw/tls/tls.key}
portal: {public_url: "https://gw.example.com"}
"""


def test_tls_listener_reads_its_certificate_through_path_based_sds(tmp_path: Path) -> None:
    """With listen.envoy.tls the listener speaks TLS 1.2+ with ALPN h2 and http/1.1, its certificate
    from an SDS file beside the bootstrap whose secret watches the PEM files' directory."""
    config = loads(TLS_CONFIG, {})
    path = envoy_render.write_bootstrap(config, tmp_path / "envoy.yaml")
    bootstrap = yaml.safe_load(path.read_text(encoding="utf-8"))
    sds_file = tmp_path / "envoy.listener-tls.yaml"
    assert bootstrap["node"] == {"id": "claude-gateway", "cluster": "claude-gateway"}
    [listener] = bootstrap["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    socket = chain["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context["@type"].endswith("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext")
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    assert common["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_2"}
    [secret_config] = common["tls_certificate_sds_secret_configs"]
    assert secret_config["sds_config"] == {
        "path_config_source": {"path": str(sds_file)},
        "resource_api_version": "V3",
    }
    sds = yaml.safe_load(sds_file.read_text(encoding="utf-8"))
    [secret] = sds["resources"]
    assert secret["@type"] == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert secret["name"] == secret_config["name"]
    assert secret["tls_certificate"] == {
        "certificate_chain": {"filename": "/etc/gw/tls/tls.crt"},
        "private_key": {"filename": "/etc/gw/tls/tls.key"},
        "watched_directory": {"path": "/etc/gw/tls"},
    }


def test_plain_listener_has_no_transport_socket_and_no_node(dev: dict[str, Any]) -> None:
    """Without listen.envoy.tls the listener stays plain HTTP and the bootstrap names no node."""
    [listener] = dev["static_resources"]["listeners"]
    assert "transport_socket" not in listener["filter_chains"][0]
    assert "node" not in dev


def test_tls_rendering_needs_a_place_for_its_sds_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TLS bootstrap cannot go to standard output alone: render() refuses without the SDS
    path, the command line says to use --output, and --output writes both files."""
    config = loads(TLS_CONFIG, {})
    with pytest.raises(ConfigError) as info:
        render(config)
    assert info.value.field == "listen.envoy.tls" and "--output" in info.value.problem
    source = tmp_path / "gateway.yaml"
    source.write_text(TLS_CONFIG, encoding="utf-8")
    assert envoy_render.main([str(source)]) == 2
    assert "listen.envoy.tls" in capsys.readouterr().err
    assert envoy_render.main([str(source), "--output", str(tmp_path / "out" / "envoy.yaml")]) == 0
    assert (tmp_path / "out" / "envoy.yaml").exists() and (
        tmp_path / "out" / "envoy.listener-tls.yaml"
    ).exists()
