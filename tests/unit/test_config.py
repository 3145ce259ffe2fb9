"""Loading the gateway YAML: typed frozen objects, field-naming errors, references and validation."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest

from authz.config import load, loads
from authz.configtypes import (
    Address,
    EnvoyAddress,
    GatewayConfig,
    Limits,
    Listen,
    ListenerTls,
    Policy,
    Portal,
    Price,
    Pricing,
    Sessions,
    SigningKey,
    Store,
    Upstream,
)
from authz.errors import ConfigError
from authz.jsondoc import json_object
from backends.bedrock import AwsCredentials, BedrockConfig
from backends.vertex import GoogleCredentials, VertexConfig

FIXTURES = Path(__file__).parent.parent / "fixtures" / "config"

# The smallest config the validation tests build on: one upstream of each kind and one policy.
BASE = """
upstreams:
  main:
    kind: bedrock
    region: us-east-1
    credentials:
      source: static
      access_key_id: AKIDEXAMPLE
      secret_access_key: secret
  gcp:
    kind: vertex
    region: us-east5
    project: acme-prod
policies:
  - name: eng
    groups: [eng]
    upstreams: [main, gcp]
"""


def _error(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(textwrap.dedent(text), environ or {})
    return info.value


def _upstream_error(upstream_yaml: str) -> ConfigError:
    """Load a config whose only upstream is ``upstream_yaml`` (indented under ``upstreams.u``)."""
    body = textwrap.indent(textwrap.dedent(upstream_yaml).strip(), "    ")
    return _error(f"upstreams:\n  u:\n{body}\n")


def _upstream(upstream_yaml: str) -> Any:
    """The kind's settings of a config whose only upstream is ``upstream_yaml``."""
    body = textwrap.indent(textwrap.dedent(upstream_yaml).strip(), "    ")
    return loads(f"upstreams:\n  u:\n{body}\n", {}).upstream("u").settings


# --- unknown keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("worker: 2\n", "worker"),
        ("listen:\n  envoy: {address: 0.0.0.0, prot: 80}\n", "listen.envoy.prot"),
        ("sessions:\n  signing_key: {kid: a, private_kee: x}\n", "sessions.signing_key.private_kee"),
        (
            "upstreams:\n  main:\n    kind: bedrock\n    region: us-east-1\n"
            "    credentials: {source: static, acces_key_id: AKID, secret_access_key: s}\n",
            "upstreams.main.credentials.acces_key_id",
        ),
        ("policies:\n  - {name: eng, group: [eng], upstreams: [main]}\n", "policies[0].group"),
        (
            "pricing:\n  models:\n    claude-x: {inpt: 1, output: 1, cache_write_5m: 1, "
            "cache_write_1h: 1, cache_read: 1}\n",
            "pricing.models.claude-x.inpt",
        ),
    ],
)
def test_unknown_key_names_its_dotted_field(text: str, field: str) -> None:
    """A misspelt key at any depth stops loading with an error naming its full dotted path."""
    err = _error(text)
    assert err.field == field
    assert str(err).startswith(f"{field}: unknown key")


def test_unknown_key_error_lists_the_valid_keys() -> None:
    """The unknown-key message lists what the section does accept, so the fix is obvious."""
    err = _error("listen:\n  envoy: {adress: 0.0.0.0}\n")
    assert "expected one of: address, allow_plaintext, port, tls" in err.problem


