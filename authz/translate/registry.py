"""Which translator serves each (client format, upstream kind) pair."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from authz.identity import RequestIdentity
from authz.translate.base import TranslateOptions, Translator
from authz.translate.messages import FORMAT as MESSAGES
from authz.translate.messages import MessagesRequest
from authz.translate.messages_base import MessagesPair
from authz.translate.messages_to_anthropic import MessagesToAnthropic
from authz.translate.messages_to_bedrock import MessagesToBedrock
from authz.translate.messages_to_vertex import MessagesToVertex
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

MessagesFactory = Callable[[RequestIdentity, Upstream, MessagesRequest, TranslateOptions], MessagesPair]

MESSAGES_TRANSLATORS: Mapping[str, MessagesFactory] = {
    "bedrock": MessagesToBedrock,
    "vertex": MessagesToVertex,
    "anthropic": MessagesToAnthropic,
}
"""The Messages format's translator for each upstream kind: every kind serves Messages clients."""


def translator_for(identity: RequestIdentity, upstream: Upstream) -> Translator | None:
    """The translator for this request's client format and upstream kind; None when no pair
    serves it (the policy should never have picked such an upstream). Messages requests get theirs
    from :func:`messages_translator` once the body was read."""
    factory = TRANSLATORS.get((identity.client_format, upstream.kind))
    return factory(identity, upstream) if factory is not None else None


def messages_translator(
    identity: RequestIdentity, upstream: Upstream, request: MessagesRequest, options: TranslateOptions
) -> Translator | None:
    """The translator for a Messages request whose body was read and whose model was checked."""
    factory = MESSAGES_TRANSLATORS.get(upstream.kind)
    return factory(identity, upstream, request, options) if factory is not None else None


def serves(client_format: str, kind: str) -> bool:
    """Whether a pair serves ``client_format`` from an upstream of ``kind``."""
    if client_format == MESSAGES:
        return kind in MESSAGES_TRANSLATORS
    return (client_format, kind) in TRANSLATORS
