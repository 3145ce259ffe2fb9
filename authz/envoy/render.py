"""Render Envoy's bootstrap from the gateway's typed configuration.

The bootstrap is built from envoy-data-plane's typed messages, so a misspelt field fails here and
not in production, then converted to the plain proto-JSON shape (snake_case keys) Envoy reads as
YAML. Layout (DESIGN.md, "Envoy" and "Inference path"):

* one listener; filters buffer -> ext_authz -> ``gateway.ext_proc`` -> router, all failing
  closed; the ext_proc acts only where a route switches it on;
* inference routes by path and method only, each sending to the cluster that ext_authz names in
  ``x-gateway-upstream``; ``/healthz`` to the portal; bodies over the limit get a 413 envelope and
  every other path a 404 envelope;
* clusters: the gateway's gRPC workers, the portal, one fixed cluster per configured upstream, and
  one per failover chain, whose inference routes retry a failed attempt on the next upstream
  (:mod:`authz.envoy.failover`);
* with ``listen.envoy.tls``, TLS on the listener, its certificate read through an SDS file written
  beside the bootstrap (:mod:`authz.envoy.tls`), so :func:`write_bootstrap` writes both.

``python -m authz.envoy.render CONFIG > envoy.yaml`` prints the rendering (see ``envoy/README.md``;
with TLS, ``--output envoy.yaml`` writes the SDS file too).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import betterproto2
import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CoreHttpProtocolOptions
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptionsHeadersWithUnderscoresAction
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerPathWithEscapedSlashesAction,
)

from authz import config as config_loader
from authz.configtypes import GatewayConfig
from authz.envoy import failover
from authz.envoy.clusters import _failover_clusters, _grpc_cluster, _portal_cluster, _upstream_clusters
from authz.envoy.common import _address, _pack, _seconds
from authz.envoy.filters import (
    _buffer,
    _ext_authz,
    _ext_proc,
    _local_reply_config,
    _router,
    _service_access_log,
    _stdout_access_log,
    _strip_internal_headers,
)
from authz.envoy.names import (
    ATTEMPT_FILTER,
    BUFFER_FILTER,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    GRPC_CLUSTER,
    PORTAL_CLUSTER,
    UPSTREAM_HEADER,
)
from authz.envoy.routes import _route_config
from authz.envoy.tls import NODE, sds_path_for, transport_socket, write_sds_file
from authz.envoy.tracing import collector_cluster, runtime, tracing
from authz.errors import ConfigError

__all__ = [
    "BUFFER_FILTER",
    "DEFAULT_CA_BUNDLE",
    "EXT_AUTHZ_FILTER",
    "EXT_PROC_FILTER",
    "GRPC_CLUSTER",
    "PORTAL_CLUSTER",
    "UPSTREAM_HEADER",
    "load_for_render",
    "main",
    "render",
    "render_yaml",
    "write_bootstrap",
]

DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def render(
    config: GatewayConfig,
    *,
    grpc_ports: Sequence[int] | None = None,
    ca_bundle: str = DEFAULT_CA_BUNDLE,
    access_log: bool = False,
    tls_sds_file: str | None = None,
) -> dict[str, Any]:
    """Envoy's bootstrap for ``config`` as plain data (proto JSON, snake_case keys).

    ``grpc_ports`` are the ports of the gateway's gRPC workers (default: ``listen.grpc.port`` and
    the ``workers - 1`` ports after it). ``ca_bundle`` is the PEM file that cloud certificates are
    verified against. ``access_log`` adds an access log on stdout. ``tls_sds_file`` is the absolute
    path of the listener's SDS file, required with ``listen.envoy.tls`` (:func:`write_bootstrap`
    writes it).
    """
    ports = (
        list(grpc_ports)
        if grpc_ports is not None
        else [config.listen.grpc.port + i for i in range(config.workers)]
    )
    if not ports:
        raise ConfigError("listen.grpc", "at least one gRPC port is needed")
    _check_ports(config, ports)
    tls = config.listen.envoy.tls is not None
    if tls and not tls_sds_file:
        raise ConfigError(
            "listen.envoy.tls",
            "the listener's certificate is read through an SDS file written beside the bootstrap:"
            " render to a file (--output) rather than to standard output",
        )
    collector = collector_cluster(config.telemetry, ca_bundle)
    bootstrap = Bootstrap(
        node=NODE if tls else None,
        admin=Admin(address=_address(config.listen.envoy_admin.address, config.listen.envoy_admin.port)),
        layered_runtime=runtime(config.telemetry),
        static_resources=BootstrapStaticResources(
            listeners=[_listener(config, access_log, tls_sds_file if tls else None)],
            clusters=[
                _grpc_cluster(config, ports),
                _portal_cluster(config),
                *_upstream_clusters(config, ca_bundle),
                *_failover_clusters(config, ca_bundle),
                *([collector] if collector is not None else []),
            ],
        ),
    )
    rendered: dict[str, Any] = bootstrap.to_dict(casing=betterproto2.Casing.SNAKE)
    _spell_out_fail_closed(rendered)
    return rendered


def render_yaml(
    config: GatewayConfig,
    *,
    grpc_ports: Sequence[int] | None = None,
    ca_bundle: str = DEFAULT_CA_BUNDLE,
    access_log: bool = False,
    tls_sds_file: str | None = None,
) -> str:
    """:func:`render` as YAML text, with a header saying it is generated."""
    body = yaml.safe_dump(
        render(
            config,
            grpc_ports=grpc_ports,
            ca_bundle=ca_bundle,
            access_log=access_log,
            tls_sds_file=tls_sds_file,
        ),
        sort_keys=True,
        default_flow_style=False,
        width=1_000,
    )
    return "# Generated by `python -m authz.envoy.render`; do not edit (see envoy/README.md).\n" + body


def write_bootstrap(
    config: GatewayConfig,
    path: str | Path,
    *,
    grpc_ports: Sequence[int] | None = None,
    ca_bundle: str = DEFAULT_CA_BUNDLE,
    access_log: bool = False,
) -> Path:
    """Write the bootstrap to ``path`` and, with ``listen.envoy.tls``, the listener's SDS file
    beside it (:func:`authz.envoy.tls.sds_path_for`); return the bootstrap's absolute path."""
    bootstrap = Path(path).absolute()
    sds: Path | None = None
    if config.listen.envoy.tls is not None:
        sds = sds_path_for(bootstrap)
        write_sds_file(sds, config.listen.envoy.tls)
    text = render_yaml(
        config,
        grpc_ports=grpc_ports,
        ca_bundle=ca_bundle,
        access_log=access_log,
        tls_sds_file=str(sds) if sds is not None else None,
    )
    bootstrap.parent.mkdir(parents=True, exist_ok=True)
    bootstrap.write_text(text, encoding="utf-8")
    return bootstrap


