"""What one configuration makes of the request path, built whole and swapped by reference.

A worker builds a :class:`Snapshot` from its configuration at start-up and a new one at every
reload that changed a live key (docs/architecture.md, "Live configuration"). Everything in it is
immutable or used read-only: the prices, the ext_authz decision (:class:`Authorizer`), the ext_proc
exchange's dependencies (:class:`Deps`: the policies by name, the model ids, the translators'
options) and the access-log handler. What outlives a reload (the token verifier, the revocation
set, the upstreams with their credential caches, the ledger) is passed in :class:`Shared` and put
into each new snapshot unchanged.

Each call (a ``Check``, a ``Process`` stream, an access-log entry) reads its part of the snapshot
once when it starts and keeps it to its end: a stream that started before a reload finishes, and
writes its usage row, under the configuration it started with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from authz.billing.pricing import PriceBook
from authz.configtypes import GatewayConfig
from authz.gateway.accesslog import AccessLog
from authz.gateway.authorize import Authorizer
from authz.gateway.exchange import Deps
from authz.signin.revocation import RevocationSet
from authz.signin.tokens import TokenVerifier
from authz.store.usagerow import UsageRow
from authz.translate.base import TranslateOptions
from authz.translate.models import ModelResolver
from backends.base import Upstream


@dataclass(frozen=True, slots=True)
class Shared:
    """What every snapshot of a worker shares: built once at start-up from restart-only keys."""

    verifier: TokenVerifier
    revocations: RevocationSet
    upstreams: Mapping[str, Upstream]
    record: Callable[[UsageRow], None]
    # The access log's refusals without a caller (counted, not written).
    count_refusal: Callable[[str], None]
    # The failover clusters Envoy was rendered with (authz.envoy.failover): a reload cannot add one.
    failover_clusters: frozenset[str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The request path's view of one configuration."""

    config: GatewayConfig
    prices: PriceBook
    authorizer: Authorizer
    deps: Deps
    access_log: AccessLog


def build_snapshot(config: GatewayConfig, shared: Shared) -> Snapshot:
    """The request path for ``config``; no I/O, nothing shared with an earlier snapshot but ``shared``."""
    prices = PriceBook(config.pricing)
    authorizer = Authorizer(
        config,
        shared.verifier,
        is_revoked=shared.revocations.blocks,
        prices=prices,
        failover_clusters=shared.failover_clusters,
    )
    deps = Deps(
        upstreams=shared.upstreams,
        prices=prices,
        record=shared.record,
        policies={policy.name: policy for policy in config.policies},
        models=ModelResolver(config.upstreams),
        translate=TranslateOptions(ping_interval=config.translate.ping_interval),
    )
    access_log = AccessLog(
        identify=authorizer.identify,
        record=shared.record,
        prices=prices,
        count_refusal=shared.count_refusal,
    )
    return Snapshot(config, prices, authorizer, deps, access_log)