# --- wrong types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("workers: many\n", "workers", "expected an integer"),
        ("workers: true\n", "workers", "expected an integer"),
        ("workers: 2.5\n", "workers", "expected an integer"),
        ('listen:\n  grpc: {port: "ninety"}\n', "listen.grpc.port", "expected an integer"),
        ("upstreams: [main, gcp]\n", "upstreams", "expected a mapping, got list"),
        ("listen: [8080]\n", "listen", "expected a mapping, got list"),
        ("policies: {eng: {}}\n", "policies", "expected a list, got dict"),
        ("upstreams:\n  main: {kind: azure, region: r}\n", "upstreams.main.kind", "must be one of"),
        (
            "sessions:\n  signing_key: {kid: a, algorithm: RS256}\n",
            "sessions.signing_key.algorithm",
            "must be one of",
        ),
        (
            "upstreams:\n  main: {kind: bedrock, region: r, fips: maybe}\n",
            "upstreams.main.fips",
            "true or false",
        ),
        (
            "upstreams:\n  main: {kind: bedrock, region: [a, b]}\n",
            "upstreams.main.region",
            "expected a string",
        ),
        ("limits:\n  stream_idle_timeout: soon\n", "limits.stream_idle_timeout", "expected a number"),
        (
            "pricing:\n  fallback: {input: .nan, output: 1, cache_write_5m: 1,"
            " cache_write_1h: 1, cache_read: 1}\n",
            "pricing.fallback.input",
            "finite",
        ),
        (
            "upstreams:\n  main: {kind: bedrock, region: r, model_map: [a, b]}\n",
            "upstreams.main.model_map",
            "expected a mapping",
        ),
        (
            "upstreams:\n  main: {kind: bedrock, region: r, model_map: {claude-x: {id: 1}}}\n",
            "upstreams.main.model_map.claude-x",
            "expected a string",
        ),
    ],
)
def test_wrong_type_names_the_field(text: str, field: str, problem: str) -> None:
    """A value of the wrong type (or outside a literal's choices) is refused, naming the field."""
    err = _error(text)
    assert err.field == field
    assert problem in err.problem


def test_missing_required_key_names_the_field() -> None:
    """A required key left out (an upstream's region) is reported as required, by its path."""
    err = _error("upstreams:\n  main: {kind: bedrock}\n")
    assert (err.field, err.problem) == ("upstreams.main.region", "is required")


def test_duplicate_key_is_refused_by_name() -> None:
    """A key repeated in one mapping fails instead of silently replacing the first upstream."""
    err = _error(BASE.replace("  gcp:", "  main:"))
    assert err.field == "upstreams.main"
    assert "duplicate key" in err.problem


def test_merge_keys_may_be_overridden() -> None:
    """A YAML merge (`<<: *anchor`) followed by an explicit key is not mistaken for a duplicate."""
    config = loads("listen:\n  portal: &b {address: 10.0.0.1, port: 1}\n  grpc: {<<: *b, port: 2}\n", {})
    assert config.listen.grpc == Address(address="10.0.0.1", port=2)


def test_recursive_alias_is_a_config_error() -> None:
    """A self-referencing YAML alias is reported as a ConfigError, not a RecursionError."""
    assert "recursive" in _error("policies: &p [*p]\n").problem


def test_invalid_yaml_is_a_config_error() -> None:
    """Text that is not YAML is reported as such."""
    assert "not valid YAML" in str(_error("listen: {envoy: [\n"))


def test_empty_document_gives_the_documented_defaults() -> None:
    """An empty file is a valid config equal to every documented default."""
    assert loads("", {}) == GatewayConfig()


# --- references -------------------------------------------------------------------------------


def test_environment_reference_is_substituted_and_converted() -> None:
    """`${VAR}` is replaced inside a string and the result is converted to the field's type."""
    config = loads(
        "workers: ${WORKERS}\nstore: {url: 'postgresql://${DB_HOST}:5432/gw'}\n",
        {"WORKERS": "3", "DB_HOST": "db.internal"},
    )
    assert config.workers == 3
    assert config.store.url == "postgresql://db.internal:5432/gw"


def test_default_is_used_only_when_the_variable_is_unset() -> None:
    """`${VAR:-default}` takes the default when VAR is unset, VAR's value (even empty) when set."""
    text = "store: {url: '${DATABASE_URL:-postgresql://localhost/gw}', spool_dir: '${SPOOL:-}'}\n"
    unset = loads(text, {})
    assert (unset.store.url, unset.store.spool_dir) == ("postgresql://localhost/gw", "")
    assert loads(text, {"DATABASE_URL": "postgresql://db/x"}).store.url == "postgresql://db/x"
    assert loads(text, {"DATABASE_URL": ""}).store.url == ""


