"""deploy/kubernetes: the kustomize base and the overlay render, every document validates against a
pinned Kubernetes schema, and the pieces point at each other: probes at the health endpoints on the
ports the gateway listens on, non-root and read-only everywhere, selectors at the pods that exist,
and a termination grace period that covers the services' drain."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from authz.config import loads
from authz.configtypes import GatewayConfig
from authz.envoy.render import load_for_render
from authz.service import DRAIN_SECONDS, GRACE_SECONDS

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes" / "base"
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "external-postgres"
# The Kubernetes release whose API schemas the manifests are checked against (kubernetes-validate
# ships them); the oldest release the manifests promise to work on.
KUBERNETES_VERSION = "1.33.0"

# --- a small kustomize, for machines without kubectl ------------------------------------------

# Strategic-merge keys of the lists the patches touch (Kubernetes' patchMergeKey); other lists are
# replaced whole, as kustomize does for lists without one (NetworkPolicy rules, for example).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "topologySpreadConstraints": "topologyKey",
}
_SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    key = _MERGE_KEYS.get(field)
    if isinstance(base, list) and isinstance(patch, list) and key and all(key in i for i in base + patch):
        merged = [copy.deepcopy(i) for i in base]
        added = []
        for item in patch:
            match = next((i for i, b in enumerate(merged) if b[key] == item[key]), None)
            if match is None:
                added.append(copy.deepcopy(item))
            else:
                merged[match] = _merge(merged[match], item)
        # Like kustomize (kyaml's strategic merge), items only the patch has come first.
        return added + merged
    return copy.deepcopy(patch)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def mini_kustomize(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize directory`` would print, for the features used here."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - _SUPPORTED
    assert not unknown, f"{directory}: the fallback kustomize does not implement {unknown}"
    docs: list[dict[str, Any]] = []
    for resource in k.get("resources", []):
        path = directory / resource
        docs += (
            mini_kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        )
    for patch in k.get("patches", []):
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            i = next(
                i
                for i, d in enumerate(docs)
                if (d["kind"], d["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])
            )
            docs[i] = _merge(docs[i], doc)
    if "namespace" in k:
        for doc in docs:
            doc["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` when kubectl is installed, else the fallback above."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return mini_kustomize(directory)
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _canonical(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(d, sort_keys=True) for d in docs)


# --- the rendered documents ----------------------------------------------------------------------

RENDERED = {"base": kustomize(BASE), "overlay": kustomize(OVERLAY)}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single document of ``kind``."""
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A container (or init container) of the Deployment's pod."""
    return next(c for c in _containers(one(docs, "Deployment")) if c["name"] == name)


def gateway_yaml(docs: list[dict[str, Any]]) -> GatewayConfig:
    """The gateway configuration the ConfigMap carries, loaded by the gateway's own loader (the
    ``${file:...}`` secrets are not read, as for rendering)."""
    text = one(docs, "ConfigMap")["data"]["gateway.yaml"]
    return loads(re.sub(r"\$\{file:[^}]*\}", "not-read", text), {"DATABASE_URL": "postgresql://db/gw"})


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_the_fallback_renders_what_kubectl_renders(directory: Path) -> None:
    """Where kubectl exists, the fallback kustomize produces the same documents (so the checks below
    mean the same thing on machines without kubectl)."""
    assert _canonical(mini_kustomize(directory)) == _canonical(kustomize(directory))


