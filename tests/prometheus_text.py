"""Read the Prometheus text exposition format in tests (with prometheus_client's own parser)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample at ``url``: sample name -> [(labels, value)]."""
    text = httpx.get(url, timeout=10).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def total(
    samples: dict[str, list[tuple[dict[str, str], float]]],
    name: str,
    where: Callable[[dict[str, str]], bool] = lambda _labels: True,
) -> float:
    """The sum of sample ``name`` over the series whose labels pass ``where``."""
    return sum(value for labels, value in samples.get(name, []) if where(labels))
