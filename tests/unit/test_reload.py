"""Reloading the configuration: which keys a reload changes and which it keeps for a restart, how
a changed file is noticed (polls driven by the test), and what each reload reports."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.config import loads
from authz.configtypes import GatewayConfig
from authz.errors import ConfigError
from authz.reload.reloader import Reloader, describe
from authz.reload.scope import RESTART_ONLY, differences, split
from authz.reload.watch import FileWatch, sha256_hex

ROOT = Path("/var/lib/claude-gateway")


def raw_config(**changes: Any) -> dict[str, Any]:
    """A small valid configuration as plain data, top-level keys replaced by ``changes``."""
    raw: dict[str, Any] = {
        "workers": 2,
        "listen": {"grpc": {"port": 9001}, "portal": {"port": 9100}},
        "upstreams": {
            "bedrock-us": {
                "kind": "bedrock",
                "region": "us-east-1",
                "credentials": {"source": "static", "access_key_id": "AKID", "secret_access_key": "s"},
            }
        },
        "policies": [
            {"name": "eng", "groups": ["eng"], "models": ["claude-haiku-*"], "upstreams": ["bedrock-us"]},
            {"name": "ops", "groups": ["ops"], "upstreams": ["bedrock-us"]},
        ],
        "pricing": {"models": {"claude-x": _price(1)}},
    }
    raw.update(changes)
    return raw


def _price(usd: float) -> dict[str, float]:
    return {"input": usd, "output": usd, "cache_write_5m": usd, "cache_write_1h": usd, "cache_read": usd}


def config(**changes: Any) -> GatewayConfig:
    return loads(yaml.safe_dump(raw_config(**changes)), {})


def write(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


# --- what a reload changes --------------------------------------------------------------------


def test_differences_name_the_changed_keys_as_deep_as_sections_go() -> None:
    """A policy's models and an added price are named by their own paths; a list that grew is
    named whole; equal configurations differ nowhere."""
    old = config()
    policies = raw_config()["policies"]
    policies[0]["models"] = ["claude-*"]
    new = config(policies=policies, pricing={"models": {"claude-x": _price(1), "claude-y": _price(2)}})
    assert differences(old, new) == ["policies[0].models", "pricing.models.claude-y"]
    grown = config(
        policies=[*raw_config()["policies"], {"name": "x", "groups": ["x"], "upstreams": ["bedrock-us"]}]
    )
    assert differences(old, grown) == ["policies"]
    assert differences(old, config()) == []


def test_split_keeps_restart_only_keys_and_names_them() -> None:
    """Workers, a gRPC port and an upstream's region keep their running values and are named;
    the policies and prices are the file's."""
    running = config()
    upstreams = raw_config()["upstreams"]
    upstreams["bedrock-us"]["region"] = "eu-west-1"
    loaded = config(
        workers=4,
        listen={"grpc": {"port": 9101}, "portal": {"port": 9100}},
        upstreams=upstreams,
        policies=[{"name": "eng", "groups": ["eng"], "models": ["claude-*"], "upstreams": ["bedrock-us"]}],
        pricing={"models": {"claude-x": _price(3)}},
    )
    merged, pending = split(running, loaded)
    assert pending == ("listen.grpc.port", "workers", "upstreams.bedrock-us.region")
    assert merged.workers == 2 and merged.listen == running.listen and merged.upstreams == running.upstreams
    assert merged.policies == loaded.policies and merged.pricing == loaded.pricing
    assert differences(running, merged)[:2] == ["policies", "pricing.models.claude-x.input"]


def test_every_restart_only_path_names_a_key() -> None:
    """Each restart-only path exists in the schema (a renamed key would silently become live)."""
    default = GatewayConfig()
    for path in RESTART_ONLY:
        section: Any = default
        for name in path.split("."):
            assert name in {f.name for f in dataclasses.fields(section)}, path
            section = getattr(section, name)
            if section is None:
                break


# --- noticing a change ----------------------------------------------------------------------


