"""The benchmark's plain Envoys: the canned upstream, and Envoy alone in front of it.

The canned upstream is one Envoy answering Bedrock and Vertex calls with fixed bodies. Every
answer is a route's ``direct_response`` (``config.route.v3.DirectResponseAction``), so the upstream
costs one Envoy's HTTP handling and nothing else. The bodies are built with the
project's own writers (``backends.eventstream.chunk_frame``, ``backends.sse.sse_event``,
``backends.messages.canned_events``/``canned_message``), framed exactly as the clouds frame them,
and carry the known usage ``CANNED_USAGE`` the benchmark later finds in the ledger.

The answers are keyed by the *upstream* operation (``upstream_operations()``), not by what the
client sent, so a scenario whose client speaks another format (e.g. ``POST /v1/messages`` that the
gateway translates to Bedrock or Vertex) reuses them unchanged.

Two ways the canned upstream differs from a cloud, both making the gateway look cheaper, are
printed with the figures: a stream's body arrives as one ``Content-Length``
answer at full speed rather than one chunk per event, so Envoy hands it to the gateway's meter in
as few reads as its buffers allow; and nothing is verified (signatures, tokens).
"""

from __future__ import annotations

import base64
import contextlib
import json
import string
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from authz.dev.ports import free_port
from authz.envoy.binary import envoy_binary
from authz.supervisor import Proc
from backends.emulator.canned import canned_events, canned_message
from backends.eventstream import chunk_frame
from backends.sse import sse_event
from backends.usage import Usage

# The counts every canned answer reports; distinct, so a field read from the wrong place shows.
CANNED_USAGE = Usage(
    input_tokens=1234,
    output_tokens=987,
    cache_creation_input_tokens=2048,
    cache_creation_5m_input_tokens=1536,
    cache_creation_1h_input_tokens=512,
    cache_read_input_tokens=4096,
)
# content_block_delta events in a canned stream; with message_start, content_block_start,
# content_block_stop, message_delta and message_stop the stream holds STREAM_DELTAS + 5 events.
STREAM_DELTAS = 200
CANNED_MODEL = "claude-sonnet-4-5-20250929"
EVENTSTREAM = "application/vnd.amazon.eventstream"
# Bedrock pads every chunk's payload with a prefix of this alphabet (the "p" field) so that frame
# sizes do not reveal token lengths; a fixed pattern keeps the body deterministic.
_PADDING = string.ascii_lowercase + string.ascii_uppercase + string.digits
_DELTA_TEXT = "The handler validates input before it writes the row. "


@dataclass(frozen=True)
class CannedAnswer:
    """One upstream operation: which paths it answers and with what."""

    key: str
    path_prefix: str
    path_suffix: str
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    streaming: bool = False


def _text_chunks(count: int) -> list[str]:
    return [f"{_DELTA_TEXT}({i}) " for i in range(count)]


def bedrock_stream_body(usage: Usage = CANNED_USAGE, deltas: int = STREAM_DELTAS) -> bytes:
    """``invoke-with-response-stream``: one ``chunk`` frame per event, padded, metrics on message_stop."""
    events = canned_events(model=CANNED_MODEL, text_chunks=_text_chunks(deltas), usage=usage)
    metrics = {
        "inputTokenCount": usage.input_tokens,
        "outputTokenCount": usage.output_tokens,
        "invocationLatency": 2150,
        "firstByteLatency": 310,
        "cacheReadInputTokenCount": usage.cache_read_input_tokens,
        "cacheWriteInputTokenCount": usage.cache_creation_input_tokens,
    }
    return b"".join(
        chunk_frame(
            event,
            invocation_metrics=metrics if event["type"] == "message_stop" else None,
            padding=_PADDING[: 1 + (i * 7) % len(_PADDING)],
        )
        for i, event in enumerate(events)
    )


def vertex_stream_body(usage: Usage = CANNED_USAGE, deltas: int = STREAM_DELTAS) -> bytes:
    """``:streamRawPredict``: the Messages API's SSE events, as Vertex relays them."""
    events = canned_events(model=CANNED_MODEL, text_chunks=_text_chunks(deltas), usage=usage)
    return b"".join(sse_event(event) for event in events)


def message_body(usage: Usage = CANNED_USAGE) -> bytes:
    """Bedrock ``/invoke`` and Vertex ``:rawPredict``: one Messages API response."""
    text = "".join(_text_chunks(8))
    message = canned_message(model=CANNED_MODEL, text=text, usage=usage)
    return json.dumps(message, separators=(",", ":")).encode()


