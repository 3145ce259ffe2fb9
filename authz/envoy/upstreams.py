"""The Envoy cluster that reaches each configured upstream, and where that upstream lives.

The Envoy renderer (:mod:`authz.envoy.clusters`) builds one cluster per upstream from
:func:`endpoint`; ext_authz names that cluster in the ``x-gateway-upstream`` header with
:func:`cluster_name`; ext_proc sets ``:authority`` to the same endpoint's authority when it signs.
The endpoint comes from the upstream kind's descriptor (``backends.kinds``), the one place that
knows each cloud's host.
"""

from __future__ import annotations

import re

from authz import configtypes
from backends.base import Endpoint
from backends.kinds import KINDS

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def endpoint(u: configtypes.Upstream) -> Endpoint:
    """The endpoint of upstream ``u``: its ``base_url`` when set, else the cloud's regional host."""
    return KINDS[u.kind].endpoint(u.settings)


def cluster_name(upstream_name: str) -> str:
    """The Envoy cluster for the upstream called ``upstream_name``: ``upstream_<name>``, with any
    character outside ``[A-Za-z0-9_.-]`` replaced by ``_`` so the name is safe in stats and headers."""
    return "upstream_" + _UNSAFE.sub("_", upstream_name)
