"""Messages API to a Vertex AI upstream (DESIGN.md, "Claude Code's gateway protocol").

The request goes to ``.../publishers/anthropic/models/{id}:streamRawPredict`` (``:rawPredict``
for a whole answer, ``count-tokens:rawPredict`` to count) in the configured project and region. The
body loses ``model`` (counting keeps it, as the Vertex id) and ``tags``, and gains
``anthropic_version: "vertex-2023-10-16"``; betas stay in the ``anthropic-beta`` header, minus the
request-tags beta Vertex refuses. Vertex answers in the Messages API's own SSE and JSON, which
reach the client unchanged while the meter counts them.
https://cloud.google.com/vertex-ai/generative-ai/docs/partner-models/claude/use-claude
"""

from __future__ import annotations

from collections.abc import Mapping

from authz.translate.base import UpstreamRequest
from authz.translate.messages import header_betas
from authz.translate.messages_base import FIRST_PARTY_ONLY, REMOVE_UPSTREAM, MessagesPair, cloud_betas

VERTEX_VERSION = "vertex-2023-10-16"


class MessagesToVertex(MessagesPair):
    """One Messages request served by a Vertex upstream."""

    def request(self, headers: Mapping[str, str], body: bytes) -> UpstreamRequest:
        """The Vertex path and body; the betas header without the request-tags beta."""
        identity = self._identity
        operation, model_id = identity.operation, identity.upstream_model
        drop = ("model", "anthropic_version", *FIRST_PARTY_ONLY)
        add: list[tuple[str, object]] = [("anthropic_version", VERTEX_VERSION)]
        if operation == "count_tokens":
            # count-tokens:rawPredict names no model in its path: the body says which.
            add.insert(0, ("model", model_id))
        new_body = self._request.rebuild(drop=drop, add=add)
        path = self._upstream.path(operation, model_id)  # type: ignore[arg-type]
        set_headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
        remove: tuple[str, ...] = REMOVE_UPSTREAM
        betas = cloud_betas(headers)
        if betas != header_betas(headers):
            if betas:
                set_headers = (*set_headers, ("anthropic-beta", ",".join(betas)))
            else:
                remove = (*remove, "anthropic-beta")
        return UpstreamRequest(path=path, set_headers=set_headers, remove_headers=remove, body=new_body)
