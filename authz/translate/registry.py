"""Which translator serves each (client format, upstream kind) pair."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from authz.identity import RequestIdentity
from authz.translate.base import Translator
from authz.translate.passthrough import PassThrough
from backends.base import Upstream
from backends.kinds import KINDS


def _passthrough(identity: RequestIdentity, upstream: Upstream) -> Translator:
    return PassThrough(identity, upstream, KINDS[upstream.kind].meter(identity.streaming))


Factory = Callable[[RequestIdentity, Upstream], Translator]

# A pass-through client format is named after the kind that speaks it.
TRANSLATORS: Mapping[tuple[str, str], Factory] = {
    (kind.passthrough.name, kind.name): _passthrough
    for kind in KINDS.values()
    if kind.passthrough is not None
}


def translator_for(identity: RequestIdentity, upstream: Upstream) -> Translator | None:
    """The translator for this request's client format and upstream kind; None when no pair
    serves it (the policy should never have picked such an upstream)."""
    factory = TRANSLATORS.get((identity.client_format, upstream.kind))
    return factory(identity, upstream) if factory is not None else None
