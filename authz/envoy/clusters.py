"""Clusters for :mod:`authz.envoy.render`: the gateway's gRPC workers, the portal, one fixed
cluster per configured upstream, with its TLS settings, and one per failover chain
(:mod:`authz.envoy.failover`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    ClusterTransportSocketMatch,
)
from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    Metadata,
    TransportSocket,
    UpstreamHttpProtocolOptions,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsAutoHttpConfig,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Struct

from authz.configtypes import GatewayConfig
from authz.envoy import failover, upstreams
from authz.envoy.common import _address, _pack, _seconds
from authz.envoy.filters import attempt_ext_proc, upstream_filters
from authz.envoy.names import (
    ENDPOINT_NAMESPACE,
    GRPC_CLUSTER,
    HEALTH_CHECK_HEALTHY_THRESHOLD,
    HEALTH_CHECK_INTERVAL,
    HEALTH_CHECK_TIMEOUT,
    HEALTH_CHECK_UNHEALTHY_THRESHOLD,
    PORTAL_CLUSTER,
    connect_host,
)
from authz.errors import ConfigError

# Concurrent requests per cluster. Envoy's default circuit breaker is 1024; every in-flight
# inference request holds two ext_proc streams plus, briefly, an ext_authz call on gateway_grpc,
# and streams last minutes, so the default would fail closed at a few hundred users.
_MAX_CONCURRENT = 100_000

_HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


# --- clusters -----------------------------------------------------------------------------------


def _grpc_cluster(config: GatewayConfig, ports: Sequence[int]) -> Cluster:
    host = connect_host(config.listen.grpc.address)
    return _cluster(
        GRPC_CLUSTER,
        host,
        ports,
        connect_timeout=1.0,
        # gRPC needs HTTP/2 (HttpProtocolOptions.explicit_http_config).
        protocol=HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http2_protocol_options=Http2ProtocolOptions()
            )
        ),
        health_checks=[_grpc_health_check()],
    )


def _grpc_health_check() -> HealthCheck:
    """The workers' active health check (HealthCheck.grpc_health_check; service "" is the server)."""
    return HealthCheck(
        timeout=_seconds(HEALTH_CHECK_TIMEOUT),
        interval=_seconds(HEALTH_CHECK_INTERVAL),
        # Default 60 s until the cluster has carried traffic: a worker stuck before the first
        # request would go unnoticed for a minute (HealthCheck.no_traffic_interval).
        no_traffic_interval=_seconds(HEALTH_CHECK_INTERVAL),
        unhealthy_threshold=HEALTH_CHECK_UNHEALTHY_THRESHOLD,
        healthy_threshold=HEALTH_CHECK_HEALTHY_THRESHOLD,
        grpc_health_check=HealthCheckGrpcHealthCheck(service_name=""),
    )


def _portal_cluster(config: GatewayConfig) -> Cluster:
    return _cluster(
        PORTAL_CLUSTER,
        connect_host(config.listen.portal.address),
        [config.listen.portal.port],
        connect_timeout=1.0,
        protocol=HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http_protocol_options=Http1ProtocolOptions()
            )
        ),
    )


def _upstream_clusters(config: GatewayConfig, ca_bundle: str) -> list[Cluster]:
    clusters: list[Cluster] = []
    seen: dict[str, str] = {}
    for name, upstream in config.upstreams:
        cluster = upstreams.cluster_name(name)
        if cluster in seen:
            raise ConfigError(
                f"upstreams.{name}",
                f"name clashes with upstream {seen[cluster]!r} as Envoy cluster {cluster}",
            )
        seen[cluster] = name
        ep = upstreams.endpoint(upstream)
        if ep.tls:
            protocol = HttpProtocolOptions(
                # SNI and certificate SAN follow the :authority that gateway.ext_proc sets, which is
                # the same host as the cluster's fixed sni below
                # (UpstreamHttpProtocolOptions.auto_sni, auto_san_validation).
                upstream_http_protocol_options=UpstreamHttpProtocolOptions(
                    auto_sni=not _is_ip(ep.host), auto_san_validation=not _is_ip(ep.host)
                ),
                # HTTP/2 when the server offers it over ALPN, else HTTP/1.1 (auto_config).
                auto_config=HttpProtocolOptionsAutoHttpConfig(
                    http_protocol_options=Http1ProtocolOptions(),
                    http2_protocol_options=Http2ProtocolOptions(),
                ),
            )
            transport = _upstream_tls(ep.host, ca_bundle)
        else:
            # Plain HTTP only reaches loopback (authz.config.validate enforces it).
            protocol = HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http_protocol_options=Http1ProtocolOptions()
                )
            )
            transport = None
        clusters.append(
            _cluster(
                cluster,
                ep.host,
                [ep.port],
                connect_timeout=upstream.settings.connect_timeout,
                protocol=protocol,
                transport=transport,
            )
        )
    return clusters


# The endpoint metadata key Envoy matches transport_socket_matches against
# (Cluster.transport_socket_matches).
_SOCKET_MATCH = "envoy.transport_socket_match"


