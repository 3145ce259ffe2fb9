"""Envoy's side of tracing for :mod:`authz.envoy.render`: the HTTP connection manager's
``tracing`` with the OpenTelemetry tracer, and the cluster it exports spans to.

With ``telemetry.otlp.endpoint`` set and ``telemetry.traces.sample_ratio`` above 0, Envoy starts
(or, given a client ``traceparent``, continues) a span per request, sampled at that ratio
(HttpConnectionManager.Tracing.random_sampling), and its ext_authz and ext_proc gRPC calls carry
the context of their egress spans in gRPC metadata, which the services continue
(:mod:`authz.telemetry.tracing`). Spans go to the same collector as the services' telemetry, over
OTLP/gRPC or OTLP/HTTP (OpenTelemetryConfig.grpc_service, .http_service). The collector headers
(``telemetry.otlp.headers``) are written into the bootstrap: keep the rendered file private when
they hold a credential.
"""

from __future__ import annotations

import datetime
from urllib.parse import urlsplit

from envoy_data_plane.envoy.config.bootstrap.v3 import LayeredRuntime, RuntimeLayer, RuntimeLayerAdminLayer
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpService,
    HttpUri,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerTracing,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Struct, Value

from authz.configtypes import Telemetry
from authz.envoy.clusters import _cluster, _upstream_tls
from authz.envoy.common import _pack

COLLECTOR_CLUSTER = "otlp_collector"

# Envoy's OpenTelemetry tracer exports as soon as 5 spans are buffered (runtime key
# tracing.opentelemetry.min_flush_spans), an HTTP or gRPC call every other request at three spans
# per request. Batches of 512, or every 5 seconds (tracing.opentelemetry.flush_interval_ms), cost a
# fraction of that and match the services' span exporter (authz/telemetry/tracing.py).
FLUSH_SPANS = 512
FLUSH_INTERVAL_MS = 5000


def tracing(telemetry: Telemetry) -> HttpConnectionManagerTracing | None:
    """The connection manager's tracing, or None when tracing is off."""
    if not telemetry.tracing:
        return None
    otlp = telemetry.otlp
    timeout = datetime.timedelta(seconds=otlp.timeout)
    name = f"{telemetry.service_name}-envoy"
    if otlp.protocol == "grpc":
        provider = OpenTelemetryConfig(
            grpc_service=GrpcService(
                envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=COLLECTOR_CLUSTER),
                timeout=timeout,
                initial_metadata=[HeaderValue(key=k, value=v) for k, v in otlp.headers],
            ),
            service_name=name,
        )
    else:
        provider = OpenTelemetryConfig(
            http_service=HttpService(
                http_uri=HttpUri(
                    uri=f"{otlp.endpoint.rstrip('/')}/v1/traces", cluster=COLLECTOR_CLUSTER, timeout=timeout
                ),
                request_headers_to_add=[
                    HeaderValueOption(header=HeaderValue(key=k, value=v)) for k, v in otlp.headers
                ],
            ),
            service_name=name,
        )
    return HttpConnectionManagerTracing(
        random_sampling=Percent(value=telemetry.traces.sample_ratio * 100.0),
        provider=TracingHttp(name="envoy.tracers.opentelemetry", typed_config=_pack(provider)),
    )


def runtime(telemetry: Telemetry) -> LayeredRuntime | None:
    """The runtime layers setting the tracer's batching, or None when tracing is off (Envoy's
    default layers then apply). An admin layer stays last, as in Envoy's default."""
    if not telemetry.tracing:
        return None
    values = {
        "tracing.opentelemetry.min_flush_spans": Value(number_value=FLUSH_SPANS),
        "tracing.opentelemetry.flush_interval_ms": Value(number_value=FLUSH_INTERVAL_MS),
    }
    return LayeredRuntime(
        layers=[
            RuntimeLayer(name="tracing", static_layer=Struct(fields=values)),
            RuntimeLayer(name="admin", admin_layer=RuntimeLayerAdminLayer()),
        ]
    )


def collector_cluster(telemetry: Telemetry, ca_bundle: str) -> Cluster | None:
    """The cluster Envoy exports spans to, or None when tracing is off."""
    if not telemetry.tracing:
        return None
    otlp = telemetry.otlp
    url = urlsplit(otlp.endpoint)
    tls = url.scheme == "https"
    host = url.hostname or ""
    port = url.port or (443 if tls else 80)
    # OTLP/gRPC needs HTTP/2; OTLP/HTTP is HTTP/1.1 here (HttpProtocolOptions.explicit_http_config).
    explicit = (
        HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        if otlp.protocol == "grpc"
        else HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
    )
    return _cluster(
        COLLECTOR_CLUSTER,
        host,
        [port],
        connect_timeout=min(otlp.timeout, 5.0),
        protocol=HttpProtocolOptions(explicit_http_config=explicit),
        transport=_upstream_tls(host, ca_bundle) if tls else None,
    )
