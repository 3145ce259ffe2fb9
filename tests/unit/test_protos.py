"""The generated code under authz/_generated matches protos/ (run `make protos` after editing)."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GENERATED = ROOT / "authz" / "_generated"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Compiling protos/ again gives byte-identical modules and stubs to the committed ones."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    assert sources, "no .proto files found"
    args = ["protoc", f"-I{PROTOS}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", *sources]
    assert protoc.main(args) == 0
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert fresh
    for rel in fresh:
        assert (GENERATED / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