def test_file_watch_reports_new_content_once(tmp_path: Path) -> None:
    """The first (forced) look reads the file; a touch is no change; new content is, once; a
    rename over it is too; an unreadable file is said once, and its return is a change."""
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    watch = FileWatch(path)
    first = watch.poll(force=True)
    assert first is not None and first.data == b"a: 1\n" and first.digest == sha256_hex(b"a: 1\n")
    assert watch.poll() is None

    os.utime(path, ns=(1, 1))  # a touch: the stamp moves, the bytes do not
    assert watch.poll() is None

    path.write_text("a: 2\n")
    changed = watch.poll()
    assert changed is not None and changed.data == b"a: 2\n"
    assert watch.poll() is None

    replacement = tmp_path / "gateway.yaml.new"
    replacement.write_text("a: 3\n")
    os.replace(replacement, path)
    renamed = watch.poll()
    assert renamed is not None and renamed.data == b"a: 3\n"

    path.unlink()
    gone = watch.poll()
    assert gone is not None and gone.data is None and gone.error and "gateway.yaml" in gone.error
    assert watch.poll() is None
    path.write_text("a: 3\n")
    back = watch.poll()
    assert back is not None and back.data == b"a: 3\n"


def test_forced_poll_reads_the_file_whatever_it_holds(tmp_path: Path) -> None:
    """SIGHUP rereads an unchanged file."""
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    watch = FileWatch(path)
    assert watch.poll(force=True) is not None
    again = watch.poll(force=True)
    assert again is not None and again.data == b"a: 1\n"


# --- the reload -----------------------------------------------------------------------------


@pytest.fixture
def file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    write(path, raw_config())
    return path


def test_reload_applies_live_changes_and_reports_them(file: Path) -> None:
    """A changed policy is applied: the outcome carries the new configuration (state directory
    resolved as at start-up), the changed key and the file's hash; nothing new, nothing to do."""
    reloader = Reloader(file, {}, ROOT)
    assert reloader.poll() is None
    first_hash = reloader.status.sha256
    assert first_hash == sha256_hex(file.read_bytes())

    raw = raw_config()
    raw["policies"][0]["models"] = ["claude-sonnet-*"]
    write(file, raw)
    outcome = reloader.poll()
    assert outcome is not None and outcome.result == "applied" and outcome.trigger == "file"
    assert outcome.changed == ("policies[0].models",)
    assert outcome.config is reloader.config
    assert outcome.config.policies[0].models == ("claude-sonnet-*",)
    assert outcome.config.store.spool_dir == str(ROOT / "spool")
    assert outcome.status.sha256 == sha256_hex(file.read_bytes()) != first_hash
    assert outcome.status.error is None and outcome.status.restart_pending == ()
    line = describe(outcome, file)
    assert "reloaded after the file changed" in line and "policies[0].models" in line
    assert outcome.status.sha256[:12] in line
    assert reloader.poll() is None


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (lambda raw: raw["policies"][0].update(modelz=["x"]), "policies[0].modelz", "unknown key"),
        (
            lambda raw: raw["policies"][1].update(upstreams="nowhere"),
            "policies[1].upstreams",
            "no upstream named",
        ),
        (
            lambda raw: raw.update(pricing={"models": {"claude-x": {**_price(1), "input": "cheap"}}}),
            "pricing.models.claude-x.input",
            "expected a number",
        ),
        (
            lambda raw: raw.update(spend={"org_caps": [{"period": "hourly", "usd": 1}]}),
            "spend.org_caps[0].period",
            "must be one of",
        ),
        (lambda raw: raw.update(reload={"watch_interval": -1}), "reload.watch_interval", "must be 0"),
    ],
)
def test_a_file_that_does_not_load_changes_nothing(file: Path, edit: Any, field: str, problem: str) -> None:
    """A broken file (unknown key, wrong type, bad value, a cross-field rule) keeps the running
    configuration; the outcome and the status name the field, and the hash stays the running one."""
    reloader = Reloader(file, {}, ROOT)
    running, running_hash = reloader.config, reloader.status.sha256
    raw = raw_config()
    edit(raw)
    write(file, raw)
    outcome = reloader.poll()
    assert outcome is not None and outcome.result == "failed" and outcome.config is None
    assert outcome.error is not None and outcome.error.startswith(f"{field}: ") and problem in outcome.error
    assert reloader.config is running
    assert reloader.status.sha256 == running_hash and reloader.status.error == outcome.error
    line = describe(outcome, file)
    assert line.startswith("configuration not reloaded") and field in line and running_hash[:12] in line
    assert reloader.poll() is None  # said once; the next change is looked at again

    write(file, raw_config())
    back = reloader.poll()
    assert back is not None and back.result == "unchanged" and reloader.status.error is None


