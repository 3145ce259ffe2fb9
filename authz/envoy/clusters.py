"""Clusters for :mod:`authz.envoy.render`: the gateway's gRPC workers, the portal, and one fixed
cluster per configured upstream, with its TLS settings.
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
)
from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
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

from authz.configtypes import GatewayConfig
from authz.envoy import upstreams
from authz.envoy.common import GRPC_CLUSTER, PORTAL_CLUSTER, _address, _pack, _seconds
from authz.errors import ConfigError

# Concurrent requests per cluster. Envoy's default circuit breaker is 1024; every in-flight
# inference request holds two ext_proc streams plus, briefly, an ext_authz call on gateway_grpc,
# and streams last minutes, so the default would fail closed at a few hundred users.
_MAX_CONCURRENT = 100_000

_HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Active gRPC health checks on the workers (grpc.health.v1, served by authz.ops.health): Envoy's
# main thread asks each worker once a second, whether or not traffic flowed (one tiny RPC per
# worker per second: negligible next to the requests, even on two cores). A worker answering
# NOT_SERVING (draining) or not answering within the timeout (stuck) twice in a row stops getting
# new requests; one SERVING answer brings it back. Envoy's default panic threshold (50%) is kept
# on purpose: when every worker of a replica drains at once, Envoy keeps using them rather than
# refusing the requests still on their way to it.
HEALTH_CHECK_INTERVAL = 1.0
HEALTH_CHECK_TIMEOUT = 1.0
HEALTH_CHECK_UNHEALTHY_THRESHOLD = 2
HEALTH_CHECK_HEALTHY_THRESHOLD = 1
# The longest a draining worker may keep receiving new requests: `unhealthy_threshold` checks, one
# interval apart, each answered NOT_SERVING at once. authz.service waits at least this long.
HEALTH_CHECK_DETECTION_SECONDS = HEALTH_CHECK_INTERVAL * HEALTH_CHECK_UNHEALTHY_THRESHOLD


# --- clusters -----------------------------------------------------------------------------------


def _grpc_cluster(config: GatewayConfig, ports: Sequence[int]) -> Cluster:
    host = _connect_host(config.listen.grpc.address)
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
        _connect_host(config.listen.portal.address),
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
) -> Cluster:
    ip = _is_ip(host)
    return Cluster(
        name=name,
        # A host name is resolved by Envoy and re-resolved as DNS changes; one connection target
        # at a time suits cloud endpoints behind their own load balancers (LOGICAL_DNS).
        type=ClusterDiscoveryType.STATIC if ip else ClusterDiscoveryType.LOGICAL_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.AUTO if ip else ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_seconds(connect_timeout),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[
                        LbEndpoint(endpoint=Endpoint(address=_address(host, port))) for port in ports
                    ]
                )
            ],
        ),
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


def _connect_host(listen_host: str) -> str:
    """The address Envoy dials for a service that listens on ``listen_host`` (a wildcard bind is
    reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)  # noqa: S104
