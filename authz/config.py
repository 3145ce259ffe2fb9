"""Load the gateway's YAML configuration into a typed, frozen :class:`GatewayConfig`.

``load(path, environ)`` is pure apart from reading the file and any ``${file:...}`` references:
nothing deeper in the code reads ``os.environ``. Unknown keys and bad values raise
:class:`~authz.errors.ConfigError` naming the field, so a typo stops start-up instead of being
silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import unquote, urlsplit

import yaml

from authz.configtypes import GatewayConfig, Price, Upstream
from authz.errors import ConfigError
from authz.jsondoc import JsonObject, JsonValueError, json_object
from backends.base import is_loopback_host
from backends.kinds import KINDS

T = TypeVar("T")

_REF = re.compile(r"\$\{([^}]+)\}")


def load(path: str | Path, environ: Mapping[str, str]) -> GatewayConfig:
    """Read ``path`` and build the configuration, resolving ``${VAR}`` and ``${file:/path}``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
    return loads(text, environ, base_dir=Path(path).resolve().parent)


def loads(text: str, environ: Mapping[str, str], base_dir: Path | None = None) -> GatewayConfig:
    """Build the configuration from YAML text (see :func:`load`)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {exc}") from exc
    _reject_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), "", set())
    if raw is None:
        raw = {}
    try:
        resolved = _otel_environment(_resolve_refs(raw, environ, base_dir or Path.cwd(), ""), environ)
        config = build(GatewayConfig, resolved, "")
    except RecursionError:
        # `a: &x [*x]` is valid YAML that safe_load turns into a self-containing list.
        raise ConfigError("", "recursive YAML aliases are not supported") from None
    validate(config)
    return config


# The OpenTelemetry SDK environment variables that stand in for telemetry keys the file leaves out
# (https://opentelemetry.io/docs/specs/otel/protocol/exporter/ and .../sdk-environment-variables/).
# Values keep their variable's name as the field in errors: `OTEL_EXPORTER_OTLP_PROTOCOL: ...`.
_OTEL_ENV: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("OTEL_EXPORTER_OTLP_ENDPOINT", ("otlp", "endpoint")),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", ("otlp", "protocol")),
    ("OTEL_EXPORTER_OTLP_HEADERS", ("otlp", "headers")),
    ("OTEL_METRIC_EXPORT_INTERVAL", ("otlp", "interval")),
    ("OTEL_SERVICE_NAME", ("service_name",)),
)


def _otel_environment(raw: Any, environ: Mapping[str, str]) -> Any:
    """``raw`` with each ``telemetry`` key the file leaves out taken from its ``OTEL_*`` variable."""
    if not isinstance(raw, dict) or not any(environ.get(name) for name, _ in _OTEL_ENV):
        return raw
    telemetry = raw.get("telemetry")
    if telemetry is None:
        telemetry = {}
    if not isinstance(telemetry, dict) or not isinstance(telemetry.get("otlp", {}), dict):
        return raw  # build() names the malformed section
    telemetry = {**telemetry, "otlp": dict(telemetry.get("otlp") or {})}
    for name, path in _OTEL_ENV:
        value = environ.get(name)
        section = telemetry if len(path) == 1 else telemetry["otlp"]
        if not value or path[-1] in section:
            continue
        if name == "OTEL_EXPORTER_OTLP_HEADERS":
            section[path[-1]] = _otel_headers(value)
        elif name == "OTEL_METRIC_EXPORT_INTERVAL":
            try:
                section[path[-1]] = float(value) / 1000.0  # milliseconds in the variable
            except ValueError:
                raise ConfigError(name, f"expected milliseconds, got {value!r}") from None
        else:
            section[path[-1]] = value
    if not telemetry["otlp"]:
        del telemetry["otlp"]
    return {**raw, "telemetry": telemetry} if telemetry else raw


def _otel_headers(value: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values (the W3C Baggage list format the OTLP exporter
    specification uses for OTEL_EXPORTER_OTLP_HEADERS)."""
    headers: dict[str, str] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("OTEL_EXPORTER_OTLP_HEADERS", f"expected key=value pairs, got {item.strip()!r}")
        headers[unquote(key.strip()).lower()] = unquote(val.strip())
    return headers


def _reject_duplicate_keys(node: yaml.Node | None, where: str, seen_nodes: set[int]) -> None:
    """Refuse a key repeated in one mapping: PyYAML silently keeps the last one, which would drop a
    whole upstream or policy without a word (YAML 1.2, section 3.2.1.1 requires unique keys)."""
    if node is None or id(node) in seen_nodes:
        return  # empty document, or an alias already walked (aliases may even form cycles)
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by explicit keys, by design
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            path = f"{where}.{key}" if where else key
            if isinstance(key_node, yaml.ScalarNode):
                if key in keys:
                    raise ConfigError(path, f"duplicate key (line {key_node.start_mark.line + 1})")
                keys.add(key)
            _reject_duplicate_keys(value_node, path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, f"{where}[{i}]", seen_nodes)


