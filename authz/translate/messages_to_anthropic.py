"""Messages API to the first-party Anthropic API: the request as the client sent it.

The path is the API's own (``/v1/messages``, ``/v1/messages/count_tokens``; the SDKs' ``?beta=true``
changes nothing), the body reaches the API byte for byte unless the upstream's ``model_map`` names
another model (then only ``model`` is replaced), and every ``anthropic-*`` header and unknown field
passes. The credential is the upstream's API key: ext_authz removed the client's ``Authorization``
and ``x-api-key`` before this runs (``authz/gateway/authorize.py``, ``headers_to_strip``).
"""

from __future__ import annotations

from collections.abc import Mapping

from authz.translate.base import UpstreamRequest
from authz.translate.messages_base import REMOVE_UPSTREAM, MessagesPair


class MessagesToAnthropic(MessagesPair):
    """One Messages request served by the Anthropic API."""

    def request(self, headers: Mapping[str, str], body: bytes) -> UpstreamRequest:
        """The API path; the body unchanged unless the model is mapped to another id."""
        identity = self._identity
        model_id = identity.upstream_model
        new_body = None
        if model_id is not None and model_id != self._request.model:
            new_body = self._request.rebuild(drop=("model",), add=[("model", model_id)])
        path = self._upstream.path(identity.operation, model_id)  # type: ignore[arg-type]
        return UpstreamRequest(path=path, remove_headers=REMOVE_UPSTREAM, body=new_body)
