"""docs/security.md stays true: every test it cites as evidence exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `e2e/test_x.py::test_name`, or `::test_name` continuing the last file named.
CITATION = re.compile(r"`((?:e2e|unit|integration)/[\w/]+\.py)?(?:::(\w+))?`")


def cited() -> list[tuple[str, str | None]]:
    """Every (test file, test name or None) the threat model cites, in order."""
    out: list[tuple[str, str | None]] = []
    current = None
    for match in CITATION.finditer((ROOT / "docs" / "security.md").read_text(encoding="utf-8")):
        path, name = match.groups()
        current = path or current
        if current and (path or name):
            out.append((current, name))
    return out


def test_every_cited_test_exists() -> None:
    citations = cited()
    assert len(citations) > 30
    for path, name in citations:
        source = ROOT / "tests" / path
        assert source.is_file(), path
        if name:
            text = source.read_text(encoding="utf-8")
            assert re.search(rf"^(async )?def {name}\(", text, re.M), (path, name)