def test_restart_only_changes_wait_and_are_named(file: Path) -> None:
    """A file changing workers and a policy: the policy applies, workers keep their running value
    and are named in the outcome, the status and the line."""
    reloader = Reloader(file, {}, ROOT)
    raw = raw_config(workers=8)
    raw["policies"][1]["models"] = ["claude-opus-*"]
    write(file, raw)
    outcome = reloader.poll()
    assert outcome is not None and outcome.result == "applied"
    assert outcome.changed == ("policies[1].models",)
    assert outcome.status.restart_pending == ("workers",)
    assert reloader.config.workers == 2
    assert "kept until a restart: workers" in describe(outcome, file)

    only_restart = raw_config(workers=8, listen={"grpc": {"port": 9201}, "portal": {"port": 9100}})
    only_restart["policies"][1]["models"] = ["claude-opus-*"]
    write(file, only_restart)
    quiet = reloader.poll()
    assert quiet is not None and quiet.result == "unchanged" and quiet.config is None
    assert quiet.status.restart_pending == ("listen.grpc.port", "workers")


def test_a_policy_naming_a_new_upstream_needs_a_restart(file: Path) -> None:
    """A policy moved to an upstream the same file adds is refused as a whole (upstreams are
    restart-only), and the error says a restart is what it takes."""
    reloader = Reloader(file, {}, ROOT)
    raw = raw_config()
    raw["upstreams"]["bedrock-eu"] = {**raw["upstreams"]["bedrock-us"], "region": "eu-west-1"}
    raw["policies"][0]["upstreams"] = ["bedrock-eu"]
    write(file, raw)
    outcome = reloader.poll()
    assert outcome is not None and outcome.result == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith("policies[0].upstreams: no upstream named 'bedrock-eu'")
    assert "upstreams.bedrock-eu" in outcome.error and "needs a restart" in outcome.error


def test_a_new_failover_chain_applies_its_order_and_waits_for_a_restart(file: Path) -> None:
    """Envoy's failover clusters are rendered at start-up: a policy given a second upstream by a
    reload keeps no chain until a restart (named as pending), while its first upstream serves."""
    raw = raw_config()
    raw["upstreams"]["bedrock-eu"] = {**raw["upstreams"]["bedrock-us"], "region": "eu-west-1"}
    write(file, raw)
    reloader = Reloader(file, {}, ROOT)
    raw["policies"][1]["upstreams"] = ["bedrock-eu", "bedrock-us"]
    write(file, raw)
    outcome = reloader.poll()
    assert outcome is not None and outcome.result == "applied"
    assert outcome.changed == ("policies[1].upstreams",)
    assert outcome.status.restart_pending == ("policies[1].upstreams",)
    assert reloader.config.policies[1].upstreams == ("bedrock-eu", "bedrock-us")
    # What a worker restarted now is told Envoy has: still none.
    assert reloader.failover_clusters == frozenset()
    # Back to a chain Envoy has (none needed): nothing is pending any more.
    raw["policies"][1]["upstreams"] = ["bedrock-us"]
    write(file, raw)
    settled = reloader.poll()
    assert settled is not None and settled.status.restart_pending == ()


def test_sighup_rereads_an_unchanged_file(file: Path) -> None:
    """A forced poll with nothing new says so (one line, trigger signal) and applies nothing."""
    reloader = Reloader(file, {}, ROOT)
    outcome = reloader.poll(force=True)
    assert outcome is not None and outcome.result == "unchanged" and outcome.trigger == "signal"
    assert "reread on SIGHUP" in describe(outcome, file) and "no live setting changed" in describe(
        outcome, file
    )


def test_watch_interval_is_live(file: Path) -> None:
    """``reload.watch_interval`` itself takes effect at the next reload (0: watching off)."""
    reloader = Reloader(file, {}, ROOT)
    assert reloader.interval == 2.0
    write(file, raw_config(reload={"watch_interval": 0}))
    outcome = reloader.poll()
    assert outcome is not None and outcome.changed == ("reload.watch_interval",)
    assert reloader.interval == 0


def test_start_up_with_a_broken_file_stops(tmp_path: Path) -> None:
    """At start-up there is no running configuration to keep: the error names the field."""
    path = tmp_path / "gateway.yaml"
    write(path, raw_config(workers=0))
    with pytest.raises(ConfigError, match="workers: must be at least 1"):
        Reloader(path, {}, ROOT)
    with pytest.raises(ConfigError, match="cannot read"):
        Reloader(tmp_path / "missing.yaml", {}, ROOT)