def test_missing_environment_variable_names_the_field_and_variable() -> None:
    """An unset `${VAR}` without a default fails, naming both the field and the variable."""
    err = _error("store: {url: '${DATABASE_URL}'}\n")
    assert err.field == "store.url"
    assert "DATABASE_URL" in err.problem
    err = _error("policies:\n  - {name: p, groups: [a, '${SECOND}'], upstreams: [x]}\n")
    assert err.field == "policies[0].groups[1]"


def test_substituted_values_are_not_expanded_again() -> None:
    """A variable whose value contains `${...}` is taken literally, never re-expanded."""
    config = loads("store: {url: '${A}'}\n", {"A": "${SECRET}", "SECRET": "leaked"})
    assert config.store.url == "${SECRET}"


def test_comma_separated_variable_fills_a_list() -> None:
    """A list field given one string (from an env var) is split on commas, blanks dropped."""
    text = BASE.replace("groups: [eng]", "groups: ${GROUPS}")
    assert loads(text, {"GROUPS": "eng, platform,,"}).policies[0].groups == ("eng", "platform")


def test_file_reference_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`${file:relative/path}` reads a file next to the config (not the cwd), minus its final newline."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "db-url").write_text("postgresql://from-file/gw\n")
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text("store: {url: '${file:secrets/db-url}'}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load(config_file, {}).store.url == "postgresql://from-file/gw"


def test_absolute_file_reference_and_missing_file(tmp_path: Path) -> None:
    """An absolute `${file:...}` is read as is; an unreadable one names the field."""
    secret = tmp_path / "token"
    secret.write_text("abc")
    assert loads(f"store: {{url: '${{file:{secret}}}'}}\n", {}).store.url == "abc"
    err = _error(f"store: {{url: '${{file:{tmp_path / 'absent'}}}'}}\n")
    assert err.field == "store.url"
    assert "cannot read" in err.problem


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    """load() of a path that does not exist raises ConfigError naming the path."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "missing.yaml", {})


# --- validation rules -------------------------------------------------------------------------


def test_policy_naming_an_unknown_upstream_is_refused() -> None:
    """A policy that routes to an upstream nobody configured fails on that policy's upstreams."""
    err = _error(BASE.replace("upstreams: [main, gcp]", "upstreams: [main, typo]"))
    assert err.field == "policies[0].upstreams"
    assert "'typo'" in err.problem


def test_policy_needs_upstreams_and_someone_to_match() -> None:
    """A policy with no upstreams, or with neither groups nor email domains, is refused."""
    assert _error(BASE.replace("upstreams: [main, gcp]", "upstreams: []")).field == "policies[0].upstreams"
    assert _error(BASE.replace("groups: [eng]", "groups: []")).field == "policies[0]"


@pytest.mark.parametrize(
    "url",
    ["http://bedrock.example.com", "http://10.0.0.5:8080", "http://localhost.example.com"],
)
def test_plain_http_to_a_remote_host_is_refused(url: str) -> None:
    """Credentials never cross a network in clear text: http is refused for non-loopback hosts."""
    err = _upstream_error(f"kind: bedrock\nregion: us-east-1\nbase_url: {url}")
    assert err.field == "upstreams.u.base_url"
    assert "loopback" in err.problem


@pytest.mark.parametrize(
    "url",
    [
        "https://bedrock.example.com",
        "https://10.0.0.5:8443/",
        "http://127.0.0.1:18081",
        "http://localhost:18081",
        "http://[::1]:18081",
    ],
)
def test_https_anywhere_and_http_to_loopback_are_accepted(url: str) -> None:
    """https to any host and plain http to a loopback host both load."""
    assert _upstream(f"kind: bedrock\nregion: us-east-1\nbase_url: '{url}'").base_url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com", "http(s) URL with a host"),
        ("https://", "http(s) URL with a host"),
        ("https://example.com/v1", "path, query or fragment"),
        ("https://example.com?x=1", "path, query or fragment"),
        ("https://user:pw@example.com", "user info"),
        ("http://[::1", "not a valid URL"),
        ("https://example.com:99999", "not a valid URL"),
    ],
)
def test_malformed_base_url_is_refused(url: str, problem: str) -> None:
    """A base_url that is not scheme://host[:port] fails as a ConfigError naming base_url."""
    err = _upstream_error(f"kind: vertex\nregion: global\nproject: proj-1\nbase_url: '{url}'")
    assert err.field == "upstreams.u.base_url"
    assert problem in err.problem