def _failover_clusters(config: GatewayConfig, ca_bundle: str) -> list[Cluster]:
    """One cluster per failover chain (authz.envoy.failover): its upstreams as endpoints at
    priorities 0, 1, ..., so a request goes to the first and each retry of a failover route to the
    next (the routes' previous_priorities retry priority). Each endpoint carries its upstream's name
    (endpoint metadata ``gateway.upstream``), which the attempt filter reads to sign for it and the
    route writes on the response; a TLS endpoint gets its own TLS settings, SNI and certificate name
    fixed to its host (transport_socket_matches: auto_sni would follow the client's :authority,
    since the router picks the connection before the attempt filter sets the upstream's)."""
    clusters: list[Cluster] = []
    seen: dict[str, str] = {}
    for chain in failover.chains(config):
        if chain.cluster in seen:
            raise ConfigError(
                "policies",
                f"the failover chain {' > '.join(chain.upstreams)} clashes with {seen[chain.cluster]!r}"
                f" as Envoy cluster {chain.cluster}",
            )
        seen[chain.cluster] = " > ".join(chain.upstreams)
        clusters.append(_failover_cluster(config, chain, ca_bundle))
    return clusters


def _failover_cluster(config: GatewayConfig, chain: failover.Chain, ca_bundle: str) -> Cluster:
    endpoints: list[LocalityLbEndpoints] = []
    matches: list[ClusterTransportSocketMatch] = []
    hosts: list[str] = []
    for priority, name in enumerate(chain.upstreams):
        ep = upstreams.endpoint(config.upstream(name))
        hosts.append(ep.host)
        metadata = {ENDPOINT_NAMESPACE: Struct.from_dict({"name": name})}
        if ep.tls:
            metadata[_SOCKET_MATCH] = Struct.from_dict({"upstream": name})
            matches.append(
                ClusterTransportSocketMatch(
                    name=name,
                    match=Struct.from_dict({"upstream": name}),
                    transport_socket=_upstream_tls(ep.host, ca_bundle),
                )
            )
        endpoints.append(
            LocalityLbEndpoints(
                priority=priority,
                lb_endpoints=[
                    LbEndpoint(
                        endpoint=Endpoint(address=_address(ep.host, ep.port)),
                        metadata=Metadata(filter_metadata=metadata),
                    )
                ],
            )
        )
    default_transport: TransportSocket | None = None
    if len(matches) == len(chain.upstreams):
        # Every endpoint speaks TLS: HTTP/2 where ALPN offers it, as for one upstream. Envoy checks
        # ALPN against the cluster's own transport socket, which no endpoint uses here (each
        # matches its own): the first endpoint's.
        default_transport = matches[0].transport_socket
        protocol = HttpProtocolOptions(
            auto_config=HttpProtocolOptionsAutoHttpConfig(
                http_protocol_options=Http1ProtocolOptions(),
                http2_protocol_options=Http2ProtocolOptions(),
            )
        )
    else:
        # A plain-HTTP (loopback) endpoint has no ALPN: HTTP/1.1 to every endpoint.
        protocol = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http_protocol_options=Http1ProtocolOptions()
            )
        )
    protocol.http_filters = upstream_filters(
        attempt_ext_proc(config.limits, request_body=failover.needs_request_body(chain, config)),
        tag_answer=True,
    )
    cluster = _cluster(
        chain.cluster,
        hosts[0],
        [],
        # The longest any of its upstreams allows: a connection is never cut sooner than its own
        # upstream's setting says.
        connect_timeout=max(config.upstream(n).settings.connect_timeout for n in chain.upstreams),
        protocol=protocol,
        transport=default_transport,
        endpoints=endpoints,
    )
    # A host name per priority: STRICT_DNS resolves each endpoint (LOGICAL_DNS takes exactly one).
    if not all(_is_ip(host) for host in hosts):
        cluster.type = ClusterDiscoveryType.STRICT_DNS
        cluster.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    cluster.transport_socket_matches = matches
    # Retries in flight on the cluster (CircuitBreakers.Thresholds.max_retries, 3 by default): past
    # it Envoy would stop failing over exactly when many requests fail at once.
    for thresholds in cluster.circuit_breakers.thresholds if cluster.circuit_breakers else ():
        thresholds.max_retries = _MAX_CONCURRENT
    return cluster


def _upstream_tls(host: str, ca_bundle: str) -> TransportSocket:
    ip = _is_ip(host)
    san = SubjectAltNameMatcher(
        san_type=SubjectAltNameMatcherSanType.IP_ADDRESS if ip else SubjectAltNameMatcherSanType.DNS,
        matcher=StringMatcher(exact=host),
    )
    tls = UpstreamTlsContext(
        # RFC 6066 forbids IP literals in SNI.
        sni="" if ip else host,
        common_tls_context=CommonTlsContext(
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=ca_bundle),
                match_typed_subject_alt_names=[san],
            ),
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(tls))


def _cluster(
    name: str,
    host: str,
    ports: Sequence[int],
    *,
    connect_timeout: float,
    protocol: HttpProtocolOptions,
    transport: TransportSocket | None = None,
    health_checks: Sequence[HealthCheck] = (),
    endpoints: Sequence[LocalityLbEndpoints] | None = None,
) -> Cluster:
    ip = _is_ip(host)
    if endpoints is None:
        endpoints = [
            LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(host, port))) for port in ports]
            )
        ]
    return Cluster(
        name=name,
        # A host name is resolved by Envoy and re-resolved as DNS changes; one connection target
        # at a time suits cloud endpoints behind their own load balancers (LOGICAL_DNS).
        type=ClusterDiscoveryType.STATIC if ip else ClusterDiscoveryType.LOGICAL_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.AUTO if ip else ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_seconds(connect_timeout),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=list(endpoints)),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=_MAX_CONCURRENT,
                    max_pending_requests=_MAX_CONCURRENT,
                    max_requests=_MAX_CONCURRENT,
                )
            ]
        ),
        typed_extension_protocol_options={_HPO_KEY: _pack(protocol)},
        transport_socket=transport,
        health_checks=list(health_checks),
    )


# --- helpers ------------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
