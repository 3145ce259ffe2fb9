"""Failover chains: which upstreams a chain holds, and how Envoy is rendered to try them in turn
(one cluster per chain, its upstreams by priority, retrying routes, the per-attempt filter)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from authz.config import loads
from authz.configtypes import Failover, GatewayConfig
from authz.envoy import failover
from authz.envoy.render import load_for_render, render
from authz.errors import ConfigError
from tests.unit.test_envoy_render import _route_for, cluster, hcm, protocol_options, route, routes

FIXTURES = Path(__file__).parent.parent / "fixtures" / "config"

CONFIG = """
upstreams:
  bedrock-us: {kind: bedrock, region: us-east-1, connect_timeout: 2}
  bedrock-eu: {kind: bedrock, region: eu-west-1, connect_timeout: 4}
  vertex: {kind: vertex, region: us-east5, project: acme-prod}
  vertex-eu: {kind: vertex, region: europe-west1, project: acme-prod}
  api: {kind: anthropic, credentials: {api_key: sk-ant-x}}
  local: {kind: bedrock, region: us-east-1, base_url: "http://127.0.0.1:9999"}
policies:
  - name: eng
    groups: [eng]
    upstreams: [bedrock-us, vertex, bedrock-eu]
  - name: same-chain
    groups: [sales]
    upstreams: [bedrock-us, vertex, bedrock-eu]
  - name: vertex-only
    groups: [research]
    upstreams: [vertex, vertex-eu]
  - name: one
    groups: [contractors]
    upstreams: [api]
  - name: mixed
    groups: [dev]
    upstreams: [local, bedrock-us]
"""


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return loads(CONFIG, {})


@pytest.fixture(scope="module")
def rendered(config: GatewayConfig) -> dict[str, Any]:
    return render(config)


def _chains(config: GatewayConfig) -> dict[tuple[str, ...], frozenset[str]]:
    return {chain.upstreams: chain.formats for chain in failover.chains(config)}


# --- which upstreams a chain holds ------------------------------------------------------------------


def test_chains_are_the_upstreams_serving_each_format_in_policy_order(config: GatewayConfig) -> None:
    """Each policy gives a chain per client format with two or more upstreams serving it, in the
    policy's order; a chain shared by policies or formats is one; a lone upstream is no chain."""
    assert _chains(config) == {
        ("bedrock-us", "bedrock-eu"): frozenset({"bedrock"}),
        ("bedrock-us", "vertex", "bedrock-eu"): frozenset({"messages"}),
        ("vertex", "vertex-eu"): frozenset({"vertex", "messages"}),
        ("local", "bedrock-us"): frozenset({"bedrock", "messages"}),
    }


def test_max_attempts_shortens_chains_and_one_turns_failover_off(config: GatewayConfig) -> None:
    """failover.max_attempts keeps that many upstreams of each chain; 1 leaves no chain at all."""
    two = dataclasses.replace(config, failover=Failover(max_attempts=2))
    assert ("bedrock-us", "vertex") in _chains(two)
    assert all(len(upstreams) == 2 for upstreams in _chains(two))
    assert failover.chains(dataclasses.replace(config, failover=Failover(max_attempts=1))) == ()


def test_chain_cluster_names_say_how_many_upstreams_and_which() -> None:
    """A chain's cluster is failover<N>_ and its upstreams' safe names joined by __; one upstream
    keeps its own cluster."""
    assert failover.chain_cluster(("bedrock-us", "vertex eu")) == "failover2_bedrock-us__vertex_eu"
    assert failover.cluster_for(("a", "b", "c")) == "failover3_a__b__c"
    assert failover.cluster_for(("a",)) == "upstream_a"
    assert failover.chain_cluster(("a", "b")).startswith(failover.attempts_prefix(2))


def test_max_attempts_must_be_positive() -> None:
    """failover.max_attempts below 1 fails at load naming the field; unknown keys fail too."""
    with pytest.raises(ConfigError, match=r"failover\.max_attempts"):
        loads(CONFIG + "failover: {max_attempts: 0}\n", {})
    with pytest.raises(ConfigError, match=r"failover\.retries"):
        loads(CONFIG + "failover: {retries: 2}\n", {})


# --- clusters ---------------------------------------------------------------------------------------