def test_vertex_needs_a_project() -> None:
    """A vertex upstream without project is refused on upstreams.<name>.project."""
    assert _upstream_error("kind: vertex\nregion: us-east5").field == "upstreams.u.project"


def test_static_credentials_need_the_secret() -> None:
    """Static AWS keys without the secret access key are refused on the credentials section."""
    err = _upstream_error("kind: bedrock\nregion: r\ncredentials: {source: static, access_key_id: AKID}")
    assert err.field == "upstreams.u.credentials"
    assert "secret_access_key" in err.problem


@pytest.mark.parametrize(
    ("upstream", "field"),
    [
        ("kind: bedrock\nregion: r\ncredentials: {source: assume_role}", "upstreams.u.credentials.role_arn"),
        ("kind: bedrock\nregion: r\ncredentials: {source: adc}", "upstreams.u.credentials.source"),
        (
            "kind: vertex\nregion: r\nproject: proj-1\ncredentials: {source: static}",
            "upstreams.u.credentials.source",
        ),
        (
            "kind: vertex\nregion: r\nproject: proj-1\ncredentials: {source: service_account_file}",
            "upstreams.u.credentials.path",
        ),
    ],
)
def test_credential_source_must_fit_the_upstream_kind(upstream: str, field: str) -> None:
    """Each kind takes its own credential sources, with the fields each source needs."""
    assert _upstream_error(upstream).field == field


def test_vertex_default_source_is_adc() -> None:
    """A vertex upstream without a credential source uses Application Default Credentials."""
    assert _upstream("kind: vertex\nregion: global\nproject: proj-1").credentials.source == "adc"


@pytest.mark.parametrize("price", ["input: 0, output: 25", "input: 5, output: 0"])
def test_zero_fallback_price_is_refused(price: str) -> None:
    """A fallback that would make unknown models free (zero input or output) is refused."""
    err = _error(f"pricing:\n  fallback: {{{price}, cache_write_5m: 0, cache_write_1h: 0, cache_read: 0}}\n")
    assert err.field == "pricing.fallback"
    assert "non-zero" in err.problem


def test_negative_price_is_refused() -> None:
    """A negative per-model price is refused on its exact field."""
    err = _error(
        "pricing:\n  models:\n    claude-x: {input: 1, output: 1, cache_write_5m: 1, cache_write_1h: 1, "
        "cache_read: -0.1}\n"
    )
    assert err.field == "pricing.models.claude-x.cache_read"


@pytest.mark.parametrize(
    "sessions",
    [
        "verify_keys: [{kid: k1, public_key: a}, {kid: k1, public_key: b}]",
        "signing_key: {kid: k1, private_key: a}\n  verify_keys: [{kid: k1, public_key: b}]",
    ],
)
def test_duplicate_key_ids_are_refused(sessions: str) -> None:
    """Two session keys with the same kid (verify/verify or signing/verify) are refused."""
    err = _error(f"sessions:\n  {sessions}\n")
    assert err.field == "sessions.verify_keys"
    assert "unique" in err.problem


