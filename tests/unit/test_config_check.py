"""``authz config check FILE``: a file that would start exits 0; each kind of broken file (unknown
key, bad value, a cross-field rule, key material, an upstream's settings, Envoy's rendering) exits
1 with one line naming the field and the problem. Nothing is contacted."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.cli import main
from authz.signin.tokens import generate_signing_key


def good(tmp_path: Path) -> dict[str, Any]:
    """A configuration that starts: a signing key (in a file it references), one upstream, one policy."""
    key = tmp_path / "signing.pem"
    key.write_text(generate_signing_key("k1").private_key or "")
    return {
        "listen": {"envoy": {"port": 8443}, "grpc": {"port": 9001}, "portal": {"port": 9100}},
        "sessions": {"signing_key": {"kid": "k1", "private_key": "${file:signing.pem}"}},
        "store": {"url": "postgresql://gw@db/gw"},
        "upstreams": {
            "bedrock-us": {
                "kind": "bedrock",
                "region": "us-east-1",
                "credentials": {"source": "assume_role", "role_arn": "arn:aws:iam::123456789012:role/gw"},
            }
        },
        "policies": [{"name": "eng", "groups": ["eng"], "models": ["claude-*"], "upstreams": ["bedrock-us"]}],
    }


def check(tmp_path: Path, raw: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Write ``raw`` and run ``authz config check`` on it: its status and output."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    status = main(["config", "check", str(path)])
    return status, capsys.readouterr().out


def test_a_file_that_would_start_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 and one line with the file's hash (as sha256sum prints it) and what it holds."""
    status, out = check(tmp_path, good(tmp_path), capsys)
    assert status == 0, out
    digest = hashlib.sha256((tmp_path / "gateway.yaml").read_bytes()).hexdigest()[:12]
    summary = "1 policies, 1 upstreams, 1 worker(s); Envoy's bootstrap renders"
    assert out == f"{tmp_path / 'gateway.yaml'}: ok (sha256 {digest}): {summary}\n"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = raw
        for name in parents:
            node = node[int(name)] if isinstance(node, list) else node.setdefault(name, {})
        node[last] = value

    return edit


BROKEN = {
    "unknown key": (_set("policies.0.modelz", ["x"]), "policies[0].modelz: unknown key"),
    "wrong type": (_set("workers", "two"), "workers: expected an integer, got 'two'"),
    "bad value": (
        _set("spend.org_caps", [{"period": "hourly", "usd": 1}]),
        "spend.org_caps[0].period: must be one of",
    ),
    "cross-field": (
        _set("policies.0.upstreams", ["vertex"]),
        "policies[0].upstreams: no upstream named 'vertex'",
    ),
    "unset variable": (
        _set("store.url", "${NO_SUCH_VARIABLE_HERE}"),
        "store.url: environment variable NO_SUCH_VARIABLE_HERE is not set",
    ),
    "key material": (_set("sessions.signing_key.private_key", "not a PEM key"), "sessions.signing_key"),
    "upstream settings": (
        _set("upstreams.bedrock-us.credentials.role_arn", "gateway-role"),
        "upstreams.bedrock-us: bedrock upstream 'bedrock-us': role_arn must be an IAM role ARN",
    ),
    "envoy rendering": (
        _set("listen.envoy_admin", {"port": 8443}),
        "listen: listen.envoy_admin and listen.envoy both use port 8443 (rendering Envoy's configuration)",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_each_broken_kind_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Exit 1 and a ``FILE: field: problem`` line for the one problem."""
    edit, expected = BROKEN[kind]
    raw = good(tmp_path)
    edit(raw)
    status, out = check(tmp_path, raw, capsys)
    assert status == 1
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith(f"{tmp_path / 'gateway.yaml'}: {expected}"), lines[0]


def test_the_file_can_be_named_with_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--config FILE`` works as for the other commands; no file at all is an error naming it."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(good(tmp_path)))
    assert main(["config", "check", "--config", str(path)]) == 0
    assert main(["config", "check", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read config file" in capsys.readouterr().out