def load_for_render(path: str | Path, environ: Mapping[str, str]) -> GatewayConfig:
    """Load a gateway config for rendering only: ``${file:...}`` references are not read.

    Envoy's bootstrap never contains the secrets those references hold (signing keys, passwords),
    so CI and the committed examples can be rendered without them.
    """
    text = Path(path).read_text(encoding="utf-8")
    text = re.sub(r"\$\{file:[^}]*\}", "not-read-for-rendering", text)
    return config_loader.loads(text, environ, base_dir=Path(path).resolve().parent)


def _check_ports(config: GatewayConfig, grpc_ports: Sequence[int]) -> None:
    """Each worker listens on its own gRPC port after ``listen.grpc.port``; none may land on another
    listener's port (port 0, "pick a free one", never clashes)."""
    listen = config.listen
    owners: dict[int, str] = {}
    named = [
        ("listen.envoy", listen.envoy.port),
        ("listen.envoy_admin", listen.envoy_admin.port),
        ("listen.portal", listen.portal.port),
        *((f"gRPC worker {i}", port) for i, port in enumerate(grpc_ports)),
    ]
    for name, port in named:
        if port == 0:
            continue
        if port in owners:
            raise ConfigError("listen", f"{name} and {owners[port]} both use port {port}")
        owners[port] = name


# --- listener and HTTP connection manager -------------------------------------------------------