def test_session_keys_need_their_key_material() -> None:
    """The signing key needs private_key; a verify key needs public_key or private_key."""
    assert _error("sessions:\n  signing_key: {kid: k1}\n").field == "sessions.signing_key.private_key"
    assert _error("sessions:\n  verify_keys: [{kid: k1}]\n").field == "sessions.verify_keys[0]"


def test_workers_and_body_limit_must_be_positive() -> None:
    """workers below 1 and a non-positive body limit are refused by name."""
    assert _error("workers: 0\n").field == "workers"
    assert _error("limits: {max_request_body_bytes: 0}\n").field == "limits.max_request_body_bytes"


def test_ping_interval_is_zero_or_positive() -> None:
    """translate.ping_interval defaults to 10 s, 0 turns keep-alives off, a negative one is refused."""
    assert loads("", {}).translate.ping_interval == 10.0
    assert loads("translate: {ping_interval: 0}\n", {}).translate.ping_interval == 0.0
    assert _error("translate: {ping_interval: -1}\n").field == "translate.ping_interval"


# --- Envoy's listener: TLS, or plain HTTP where that is safe --------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0", "10.1.2.3", "::", "gateway.internal"])
def test_plaintext_on_a_non_loopback_address_is_refused_naming_the_field(address: str) -> None:
    """Without TLS or allow_plaintext, a listener beyond loopback stops start-up, naming the fields."""
    err = _error(f"listen:\n  envoy: {{address: '{address}', port: 8080}}\n")
    assert err.field == "listen.envoy.tls"
    assert "listen.envoy.allow_plaintext: true" in err.problem and "https" in err.problem


@pytest.mark.parametrize(
    "envoy",
    [
        "{address: 127.0.0.1}",
        "{address: '::1'}",
        "{address: localhost}",
        "{address: 0.0.0.0, allow_plaintext: true}",
    ],
)
def test_plaintext_on_loopback_or_behind_a_terminator_is_accepted(envoy: str) -> None:
    """Plain HTTP stays allowed on loopback, and anywhere when allow_plaintext says TLS ends in front."""
    config = loads(f"listen:\n  envoy: {envoy}\n", {})
    assert config.listen.envoy.tls is None


def test_tls_listener_needs_absolute_pem_paths_and_an_https_public_url() -> None:
    """TLS files must be absolute paths, and the portal's public URL must then be https."""
    tls = "{certificate_file: /etc/gw/tls.crt, private_key_file: /etc/gw/tls.key}"
    ok = loads(
        f"listen:\n  envoy: {{address: 0.0.0.0, tls: {tls}}}\nportal: {{public_url: https://gw.example}}\n",
        {},
    )
    assert ok.listen.envoy.tls is not None and ok.listen.envoy.tls.private_key_file == "/etc/gw/tls.key"
    err = _error(f"listen:\n  envoy: {{address: 0.0.0.0, tls: {tls}}}\n")
    assert err.field == "portal.public_url" and "https" in err.problem
    relative = "{certificate_file: tls.crt, private_key_file: /etc/gw/tls.key}"
    err = _error(f"listen:\n  envoy: {{tls: {relative}}}\nportal: {{public_url: https://gw.example}}\n")
    assert err.field == "listen.envoy.tls.certificate_file"
    assert _error("listen:\n  envoy: {tls: {certificate_file: /a.pem}}\n").field == (
        "listen.envoy.tls.private_key_file"
    )


# --- portal.login_notice and policies[].managed_settings ------------------------------------------


def test_login_notice_is_plain_text_of_at_most_500_characters() -> None:
    """The notice loads as given up to 500 characters; longer, blank or with control characters: refused."""
    assert loads(f"portal: {{login_notice: '{'x' * 500}'}}\n", {}).portal.login_notice == "x" * 500
    assert loads('portal: {login_notice: "Line one\\nline two"}\n', {}).portal.login_notice == (
        "Line one\nline two"
    )
    assert loads("", {}).portal.login_notice is None
    for notice, problem in [
        (f"'{'x' * 501}'", "501 characters"),
        ("'   '", "empty"),
        ('"bell\\a"', "plain text"),
        ('"esc\\e[31m"', "plain text"),
    ]:
        err = _error(f"portal: {{login_notice: {notice}}}\n")
        assert err.field == "portal.login_notice" and problem in err.problem