def _endpoints(c: dict[str, Any]) -> list[tuple[int, str, str, int]]:
    """(priority, upstream name, host, port) of each endpoint."""
    found = []
    for locality in c["load_assignment"]["endpoints"]:
        [endpoint] = locality["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        name = endpoint["metadata"]["filter_metadata"]["gateway.upstream"]["name"]
        found.append((locality.get("priority", 0), name, address["address"], address["port_value"]))
    return found


def test_a_chain_cluster_holds_its_upstreams_by_priority(rendered: dict[str, Any]) -> None:
    """The cluster's endpoints are the chain's upstreams at priorities 0, 1, 2, each named in its
    metadata; host names resolve per endpoint; the longest connect timeout of them applies."""
    c = cluster(rendered, "failover3_bedrock-us__vertex__bedrock-eu")
    assert _endpoints(c) == [
        (0, "bedrock-us", "bedrock-runtime.us-east-1.amazonaws.com", 443),
        (1, "vertex", "us-east5-aiplatform.googleapis.com", 443),
        (2, "bedrock-eu", "bedrock-runtime.eu-west-1.amazonaws.com", 443),
    ]
    assert c["type"] == "STRICT_DNS"
    assert c["connect_timeout"] == "5s"  # vertex's default; the Bedrock ones say 2 and 4
    assert c["load_assignment"]["cluster_name"] == c["name"]


def test_each_tls_endpoint_has_its_own_sni_and_certificate_name(rendered: dict[str, Any]) -> None:
    """Every endpoint matches a TLS context naming its own host (SNI and SAN), so a retry to the next
    upstream never presents the first one's name; HTTP/2 is offered over ALPN."""
    c = cluster(rendered, "failover3_bedrock-us__vertex__bedrock-eu")
    by_name = {m["name"]: m for m in c["transport_socket_matches"]}
    for _, name, host, _ in _endpoints(c):
        match = by_name[name]
        assert match["match"] == {"upstream": name}
        tls = match["transport_socket"]["typed_config"]
        assert tls["sni"] == host
        [san] = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
        assert san["matcher"] == {"exact": host}
    for locality in c["load_assignment"]["endpoints"]:
        [endpoint] = locality["lb_endpoints"]
        name = endpoint["metadata"]["filter_metadata"]["gateway.upstream"]["name"]
        assert endpoint["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"upstream": name}
    options = protocol_options(c)
    assert "auto_config" in options
    # Not the client's :authority (what the router sees when it picks the connection).
    assert "upstream_http_protocol_options" not in options


def test_a_loopback_endpoint_makes_the_chain_plain_http1(rendered: dict[str, Any]) -> None:
    """A chain with a plain-HTTP loopback endpoint speaks HTTP/1.1 to all, TLS to the cloud one."""
    c = cluster(rendered, "failover2_local__bedrock-us")
    assert [m["name"] for m in c["transport_socket_matches"]] == ["bedrock-us"]
    assert protocol_options(c)["explicit_http_config"] == {"http_protocol_options": {}}
    assert "transport_socket" not in c


def _filters(c: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = protocol_options(c)["http_filters"]
    return found


def test_each_attempt_runs_the_attempt_filter_then_the_upstream_ones(rendered: dict[str, Any]) -> None:
    """A chain cluster's upstream filters are the attempt's ext_proc, the rate-limit strip and the
    codec; the attempt filter learns the upstream Envoy picked from the endpoint's metadata, reads
    ext_authz's identity, fails closed and sees nothing of the response."""
    c = cluster(rendered, "failover3_bedrock-us__vertex__bedrock-eu")
    attempt, strip, codec = _filters(c)
    assert (attempt["name"], strip["name"], codec["name"]) == (
        "gateway.attempt",
        "gateway.strip_upstream_ratelimit",
        "envoy.filters.http.upstream_codec",
    )
    proc = attempt["typed_config"]
    assert proc["request_attributes"] == [
        "xds.upstream_host_metadata.filter_metadata['gateway.upstream']['name']",
        "upstream.request_attempt_count",
    ]
    assert proc["metadata_options"]["forwarding_namespaces"]["untyped"] == ["envoy.filters.http.ext_authz"]
    assert proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["gateway.attempt"]
    assert proc["failure_mode_allow"] is False
    assert proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "gateway_grpc"
    mode = proc["processing_mode"]
    assert (mode["request_header_mode"], mode["request_body_mode"]) == ("SEND", "BUFFERED")
    assert (mode["response_header_mode"], mode.get("response_body_mode", "NONE")) == ("SKIP", "NONE")


def test_the_attempt_gets_the_body_only_where_an_attempt_may_need_it(rendered: dict[str, Any]) -> None:
    """A Vertex-only chain serving only the Vertex format would need no body (a token signs no
    bytes), but this one also serves Messages requests, translated from theirs; a Bedrock chain
    signs its body."""
    mode = _filters(cluster(rendered, "failover2_vertex__vertex-eu"))[0]["typed_config"]["processing_mode"]
    assert mode["request_body_mode"] == "BUFFERED"
    bedrock = _filters(cluster(rendered, "failover2_bedrock-us__bedrock-eu"))[0]
    assert bedrock["typed_config"]["processing_mode"]["request_body_mode"] == "BUFFERED"
    vertex_only = loads(
        CONFIG.split("policies:")[0]
        + "policies:\n  - {name: v, groups: [v], upstreams: [vertex, vertex-eu]}\n"
        "failover: {max_attempts: 2}\n",
        {},
    )
    assert _chains(vertex_only) == {("vertex", "vertex-eu"): frozenset({"vertex", "messages"})}


def test_single_upstream_clusters_keep_the_routers_filters(rendered: dict[str, Any]) -> None:
    """An upstream's own cluster carries no filters of its own: no attempt stream, today's cost."""
    for name in ("upstream_api", "upstream_bedrock-us", "upstream_vertex"):
        assert "http_filters" not in protocol_options(cluster(rendered, name)), name


def test_clashing_chain_clusters_are_rejected() -> None:
    """Two chains whose names come out the same fail the rendering naming both."""
    text = """
upstreams:
  a__b: {kind: bedrock, region: us-east-1}
  c: {kind: bedrock, region: us-east-1}
  a: {kind: bedrock, region: us-east-1}
  b__c: {kind: bedrock, region: us-east-1}
policies:
  - {name: one, groups: [x], upstreams: [a__b, c]}
  - {name: two, groups: [y], upstreams: [a, b__c]}
"""
    with pytest.raises(ConfigError, match="failover2_a__b__c"):
        render(loads(text, {}))


# --- routes -----------------------------------------------------------------------------------------


def test_a_failover_cluster_selects_its_retrying_route(rendered: dict[str, Any]) -> None:
    """Before ext_authz a request matches its plain route; once ext_authz named a chain cluster, the
    variant for that many upstreams; an upstream's own cluster keeps the plain route."""
    path = "/v1/messages?beta=true"
    assert _route_for(rendered, "POST", path) == "messages"
    assert _route_for(rendered, "POST", path, cluster="upstream_api") == "messages"
    chain3 = "failover3_bedrock-us__vertex__bedrock-eu"
    assert _route_for(rendered, "POST", path, cluster=chain3) == "messages_failover3"
    assert _route_for(rendered, "POST", path, cluster="failover2_vertex__vertex-eu") == "messages_failover2"
    stream = "/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream"
    assert (
        _route_for(rendered, "POST", stream, cluster="failover2_local__bedrock-us")
        == "bedrock_stream_failover2"
    )
    assert _route_for(rendered, "POST", stream, cluster="upstream_bedrock-us") == "bedrock_stream"
    # The Messages models list is answered by the exchange itself: it never fails over.
    assert _route_for(rendered, "GET", "/v1/models", cluster=chain3) == "messages_models"


def test_failover_routes_retry_once_per_further_upstream_on_the_next_priority(
    rendered: dict[str, Any],
) -> None:
    """A route for chains of N upstreams retries N-1 times, each on a priority not yet tried, on a
    connection failure, a reset before any answer or a retriable status, without waiting, with the
    body kept for the retries."""
    for attempts in (2, 3):
        r = route(rendered, f"messages_failover{attempts}")
        policy = r["route"]["retry_policy"]
        assert policy["num_retries"] == attempts - 1
        assert policy["retry_on"] == "connect-failure,refused-stream,reset,retriable-status-codes"
        assert policy["retriable_status_codes"] == [429, 500, 502, 503, 504, 529]
        assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
        assert policy["retry_priority"]["typed_config"]["update_frequency"] == 1
        assert policy["retry_back_off"] == {"base_interval": "0.001s", "max_interval": "0.001s"}
        assert int(r["request_body_buffer_limit"]) == 20 * 1024 * 1024
        assert "per_try_timeout" not in policy  # it would cut streams: it spans the whole response
        assert r["route"]["cluster_header"] == "x-gateway-upstream"
        assert r["route"]["timeout"] == "0s"


def test_single_upstream_routes_never_retry(rendered: dict[str, Any]) -> None:
    """The plain inference routes have no retry policy: a lone upstream's failure is answered."""
    for r in routes(rendered):
        if "route" in r and not r["name"].endswith(("_failover2", "_failover3")):
            assert "retry_policy" not in r["route"], r["name"]


def test_a_chain_clusters_answers_say_whose_they_are_from_envoys_records(rendered: dict[str, Any]) -> None:
    """Every upstream answer on a chain cluster names the upstream Envoy used and the attempts it
    made, over whatever the upstream sent under those names; the upstream's rate-limit headers go.
    An upstream's own cluster adds nothing."""
    [_, tagger, _] = _filters(cluster(rendered, "failover2_vertex__vertex-eu"))
    assert tagger["typed_config"]["mutations"]["response_mutations"] == [
        {"remove_on_match": {"key_matcher": {"prefix": "anthropic-ratelimit-"}}},
        {"remove": "x-gateway-answered"},
        {"remove": "x-gateway-attempts"},
        {
            "append": {
                "header": {
                    "key": "x-gateway-answered",
                    "value": "%UPSTREAM_METADATA(gateway.upstream:name)%",
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        },
        {
            "append": {
                "header": {"key": "x-gateway-attempts", "value": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        },
    ]
    router = hcm(rendered)["http_filters"][-1]["typed_config"]
    assert "x-gateway" not in str(router["upstream_http_filters"])
    # Nothing on the routes: the router would add it to its own replies too, which reach the
    # client without passing gateway.ext_proc.
    assert "response_headers_to_add" not in route(rendered, "messages_failover2")


def test_a_chain_cluster_never_runs_out_of_retries(rendered: dict[str, Any]) -> None:
    """The cluster allows as many retries in flight as requests (Envoy's default, 3, would stop
    failover when many requests fail at once)."""
    [thresholds] = cluster(rendered, "failover2_vertex__vertex-eu")["circuit_breakers"]["thresholds"]
    assert thresholds["max_retries"] == thresholds["max_requests"] == 100_000
    [single] = cluster(rendered, "upstream_vertex")["circuit_breakers"]["thresholds"]
    assert "max_retries" not in single


def test_gateway_ext_proc_gets_no_body_where_the_attempt_signs_it(rendered: dict[str, Any]) -> None:
    """On a Bedrock failover route gateway.ext_proc gets the headers only (each attempt is signed
    by the attempt filter); a Messages one still gets the body, whose model it admits."""

    def mode(name: str) -> dict[str, str]:
        found: dict[str, str] = route(rendered, name)["typed_per_filter_config"]["gateway.ext_proc"][
            "overrides"
        ]["processing_mode"]
        return found

    assert mode("bedrock_stream").get("request_body_mode") == "BUFFERED"
    assert mode("bedrock_stream_failover2").get("request_body_mode", "NONE") == "NONE"
    assert mode("messages_failover2")["request_body_mode"] == "BUFFERED"


def test_no_chain_renders_nothing_of_failover() -> None:
    """With failover off (max_attempts 1), nothing of it is rendered: no cluster, no route."""
    config = load_for_render(FIXTURES / "dev.yaml", {})
    off = render(dataclasses.replace(config, failover=Failover(max_attempts=1)))
    names = [c["name"] for c in off["static_resources"]["clusters"]]
    assert not any(n.startswith("failover") for n in names)
    assert not any("failover" in r["name"] for r in routes(off))
    assert "failover2_bedrock__vertex" in [c["name"] for c in render(config)["static_resources"]["clusters"]]
    assert hcm(off)["http_filters"] == hcm(render(config))["http_filters"]
