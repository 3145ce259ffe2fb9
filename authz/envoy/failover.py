"""Failover chains: the upstreams one request may be tried on, in order, and the Envoy cluster
that holds them. Pure, no I/O.

A policy's ``upstreams`` are an ordered preference. For one client format, the upstreams that can
serve it (of the format's own kind for the Bedrock and Vertex formats, of any kind for the Messages
API), at most ``failover.max_attempts`` of them, are the request's *chain*. A chain of one upstream
is served as ever, by that upstream's own cluster (:func:`authz.envoy.upstreams.cluster_name`). A
chain of two or more gets a cluster of its own, ``failover<N>_<first>__<second>...``, whose
endpoints are the upstreams at priorities 0, 1, ... (:mod:`authz.envoy.clusters`), reached by
inference routes that retry on the next priority (:mod:`authz.envoy.routes`): ext_authz names that
cluster (:mod:`authz.gateway.authorize`), Envoy does the retrying, and an upstream ext_proc filter
signs each attempt for the upstream Envoy picked (:mod:`authz.gateway.attempt`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from authz.configtypes import GatewayConfig, Policy
from authz.envoy.upstreams import cluster_name
from authz.translate.messages import FORMAT as MESSAGES
from authz.translate.registry import serves
from backends.kinds import KINDS, PASS_THROUGH

FORMATS: tuple[str, ...] = (*PASS_THROUGH, MESSAGES)
"""Every client format, each kind's pass-through format then the Messages API."""

CLUSTER_PREFIX = "failover"


@dataclass(frozen=True, slots=True)
class Chain:
    """A failover cluster: its name, its upstreams in order of preference, and the client formats
    whose requests reach it (some policy's chain for that format)."""

    cluster: str
    upstreams: tuple[str, ...]
    formats: frozenset[str]

    @property
    def attempts(self) -> int:
        """How many upstreams a request is tried on at most: one per upstream."""
        return len(self.upstreams)


def servable(config: GatewayConfig, policy: Policy, client_format: str) -> tuple[str, ...]:
    """The policy's upstreams that serve ``client_format``, in the policy's order, at most
    ``failover.max_attempts`` of them (empty when none does)."""
    found: list[str] = []
    limit = config.failover.max_attempts
    for name in policy.upstreams:
        try:
            upstream = config.upstream(name)
        except KeyError:
            # Config validation rejects unknown names; skipping keeps a bad reload fail-closed.
            continue
        if name not in found and serves(client_format, upstream.kind):
            found.append(name)
            if limit is not None and len(found) >= limit:
                break
    return tuple(found)


def attempts_prefix(attempts: int) -> str:
    """The start of every failover cluster's name whose requests are tried ``attempts`` times at
    most (the inference routes with that many retries match it)."""
    return f"{CLUSTER_PREFIX}{attempts}_"


def chain_cluster(upstreams: Iterable[str]) -> str:
    """The Envoy cluster of a chain of two or more upstreams: ``failover<N>_`` and the upstreams'
    cluster-safe names joined by ``__``."""
    names = tuple(upstreams)
    safe = "__".join(cluster_name(name).removeprefix("upstream_") for name in names)
    return attempts_prefix(len(names)) + safe


def cluster_for(upstreams: tuple[str, ...]) -> str:
    """The cluster a request with this chain is sent to: the only upstream's own cluster, or the
    chain's failover cluster."""
    return cluster_name(upstreams[0]) if len(upstreams) == 1 else chain_cluster(upstreams)


def chains(config: GatewayConfig) -> tuple[Chain, ...]:
    """Every failover cluster the configuration needs, in order of first use by the policies; a
    chain shared by several policies or formats is one cluster."""
    found: dict[tuple[str, ...], set[str]] = {}
    for policy in config.policies:
        for client_format in FORMATS:
            upstreams = servable(config, policy, client_format)
            if len(upstreams) > 1:
                found.setdefault(upstreams, set()).add(client_format)
    return tuple(Chain(chain_cluster(ups), ups, frozenset(fmts)) for ups, fmts in found.items())


def needs_request_body(chain: Chain, config: GatewayConfig) -> bool:
    """Whether an attempt on ``chain`` may need the request body: a Messages request is translated
    from it, and a kind that signs over the body (SigV4) needs its bytes."""
    if MESSAGES in chain.formats:
        return True
    return any(KINDS[config.upstream(name).kind].signs_body for name in chain.upstreams)