def test_managed_settings_is_a_json_mapping_kept_canonically() -> None:
    """A policy's managed_settings becomes an immutable JSON document; none means None."""
    config = loads(
        BASE
        + """    managed_settings:
      permissions: {deny: [Read(./.env)], disableBypassPermissionsMode: disable}
      env: {ANTHROPIC_MODEL: claude-sonnet-4-5, RETRIES: 3, RATIO: 1.0}
""",
        {},
    )
    settings = config.policies[0].managed_settings
    assert settings is not None
    assert settings.value() == {
        "env": {"ANTHROPIC_MODEL": "claude-sonnet-4-5", "RATIO": 1, "RETRIES": 3},
        "permissions": {"deny": ["Read(./.env)"], "disableBypassPermissionsMode": "disable"},
    }
    assert loads(BASE, {}).policies[0].managed_settings is None
    empty = loads(BASE + "    managed_settings: {}\n", {}).policies[0].managed_settings
    assert empty is not None and empty.value() == {}


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        ("[a, b]", "policies[0].managed_settings", "expected a mapping"),
        ("{1: x}", "policies[0].managed_settings", "not a string"),
        ("{env: {WHEN: 2025-01-01}}", "policies[0].managed_settings.env.WHEN", "quote dates"),
        ("{limit: .nan}", "policies[0].managed_settings.limit", "not a JSON number"),
        ("{big: 9007199254740993}", "policies[0].managed_settings.big", "2^53"),
        ("{list: [1, .inf]}", "policies[0].managed_settings.list[1]", "not a JSON number"),
    ],
)
def test_managed_settings_that_json_cannot_carry_exactly_are_refused(
    value: str, field: str, problem: str
) -> None:
    """Values JSON (or the JavaScript client) cannot hold exactly are refused, naming where they are."""
    err = _error(BASE + f"    managed_settings: {value}\n")
    assert err.field == field and problem in err.problem


# --- a whole realistic file -------------------------------------------------------------------

REALISTIC = """
listen:
  envoy:
    address: 0.0.0.0
    port: 8443
    tls: {certificate_file: /etc/gw/tls/tls.crt, private_key_file: /etc/gw/tls/tls.key}
  envoy_admin: {port: 9901}
  grpc: {port: 9101}
  portal: {port: 9200}
workers: ${WORKERS:-4}
sessions:
  issuer: https://gw.example.com
  audience: claude-gateway
  access_token_ttl: 600
  signing_key:
    kid: "2025-11"
    algorithm: EdDSA
    private_key: ${file:keys/signing.pem}
  verify_keys:
    - {kid: "2025-08", public_key: "${file:keys/old.pub}"}
store:
  url: ${DATABASE_URL}
  batch_size: 50
portal:
  public_url: https://gw.example.com
  login_notice: "Use of this system is monitored."
upstreams:
  bedrock-us:
    kind: bedrock
    region: us-east-1
    fips: true
    credentials:
      source: assume_role
      role_arn: arn:aws:iam::123456789012:role/gw
      external_id: gw
    model_map:
      claude-opus-5-5: us.anthropic.claude-opus-5-5
      claude-haiku-4-5: us.anthropic.claude-haiku-4-5-20251001-v1:0
  vertex-global:
    kind: vertex
    region: global
    project: acme-prod
    credentials: {source: service_account_file, path: /run/secrets/sa.json}
    connect_timeout: 2.5
policies:
  - name: engineering
    groups: [engineering, platform]
    upstreams: [bedrock-us, vertex-global]
  - name: contractors
    email_domains: [contractors.example.com]
    models: ["claude-sonnet-*", "claude-haiku-*"]
    upstreams: [bedrock-us]
    managed_settings:
      permissions: {deny: ["Read(./.env)"]}
      env: {CLAUDE_CODE_ENABLE_TELEMETRY: "1"}
pricing:
  models:
    claude-opus-5-5: {input: 3, output: 15, cache_write_5m: 3.75, cache_write_1h: 6, cache_read: 0.3}
  regional_premium: 0.2
limits:
  max_request_body_bytes: 10485760
  stream_idle_timeout: 300
"""


