"""The upstream kinds, one descriptor (:class:`~backends.descriptor.UpstreamKind`) each, in one table.

Nothing else in the gateway branches on the kind: adding one is a module that defines its ``KIND``
and a row here.
"""

from __future__ import annotations

from collections.abc import Mapping

from backends import anthropic, bedrock, vertex
from backends.descriptor import UpstreamKind

KINDS: Mapping[str, UpstreamKind] = {kind.name: kind for kind in (bedrock.KIND, vertex.KIND, anthropic.KIND)}
"""Every upstream kind, by the name ``upstreams.<name>.kind`` uses."""

PASS_THROUGH: Mapping[str, UpstreamKind] = {
    kind.passthrough.name: kind for kind in KINDS.values() if kind.passthrough is not None
}
"""The kind serving each pass-through client format, by the format's name."""