def _listener(config: GatewayConfig, access_log: bool, tls_sds_file: str | None) -> Listener:
    limits = config.limits
    hcm = HttpConnectionManager(
        stat_prefix="gateway",
        route_config=_route_config(limits, failover.chains(config)),
        http_filters=[_buffer(limits), _ext_authz(limits), _ext_proc(limits), _router()],
        # Some servers read x_api_key as x-api-key, so such names could slip past header checks;
        # refuse them with 400 rather than drop them silently
        # (HttpProtocolOptions.headers_with_underscores_action).
        common_http_protocol_options=CoreHttpProtocolOptions(
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
        ),
        max_request_headers_kb=limits.max_request_headers_kb,
        # Resets on every byte; long thinking pauses send nothing for minutes.
        stream_idle_timeout=_seconds(limits.stream_idle_timeout),
        request_timeout=_seconds(limits.request_timeout),
        use_remote_address=True,
        # internal_address_config stays unset on purpose: unset, Envoy (1.36 and later) treats no
        # client as internal, so it sanitises x-envoy-* from everyone, loopback included. Set but
        # with no cidr_ranges it would trust RFC1918 and loopback clients (InternalAddressConfig).
        generate_request_id=True,
        always_set_request_id_in_response=True,
        server_name="claude-gateway",
        # RFC 3986 normalisation and slash merging before routing, but %2F stays %2F: Bedrock
        # inference-profile ARNs arrive as /model/arn:...%2Fid/invoke and must still match
        # the single-segment model pattern (path_with_escaped_slashes_action).
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.KEEP_UNCHANGED,
        early_header_mutation_extensions=[_strip_internal_headers()],
        local_reply_config=_local_reply_config(),
        access_log=[_service_access_log(), *([_stdout_access_log()] if access_log else [])],
        # A span per request when telemetry traces (authz/envoy/tracing.py).
        tracing=tracing(config.telemetry),
    )
    return Listener(
        name="gateway",
        address=_address(config.listen.envoy.address, config.listen.envoy.port),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm))
                ],
                # Plain HTTP without listen.envoy.tls: loopback, or a TLS terminator in front
                # (config validation refuses anything else).
                transport_socket=transport_socket(tls_sds_file) if tls_sds_file else None,
            )
        ],
    )


def _spell_out_fail_closed(rendered: dict[str, Any]) -> None:
    """Write ``failure_mode_allow: false`` into the output although it is the proto default (proto
    JSON omits defaults), so a reviewer of the rendered YAML sees that every service fails closed."""
    for listener in rendered["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] in (EXT_AUTHZ_FILTER, EXT_PROC_FILTER):
                        http_filter["typed_config"].setdefault("failure_mode_allow", False)
    # The failover clusters' attempt filters (authz/envoy/clusters.py).
    for cluster in rendered["static_resources"]["clusters"]:
        options = cluster.get("typed_extension_protocol_options", {}).values()
        for http_filter in (f for option in options for f in option.get("http_filters", [])):
            if http_filter["name"] == ATTEMPT_FILTER:
                http_filter["typed_config"].setdefault("failure_mode_allow", False)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the Envoy bootstrap for a gateway config file."""
    parser = argparse.ArgumentParser(prog="python -m authz.envoy.render", description=main.__doc__)
    parser.add_argument("config", help="gateway YAML configuration")
    parser.add_argument("--grpc-port", type=int, action="append", dest="grpc_ports", help="repeat per worker")
    parser.add_argument("--ca-bundle", default=DEFAULT_CA_BUNDLE, help="PEM bundle for upstream certificates")
    parser.add_argument("--access-log", action="store_true", help="log each request on stdout")
    parser.add_argument(
        "--output",
        help="write the bootstrap here instead of standard output (with listen.envoy.tls, the"
        " listener's SDS file is written beside it)",
    )
    parser.add_argument(
        "--skip-file-refs",
        action="store_true",
        help="do not read ${file:...} references (secrets never appear in the bootstrap)",
    )
    args = parser.parse_args(argv)
    try:
        if args.skip_file_refs:
            config = load_for_render(args.config, os.environ)
        else:
            config = config_loader.load(args.config, os.environ)
        options: dict[str, Any] = {
            "grpc_ports": args.grpc_ports,
            "ca_bundle": args.ca_bundle,
            "access_log": args.access_log,
        }
        if args.output:
            write_bootstrap(config, args.output, **options)
            return 0
        text = render_yaml(config, **options)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