def test_realistic_config_loads_into_the_expected_frozen_objects(tmp_path: Path) -> None:
    """A production-shaped file becomes exactly the expected frozen tree; mappings become pairs."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.pem").write_text("SIGNING-PEM\n")
    (tmp_path / "keys" / "old.pub").write_text("OLD-PUB\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(REALISTIC)

    config = load(path, {"DATABASE_URL": "postgresql://db/gw"})

    assert config == GatewayConfig(
        listen=Listen(
            envoy=EnvoyAddress(
                "0.0.0.0", 8443, tls=ListenerTls("/etc/gw/tls/tls.crt", "/etc/gw/tls/tls.key")
            ),
            envoy_admin=Address("127.0.0.1", 9901),
            grpc=Address("127.0.0.1", 9101),
            portal=Address("127.0.0.1", 9200),
        ),
        workers=4,
        sessions=Sessions(
            issuer="https://gw.example.com",
            audience="claude-gateway",
            access_token_ttl=600,
            clock_skew=30,
            signing_key=SigningKey(kid="2025-11", algorithm="EdDSA", private_key="SIGNING-PEM"),
            verify_keys=(SigningKey(kid="2025-08", algorithm="ES256", public_key="OLD-PUB"),),
        ),
        store=Store(url="postgresql://db/gw", batch_size=50),
        portal=Portal(public_url="https://gw.example.com", login_notice="Use of this system is monitored."),
        upstreams=(
            (
                "bedrock-us",
                Upstream(
                    kind="bedrock",
                    settings=BedrockConfig(
                        region="us-east-1",
                        fips=True,
                        credentials=AwsCredentials(
                            source="assume_role",
                            role_arn="arn:aws:iam::123456789012:role/gw",
                            external_id="gw",
                        ),
                        model_map=(
                            ("claude-opus-5-5", "us.anthropic.claude-opus-5-5"),
                            ("claude-haiku-4-5", "us.anthropic.claude-haiku-4-5-20251001-v1:0"),
                        ),
                    ),
                ),
            ),
            (
                "vertex-global",
                Upstream(
                    kind="vertex",
                    settings=VertexConfig(
                        region="global",
                        project="acme-prod",
                        credentials=GoogleCredentials(
                            source="service_account_file", path="/run/secrets/sa.json"
                        ),
                        connect_timeout=2.5,
                    ),
                ),
            ),
        ),
        policies=(
            Policy(
                name="engineering",
                groups=("engineering", "platform"),
                models=("claude-*",),
                upstreams=("bedrock-us", "vertex-global"),
            ),
            Policy(
                name="contractors",
                email_domains=("contractors.example.com",),
                models=("claude-sonnet-*", "claude-haiku-*"),
                upstreams=("bedrock-us",),
                managed_settings=json_object(
                    {"env": {"CLAUDE_CODE_ENABLE_TELEMETRY": "1"}, "permissions": {"deny": ["Read(./.env)"]}}
                ),
            ),
        ),
        pricing=Pricing(
            models=(("claude-opus-5-5", Price(3.0, 15.0, 3.75, 6.0, 0.3)),),
            regional_premium=0.2,
        ),
        limits=Limits(max_request_body_bytes=10485760, stream_idle_timeout=300.0),
    )
    # Exact types, not just equal values: ints stay ints, floats are floats, mappings are tuples.
    assert type(config.workers) is int
    assert type(config.limits.stream_idle_timeout) is float
    assert isinstance(config.upstreams, tuple)
    assert config.upstream("vertex-global").settings.project == "acme-prod"  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.upstream("bedrock-us").settings.region = "eu-west-1"  # type: ignore[attr-defined]


def test_development_fixture_loads_with_an_empty_environment() -> None:
    """The committed dev config loads without any environment and points both upstreams at loopback."""
    config = load(FIXTURES / "dev.yaml", {})
    assert [name for name, _ in config.upstreams] == ["bedrock", "vertex"]
    assert {up.settings.base_url for _, up in config.upstreams} == {"http://127.0.0.1:18081"}
    assert config.store.url == ""


# --- spend caps and rate limits -----------------------------------------------------------------

SPEND = """
policies:
  - name: eng
    groups: [eng]
    upstreams: [main]
    spend_caps: [{period: daily, usd: 50}, {period: monthly, usd: "600.5"}]
    rate_limits: {requests_per_minute: 120}