def _resolve_refs(value: Any, environ: Mapping[str, str], base_dir: Path, where: str) -> Any:
    if isinstance(value, dict):
        return {
            k: _resolve_refs(v, environ, base_dir, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve_refs(v, environ, base_dir, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref.startswith("file:"):
            file_path = Path(ref[5:])
            if not file_path.is_absolute():
                file_path = base_dir / file_path
            try:
                return file_path.read_text(encoding="utf-8").rstrip("\n")
            except OSError as exc:
                raise ConfigError(where, f"cannot read {file_path}: {exc.strerror}") from exc
        name, _, default = ref.partition(":-")
        if name in environ:
            return environ[name]
        if ":-" in ref:
            return default
        raise ConfigError(where, f"environment variable {name} is not set")

    return _REF.sub(substitute, value)


def build(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(name, f"unknown key (expected one of: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(path, "is required")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(where, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is Upstream:
        return _upstream(value, where)
    if tp is JsonObject:
        try:
            return json_object(value)
        except JsonValueError as exc:
            raise ConfigError(f"{where}{exc.path}", exc.problem) from None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)  # type: ignore[arg-type]  # is_dataclass narrows to instance or type
    if origin is tuple:
        item = args[0]
        if get_origin(item) is tuple and len(get_args(item)) == 2 and get_args(item)[0] is str:
            if not isinstance(value, dict):
                raise ConfigError(where, f"expected a mapping, got {type(value).__name__}")
            return tuple((str(k), _convert(get_args(item)[1], v, f"{where}.{k}")) for k, v in value.items())
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(where, f"expected a list, got {type(value).__name__}")
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(where, f"expected true or false, got {value!r}")
    if tp is int:
        # int(2.7) would silently truncate, and bool is an int subclass: refuse both.
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(where, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected a number, got {value!r}") from None
        # NaN passes every `< 0` and `<= 0` check below and would turn costs into NaN.
        if not math.isfinite(number):
            raise ConfigError(where, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(where, f"expected a string, got {type(value).__name__}")
        return str(value)
    raise ConfigError(where, f"unsupported type {tp!r}")  # pragma: no cover - schema bug


def validate(config: GatewayConfig) -> None:
    """Checks that involve more than one field."""
    if config.workers < 1:
        raise ConfigError("workers", "must be at least 1")
    grpc = config.listen.grpc
    if grpc.port:
        worker_ports = range(grpc.port, grpc.port + config.workers)
        for name in ("envoy", "envoy_admin", "portal"):
            if getattr(config.listen, name).port in worker_ports:
                raise ConfigError(
                    f"listen.{name}.port",
                    f"collides with the gRPC worker ports {grpc.port}-{grpc.port + config.workers - 1}",
                )
    names = {name for name, _ in config.upstreams}
    for i, policy in enumerate(config.policies):
        where = f"policies[{i}]"
        if not policy.upstreams:
            raise ConfigError(f"{where}.upstreams", "name at least one upstream")
        for up in policy.upstreams:
            if up not in names:
                raise ConfigError(f"{where}.upstreams", f"no upstream named {up!r}")
        if not policy.groups and not policy.email_domains:
            raise ConfigError(where, "set groups or email_domains (or both)")
        for j, cap in enumerate(policy.spend_caps):
            _validate_usd(f"{where}.spend_caps[{j}].usd", cap.usd)
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(policy.rate_limits, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.rate_limits.{name}", "must be at least 1 (or null for no limit)")
    _validate_spend(config)
    for model, price in config.pricing.models:
        _validate_price(f"pricing.models.{model}", price)
    _validate_price("pricing.fallback", config.pricing.fallback)
    if config.pricing.fallback.input <= 0 or config.pricing.fallback.output <= 0:
        raise ConfigError("pricing.fallback", "must be non-zero so unknown models are never free")
    if config.service_tokens.max_ttl <= 0:
        raise ConfigError("service_tokens.max_ttl", "must be positive (seconds)")
    retention = config.retention
    for name in ("usage_days", "audit_days", "expired_session_days"):
        if getattr(retention, name) < 1:
            raise ConfigError(f"retention.{name}", "must be at least 1 (day)")
    if retention.interval <= 0:
        raise ConfigError("retention.interval", "must be positive (seconds)")
    if retention.batch_size < 1:
        raise ConfigError("retention.batch_size", "must be at least 1")
    if config.limits.max_request_body_bytes <= 0:
        raise ConfigError("limits.max_request_body_bytes", "must be positive")
    max_attempts = config.failover.max_attempts
    if max_attempts is not None and max_attempts < 1:
        raise ConfigError(
            "failover.max_attempts", "must be at least 1 (1: no failover), or null (every upstream)"
        )
    if config.translate.ping_interval < 0:
        raise ConfigError("translate.ping_interval", "must be 0 (no keep-alives) or positive (seconds)")
    if config.reload.watch_interval < 0:
        raise ConfigError(
            "reload.watch_interval", "must be 0 (no watching: SIGHUP only) or positive (seconds)"
        )
    sessions = config.sessions
    kids = [k.kid for k in sessions.verify_keys]
    if sessions.signing_key is not None:
        if not sessions.signing_key.private_key:
            raise ConfigError("sessions.signing_key.private_key", "is required for the signing key")
        kids.append(sessions.signing_key.kid)
    if len(set(kids)) != len(kids):
        raise ConfigError("sessions.verify_keys", "key ids (kid) must be unique")
    if config.oidc is not None:
        _validate_oidc(config)
    _validate_telemetry(config)
    if config.portal.admin_session_ttl <= 0:
        raise ConfigError("portal.admin_session_ttl", "must be positive")
    portal = urlsplit(config.portal.public_url)
    if portal.scheme not in ("http", "https") or not portal.hostname or portal.query or portal.fragment:
        raise ConfigError("portal.public_url", "must be an http(s) URL with a host and no query")
    _validate_listener(config)
    _validate_login_notice(config.portal.login_notice)
    for i, key in enumerate(sessions.verify_keys):
        if not key.public_key and not key.private_key:
            raise ConfigError(f"sessions.verify_keys[{i}]", "set public_key (or private_key)")


def _validate_listener(config: GatewayConfig) -> None:
    """TLS on Envoy's listener, or plain HTTP where that is safe: loopback, or behind a terminator.

    Claude Code's gateway sign-in refuses http:// beyond loopback, so a plain listener on another
    address only works with something in front that speaks TLS; ``allow_plaintext`` says there is.
    """
    envoy = config.listen.envoy
    tls = envoy.tls
    if tls is None:
        if not envoy.allow_plaintext and not is_loopback_host(envoy.address):
            raise ConfigError(
                "listen.envoy.tls",
                f"is required on the non-loopback address {envoy.address!r}: set"
                " listen.envoy.tls.certificate_file and private_key_file, or set"
                " listen.envoy.allow_plaintext: true if a TLS terminator in front of Envoy serves"
                " clients over https (Claude Code requires https beyond loopback)",
            )
        return
    for name in ("certificate_file", "private_key_file"):
        value = getattr(tls, name)
        if not value or not Path(value).is_absolute():
            raise ConfigError(f"listen.envoy.tls.{name}", "must be an absolute path to a PEM file")
    if urlsplit(config.portal.public_url).scheme != "https":
        raise ConfigError(
            "portal.public_url",
            "must be an https URL when listen.envoy.tls is set (the listener speaks TLS only)",
        )


# The device authorization response's `login_notice`: plain text Claude Code shows beside the code.
MAX_LOGIN_NOTICE = 500


def _validate_login_notice(notice: str | None) -> None:
    if notice is None:
        return
    if not notice.strip():
        raise ConfigError("portal.login_notice", "must not be empty (leave it out instead)")
    if len(notice) > MAX_LOGIN_NOTICE:
        raise ConfigError(
            "portal.login_notice",
            f"is {len(notice)} characters; Claude Code shows at most {MAX_LOGIN_NOTICE}",
        )
    if any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in notice):
        raise ConfigError("portal.login_notice", "must be plain text (no control characters but newlines)")


def _validate_usd(where: str, usd: float) -> None:
    if usd < 0:
        raise ConfigError(where, "must not be negative (0 blocks every billable request)")


def _validate_spend(config: GatewayConfig) -> None:
    spend = config.spend
    for i, budget in enumerate(spend.group_budgets):
        if not budget.group:
            raise ConfigError(f"spend.group_budgets[{i}].group", "name a group")
        _validate_usd(f"spend.group_budgets[{i}].usd", budget.usd)
    for i, cap in enumerate(spend.org_caps):
        _validate_usd(f"spend.org_caps[{i}].usd", cap.usd)
    if spend.increase_url is not None:
        url = urlsplit(spend.increase_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError("spend.increase_url", "must be an http(s) URL")
    for name in ("open_grace", "sync_interval", "lease_ttl"):
        if getattr(spend, name) <= 0:
            raise ConfigError(f"spend.{name}", "must be positive (seconds)")
    if spend.lease_ttl < 3 * spend.sync_interval:
        raise ConfigError("spend.lease_ttl", "must be at least three times spend.sync_interval")
    if not 0 <= spend.lease_fraction <= 1:
        raise ConfigError("spend.lease_fraction", "must be between 0 and 1")


def _validate_telemetry(config: GatewayConfig) -> None:
    telemetry = config.telemetry
    otlp = telemetry.otlp
    if otlp.endpoint:
        url = urlsplit(otlp.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ConfigError(
                "telemetry.otlp.endpoint", "must be an http(s) URL such as http://collector:4318"
            )
        if otlp.protocol == "grpc" and url.path not in ("", "/"):
            raise ConfigError("telemetry.otlp.endpoint", "a gRPC endpoint takes no path")
    for name, value in (("interval", otlp.interval), ("timeout", otlp.timeout)):
        if value <= 0:
            raise ConfigError(f"telemetry.otlp.{name}", "must be positive")
    for key in dict(otlp.headers):
        if not key or any(c in key for c in " :\r\n"):
            raise ConfigError(f"telemetry.otlp.headers.{key}", "is not a valid header name")
    if not 0.0 <= telemetry.traces.sample_ratio <= 1.0:
        raise ConfigError("telemetry.traces.sample_ratio", "must be between 0 and 1")
    if telemetry.relay.max_body_bytes <= 0 or telemetry.relay.max_queue <= 0:
        raise ConfigError("telemetry.relay", "max_body_bytes and max_queue must be positive")
    prometheus = telemetry.prometheus
    grpc = config.listen.grpc
    if prometheus.enabled and prometheus.port and grpc.port:
        mine = set(range(prometheus.port, prometheus.port + config.workers))
        if mine & set(range(grpc.port, grpc.port + config.workers)):
            raise ConfigError("telemetry.prometheus.port", "collides with the gRPC worker ports")
        for name in ("envoy", "envoy_admin", "portal"):
            if getattr(config.listen, name).port in mine:
                raise ConfigError("telemetry.prometheus.port", f"collides with listen.{name}.port")


def _validate_oidc(config: GatewayConfig) -> None:
    oidc = config.oidc
    assert oidc is not None
    issuer = urlsplit(oidc.issuer)
    if issuer.scheme not in ("http", "https") or not issuer.hostname:
        raise ConfigError("oidc.issuer", "must be the IdP's issuer URL")
    if issuer.scheme == "http" and not is_loopback_host(issuer.hostname):
        raise ConfigError("oidc.issuer", "plain http is allowed only to loopback; use https")
    if not oidc.client_id:
        raise ConfigError("oidc.client_id", "is required")
    if oidc.client_auth_method in ("client_secret_basic", "client_secret_post") and not oidc.client_secret:
        raise ConfigError("oidc.client_secret", f"is required for {oidc.client_auth_method}")
    if oidc.client_auth_method == "private_key_jwt" and not oidc.private_key:
        raise ConfigError("oidc.private_key", "is required for private_key_jwt")
    if "openid" not in oidc.scopes:
        raise ConfigError("oidc.scopes", "must include openid")
    bad = [a for a in oidc.id_token_algorithms if a.lower() == "none" or a.upper().startswith("HS")]
    if bad or not oidc.id_token_algorithms:
        raise ConfigError("oidc.id_token_algorithms", "list asymmetric algorithms only (never none or HS*)")
    if not config.sessions.encryption_key:
        raise ConfigError("sessions.encryption_key", "is required with oidc (it encrypts IdP refresh tokens)")


def _validate_price(where: str, price: Price) -> None:
    for name in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"):
        if getattr(price, name) < 0:
            raise ConfigError(f"{where}.{name}", "must not be negative")


def _upstream(data: Any, where: str) -> Upstream:
    """``upstreams.<name>``: its ``kind`` picks the descriptor whose settings type the other keys
    build into, and whose rules check them (backends/<kind>)."""
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping, got {type(data).__name__}")
    name = data.get("kind")
    if name is None:
        raise ConfigError(f"{where}.kind", f"is required (one of: {', '.join(sorted(KINDS))})")
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        choices = ", ".join(repr(k) for k in sorted(KINDS))
        raise ConfigError(f"{where}.kind", f"must be one of {choices}, got {name!r}")
    settings = build(kind.settings_type, {k: v for k, v in data.items() if k != "kind"}, where)
    kind.validate(where, settings)
    return Upstream(kind=kind.name, settings=settings)