def upstream_operations() -> tuple[CannedAnswer, ...]:
    """The canned answers, one per upstream operation the benchmark's scenarios reach."""
    usage = CANNED_USAGE
    bedrock_headers = (
        ("x-amzn-requestid", "00000000-0000-4000-8000-000000000000"),
        ("x-amzn-bedrock-input-token-count", str(usage.input_tokens)),
        ("x-amzn-bedrock-output-token-count", str(usage.output_tokens)),
        ("x-amzn-bedrock-invocation-latency", "2150"),
    )
    return (
        CannedAnswer(
            "bedrock_invoke", "/model/", "/invoke", "application/json", message_body(), bedrock_headers
        ),
        CannedAnswer(
            "bedrock_stream",
            "/model/",
            "/invoke-with-response-stream",
            EVENTSTREAM,
            bedrock_stream_body(),
            (
                ("x-amzn-requestid", "00000000-0000-4000-8000-000000000001"),
                ("x-amzn-bedrock-content-type", "application/json"),
            ),
            streaming=True,
        ),
        CannedAnswer("vertex_raw", "/v1/projects/", ":rawPredict", "application/json", message_body()),
        CannedAnswer(
            "vertex_stream",
            "/v1/projects/",
            ":streamRawPredict",
            "text/event-stream",
            vertex_stream_body(),
            (("cache-control", "no-cache"),),
            streaming=True,
        ),
    )


# --- the Envoy that serves them -----------------------------------------------------------------------


def _header(name: str, value: str) -> dict[str, Any]:
    # OVERWRITE_IF_EXISTS_OR_ADD: a direct response with a body already has Envoy's
    # "content-type: text/plain", which this replaces (config.core.v3.HeaderValueOption).
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _route(answer: CannedAnswer) -> dict[str, Any]:
    return {
        "name": answer.key,
        "match": {
            "prefix": answer.path_prefix,
            # Suffix on :path: cheaper than a regex, and the model id in between may be anything.
            "headers": [{"name": ":path", "string_match": {"suffix": answer.path_suffix}}],
        },
        "direct_response": {
            "status": 200,
            "body": {"inline_bytes": base64.b64encode(answer.body).decode("ascii")},
        },
        "response_headers_to_add": [
            _header("content-type", answer.content_type),
            *(_header(name, value) for name, value in answer.headers),
        ],
    }


def canned_bootstrap(
    listen_port: int, admin_port: int, answers: tuple[CannedAnswer, ...] | None = None
) -> dict[str, Any]:
    """Envoy serving ``answers`` (default: every canned operation); other paths get a JSON 404."""
    answers = upstream_operations() if answers is None else answers
    not_found = json.dumps({"message": "the canned upstream has no answer for this path"}).encode()
    routes = [_route(a) for a in answers]
    routes.append(
        {
            "name": "not_found",
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {"inline_bytes": base64.b64encode(not_found).decode("ascii")},
            },
            "response_headers_to_add": [_header("content-type", "application/json")],
        }
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "canned",
        "route_config": {
            "name": "canned",
            # Direct response bodies are capped at 4096 bytes unless raised
            # (RouteConfiguration.max_direct_response_body_size_bytes).
            "max_direct_response_body_size_bytes": max(len(a.body) for a in answers) + 1024,
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                # Read the whole request before answering, as a cloud does: a reply sent while the
                # 60 KB request body is still arriving would make Envoy close the connection, and
                # the front Envoy would reconnect for every request.
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 32 * 1024 * 1024,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": True,
                },
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "canned",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
        },
    }


def envoy_alone_bootstrap(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """Envoy alone: one listener whose only HTTP filter is the router, every path to the upstream.

    The upstream cluster is set up as the gateway's loopback upstream clusters are (HTTP/1.1,
    circuit breakers lifted as in ``authz.envoy_clusters``), so the two differ only in the filters.
    """
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "alone",
        "route_config": {
            "name": "alone",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "0s"}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    # As in the gateway's rendering, so both send the same response headers.
                    "suppress_envoy_headers": True,
                },
            }
        ],
    }
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "alone",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "max_connections": 100_000,
                                "max_pending_requests": 100_000,
                                "max_requests": 100_000,
                            }
                        ]
                    },
                }
            ],
        },
    }


def wait_ready(proc: Proc, admin_port: int, timeout: float = 30.0) -> None:
    """Wait until an Envoy's admin ``/ready`` answers 200; raise with its log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready:\n{proc.tail()}")
        time.sleep(0.05)


def start_envoy(
    name: str, root: Path, bootstrap: Mapping[str, Any], admin_port: int, concurrency: int = 2
) -> Proc:
    """Write ``bootstrap`` under ``root`` and start Envoy on it; returns once it is ready."""
    path = root / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(bootstrap)), encoding="utf-8")
    argv = [envoy_binary(), "-c", str(path), "--log-level", "warning", "--base-id", str(admin_port)]
    proc = Proc(name, [*argv, "--concurrency", str(concurrency)], root / "logs" / f"{name}.log")
    try:
        wait_ready(proc, admin_port)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_canned_upstream(root: Path, concurrency: int = 2) -> tuple[Proc, int]:
    """Start the canned upstream; returns the process and its listening port."""
    listen, admin = free_port(), free_port()
    return start_envoy("canned-upstream", root, canned_bootstrap(listen, admin), admin, concurrency), listen


def start_envoy_alone(root: Path, upstream_port: int) -> tuple[Proc, int]:
    """Start Envoy alone in front of ``upstream_port`` (two worker threads, as the gateway's Envoy)."""
    listen, admin = free_port(), free_port()
    bootstrap = envoy_alone_bootstrap(listen, admin, upstream_port)
    return start_envoy("envoy-alone", root, bootstrap, admin, concurrency=2), listen