spend:
  group_budgets: [{group: platform, period: weekly, usd: 5000}]
  org_caps: [{period: monthly, usd: 40000}]
  on_store_error: open
"""


def _spend(text: str) -> str:
    return BASE.split("policies:")[0] + textwrap.dedent(text)


def test_spend_caps_and_rate_limits_load() -> None:
    """Caps per policy, shared group budgets, organisation caps and rate limits load into the schema;
    unset rates stay null."""
    config = loads(_spend(SPEND), {})
    (policy,) = config.policies
    assert [(c.period, c.usd) for c in policy.spend_caps] == [("daily", 50.0), ("monthly", 600.5)]
    assert (policy.rate_limits.requests_per_minute, policy.rate_limits.tokens_per_minute) == (120, None)
    assert [(b.group, b.period, b.usd) for b in config.spend.group_budgets] == [
        ("platform", "weekly", 5000.0)
    ]
    assert config.spend.on_store_error == "open" and config.spend.open_grace == 300.0


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (
            ("period: daily, usd: 50", "period: hourly, usd: 50"),
            "policies[0].spend_caps[0].period",
            "must be one of",
        ),
        (("period: daily, usd: 50", "period: daily, usd: -1"), "policies[0].spend_caps[0].usd", "negative"),
        (
            ("period: daily, usd: 50", "period: daily, dollars: 50"),
            "policies[0].spend_caps[0].dollars",
            "unknown key",
        ),
        (
            ("requests_per_minute: 120", "requests_per_minute: 0"),
            "policies[0].rate_limits.requests_per_minute",
            "at least 1",
        ),
        (
            ("requests_per_minute: 120", "requests_per_hour: 9"),
            "policies[0].rate_limits.requests_per_hour",
            "unknown key",
        ),
        (("group: platform", "group: ''"), "spend.group_budgets[0].group", "name a group"),
        (("usd: 40000", "usd: -5"), "spend.org_caps[0].usd", "negative"),
        (("on_store_error: open", "on_store_error: maybe"), "spend.on_store_error", "must be one of"),
        (("on_store_error: open", "open_grace: 0"), "spend.open_grace", "positive"),
        (("on_store_error: open", "lease_fraction: 1.5"), "spend.lease_fraction", "between 0 and 1"),
        (("on_store_error: open", "sync_interval: 30\n  lease_ttl: 60"), "spend.lease_ttl", "three times"),
        (("on_store_error: open", "increase_url: ftp://x"), "spend.increase_url", "http(s) URL"),
        (("on_store_error: open", "budget: 5"), "spend.budget", "unknown key"),
    ],
)
def test_bad_spend_settings_are_refused_by_field(change: tuple[str, str], field: str, problem: str) -> None:
    """Each bad cap, rate or spend setting stops loading with the field named."""
    err = _error(_spend(SPEND.replace(*change)))
    assert err.field == field, str(err)
    assert problem in err.problem