@pytest.mark.parametrize("variant", RENDERED, ids=list(RENDERED))
def test_every_document_validates_against_the_pinned_schema(variant: str) -> None:
    """Each rendered document is valid for Kubernetes 1.33 (strict: unknown fields fail)."""
    docs = RENDERED[variant]
    assert {d["kind"] for d in docs} == {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", RENDERED, ids=list(RENDERED))
def test_probes_hit_the_health_endpoints_on_the_ports_the_gateway_listens_on(variant: str) -> None:
    """The services' liveness is /healthz and readiness /readyz on the portal port of gateway.yaml;
    Envoy's readiness goes through its listener port; the services' gRPC port is the configured one."""
    docs = RENDERED[variant]
    config = gateway_yaml(docs)
    gateway = container(docs, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"grpc": config.listen.grpc.port, "portal": config.listen.portal.port}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "portal"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "portal"}
    assert gateway["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "portal"}
    envoy = container(docs, "envoy")
    assert {p["name"]: p["containerPort"] for p in envoy["ports"]} == {"http": config.listen.envoy.port}
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # gRPC and Envoy's admin stay on the pod's loopback; the probes reach the portal on the pod IP.
    assert (config.listen.grpc.address, config.listen.envoy_admin.address) == ("127.0.0.1", "127.0.0.1")
    assert config.listen.portal.address == "0.0.0.0"


@pytest.mark.parametrize("variant", RENDERED, ids=list(RENDERED))
def test_everything_runs_as_non_root_on_a_read_only_root_filesystem(variant: str) -> None:
    """The pod runs as a non-root uid with the default seccomp profile; every container (init
    included) has a read-only root, no privilege escalation and no capabilities."""
    docs = RENDERED[variant]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0 and security["runAsGroup"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in _containers(one(docs, "Deployment")):
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, c["name"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"USER {security['runAsUser']}:{security['runAsGroup']}" in dockerfile


@pytest.mark.parametrize("variant", RENDERED, ids=list(RENDERED))
def test_selectors_and_references_point_at_what_exists(variant: str) -> None:
    """The NetworkPolicy, Service and PodDisruptionBudget select the Deployment's pods; the
    NetworkPolicy admits only Envoy's port (no gRPC or portal port); the Service targets Envoy;
    the autoscaler targets the Deployment; every mount names a volume and the ConfigMap exists."""
    docs = RENDERED[variant]
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    envoy_ports = {p["name"] for p in container(docs, "envoy")["ports"]}
    assert admitted == {"http"} and admitted <= envoy_ports
    gateway_ports = {p["name"] for p in container(docs, "gateway")["ports"]}
    assert not admitted & gateway_ports
    assert {p["targetPort"] for p in one(docs, "Service")["spec"]["ports"]} == {"http"}
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in _containers(deployment):
        assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), c["name"]
    assert volumes["config"]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1


@pytest.mark.parametrize("variant", RENDERED, ids=list(RENDERED))
def test_termination_grace_covers_the_drain(variant: str) -> None:
    """Envoy outlives the services' preStop pause, drain and stream grace, and the pod's grace
    period outlives Envoy: in-flight streams finish and their usage is recorded."""
    docs = RENDERED[variant]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]

    def pause(name: str) -> float:
        command = container(docs, name)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        return float(command[1])

    services_done = pause("gateway") + DRAIN_SECONDS + GRACE_SECONDS
    assert services_done + 1 < pause("envoy") < pod["terminationGracePeriodSeconds"]


def test_the_overlay_points_at_an_external_postgresql_over_tls() -> None:
    """The overlay keeps the database URL in the Secret, asks for verified TLS, narrows egress to
    the database's network, and uses its registry's image everywhere."""
    docs = RENDERED["overlay"]
    gateway = container(docs, "gateway")
    env = {e["name"]: e for e in gateway["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "claude-gateway-database",
        "key": "url",
    }
    assert env["PGSSLMODE"]["value"] == "verify-full"
    database_rules = [
        r
        for r in one(docs, "NetworkPolicy")["spec"]["egress"]
        if {"port": 5432, "protocol": "TCP"} in r["ports"]
    ]
    assert [r.get("to") for r in database_rules] == [[{"ipBlock": {"cidr": "10.20.0.0/24"}}]]
    assert {c["image"] for c in _containers(one(docs, "Deployment"))} == {
        "registry.example.com/platform/claude-gateway:0.1.0"
    }


def test_the_configmap_config_renders_for_envoy(tmp_path: Path) -> None:
    """The ConfigMap's gateway.yaml renders an Envoy bootstrap the way the init container does
    (``authz envoy --render``: secrets not read, only DATABASE_URL needed)."""
    from authz.envoy.render import render

    path = tmp_path / "gateway.yaml"
    path.write_text(one(RENDERED["base"], "ConfigMap")["data"]["gateway.yaml"])
    bootstrap = render(load_for_render(path, {"DATABASE_URL": "postgresql://db/gw"}))
    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["port_value"] == 8080
