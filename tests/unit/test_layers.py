"""The package layout's rules (docs/architecture.md): imports only go down the layers, backends/
never imports authz/, nothing imports the development stack, and only the servicer module
touches Envoy's generated protobuf."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A module may import its own package and anything in a lower layer, nothing above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("backends",),
    ("backends.emulator",),
    ("authz.jsondoc",),
    ("authz.errors", "authz.identity", "authz.serviceid", "authz.configtypes"),
    ("authz.config", "authz.statedir"),
    ("authz.store",),
    ("authz.billing", "authz.telemetry"),
    ("authz.translate", "authz.signin"),
    # Envoy's routes come from the client formats' grammars (the translators' Messages paths).
    ("authz.envoy",),
    # A reload keeps the failover chains Envoy was rendered with (authz.envoy.failover).
    ("authz.reload",),
    ("authz.gateway", "authz.ops"),
    ("authz.service", "authz.supervisor", "authz.client"),
    ("authz.cli",),
    ("authz.dev",),
)
LAYER = {package: level for level, packages in enumerate(LAYERS) for package in packages}
# Packages that must stay apart although the layers would allow the import.
FORBIDDEN = {
    # The developer-side client knows nothing of the server.
    "authz.client": {
        "authz.store",
        "authz.billing",
        "authz.signin",
        "authz.gateway",
        "authz.envoy",
        "authz.config",
    },
    # Only the development stack uses the stand-in clouds.
    **{p: {"backends.emulator"} for p in LAYER if p not in ("authz.dev", "backends.emulator")},
}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted([*ROOT.glob("authz/**/*.py"), *ROOT.glob("backends/**/*.py")]):
        if "_generated" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def imported(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (function-level and TYPE_CHECKING too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_of(module: str) -> str | None:
    """The layered package a module belongs to (the longest listed prefix)."""
    best = None
    for package in LAYER:
        if (module == package or module.startswith(package + ".")) and (
            best is None or len(package) > len(best)
        ):
            best = package
    return best


MODULES = dict(modules())


def test_every_module_has_a_layer() -> None:
    """A new package or top-level module must be placed in LAYERS (and in docs/architecture.md)."""
    unplaced = sorted(m for m in MODULES if m not in ("authz", "backends") and package_of(m) is None)
    assert unplaced == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module: str) -> None:
    """No module imports a package in its own layer or above (other than its own package), or a
    package it is forbidden to know."""
    own = package_of(module)
    if own is None:
        return
    wrong = []
    for name in imported(MODULES[module]):
        if not name.startswith(("authz", "backends")):
            continue
        target = package_of(name)
        if target is None or target == own:
            continue
        if LAYER[target] >= LAYER[own] or target in FORBIDDEN.get(own, set()):
            wrong.append(f"{name} ({target})")
    assert wrong == [], f"{module} ({own}) imports {sorted(set(wrong))}"


def test_nothing_in_backends_imports_authz() -> None:
    """backends/ is below everything in authz/."""
    offenders = {
        m for m in MODULES if m.startswith("backends") for n in imported(MODULES[m]) if n.startswith("authz")
    }
    assert offenders == set()


def test_nothing_imports_the_development_stack() -> None:
    """authz/dev is run by `make run` and the tests; no product module imports it."""
    offenders = {
        m
        for m in MODULES
        if not m.startswith("authz.dev")
        for n in imported(MODULES[m])
        if n.startswith("authz.dev")
    }
    assert offenders == set()


def test_only_the_servicer_touches_envoys_generated_protobuf() -> None:
    """Envoy's generated messages (the xds-protos `envoy` package) stay at the gRPC edge."""
    users = {m for m in MODULES for n in imported(MODULES[m]) if n == "envoy" or n.startswith("envoy.")}
    assert users <= {"authz.gateway.servicer"}


def test_the_services_do_not_load_the_bootstrap_builders() -> None:
    """`authz serve` reads the names it shares with Envoy's bootstrap from authz.envoy.names; the
    builders' typed Envoy config (envoy_data_plane, pydantic: about 20 MB per worker process) stays
    out of every worker."""
    probe = (
        "import sys, authz.service; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'envoy_data_plane', 'pydantic'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"
